"""Where each token goes: DeepEP's ``get_dispatch_layout`` and the argument checks every EP op shares.

Expert ``e`` lives on rank ``e // experts_per_rank`` (experts are split over the ``ep`` axis in order,
the layout of expert weights sharded ``P("ep")``). A token is sent once to each rank that hosts at
least one of its experts, so ranks count tokens, experts count (token, expert) pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant import FP8Array


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: jax.Array  # [ranks] int32, tokens bound for each rank (a token counts once per rank)
    num_tokens_per_expert: jax.Array  # [experts] int32, (token, expert) pairs per expert
    is_token_in_rank: jax.Array  # [tokens, ranks] bool


def check_experts_split(num_experts: int, num_ranks: int) -> int:
    """Experts per rank; ``ValueError`` naming num_experts unless the ranks divide them."""
    if num_experts < 1:
        raise ValueError(f"num_experts: must be positive, got {num_experts}")
    if num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(f"num_experts: {num_experts} experts cannot be split evenly over {num_ranks} ep ranks")
    return num_experts // num_ranks


def check_topk_idx(topk_idx, num_experts: int, *, num_tokens: int | None = None) -> jax.Array:
    """``topk_idx`` as int32 [tokens, top_k]; ``ValueError`` naming it for a bad shape or dtype, and, when its
    values are known (not traced), for an id outside [-1, num_experts). Traced out-of-range ids are treated
    as no selection and counted as dropped by the ops, never silently routed."""
    if not hasattr(topk_idx, "dtype"):
        topk_idx = np.asarray(topk_idx)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx: expected [tokens, top_k], got shape {tuple(topk_idx.shape)}")
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise ValueError(f"topk_idx: expected an integer dtype, got {topk_idx.dtype}")
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx: expected {num_tokens} rows (one per token of x), got shape {tuple(topk_idx.shape)}")
    if not isinstance(topk_idx, jax.core.Tracer):
        values = np.asarray(topk_idx)
        bad = (values < -1) | (values >= num_experts)
        if bad.any():
            raise ValueError(f"topk_idx: expert ids must be in [-1, num_experts={num_experts}), got "
                             f"{values[bad][:4].tolist()} at {np.argwhere(bad)[:4].tolist()}")
    return jnp.asarray(topk_idx, jnp.int32)


def check_topk_weights(topk_weights, topk_idx: jax.Array) -> jax.Array:
    """``topk_weights`` as float32 with topk_idx's shape; ``ValueError`` naming it otherwise."""
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise ValueError(f"topk_weights: expected shape {tuple(topk_idx.shape)} (topk_idx's), got "
                         f"{tuple(topk_weights.shape)}")
    if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise ValueError(f"topk_weights: expected a floating dtype, got {topk_weights.dtype}")
    return topk_weights.astype(jnp.float32)


def pad_row(x: jax.Array, value=0) -> jax.Array:
    """[n, ...] -> [n + 1, ...] with a last row of ``value``: the row an out-of-range index gathers."""
    return jnp.concatenate([x, jnp.full((1,) + x.shape[1:], value, x.dtype)])


def check_tokens(x, *, use_fp8: bool = False) -> tuple[int, int]:
    """(tokens, hidden) of ``x``: a float [tokens, hidden] array or an FP8 pair (e4m3 [tokens, hidden],
    float32 scales [tokens, hidden / 128]); ``ValueError`` naming x otherwise, or when ``use_fp8`` asks to
    cast a float x whose hidden size is not a multiple of the 1x128 groups."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"x: an FP8 input is a pair (e4m3 data, float32 scales), got {len(x)} arrays")
        data, scale = x
        if data.ndim != 2 or data.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"x: FP8 data must be float8_e4m3fn [tokens, hidden], got {data.dtype} {tuple(data.shape)}")
        tokens, hidden = data.shape
        if hidden % 128 or tuple(scale.shape) != (tokens, hidden // 128) or scale.dtype != jnp.float32:
            raise ValueError(f"x: FP8 scales must be float32 [{tokens}, {hidden} / 128] (hidden a multiple of 128), "
                             f"got {scale.dtype} {tuple(scale.shape)}")
        return tokens, hidden
    if x.ndim != 2:
        raise ValueError(f"x: expected [tokens, hidden], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float8_e4m3fn:
        raise ValueError(f"x: expected bfloat16/float32 [tokens, hidden] or an FP8 (data, scales) pair, got {x.dtype}")
    if use_fp8 and x.shape[1] % 128:
        raise ValueError(f"x: FP8 dispatch casts 1x128 groups, so hidden must be a multiple of 128, got {x.shape[1]}")
    return x.shape


def as_fp8_pair(x) -> FP8Array | None:
    return FP8Array(*x) if isinstance(x, (tuple, list)) else None


def valid_ids(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[tokens, top_k] bool: the selections that name a real expert."""
    return (topk_idx >= 0) & (topk_idx < num_experts)


def is_token_in_rank(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> jax.Array:
    """[tokens, ranks] bool: whether a token has at least one expert on each rank."""
    per_rank = check_experts_split(num_experts, num_ranks)
    rank = jnp.where(valid_ids(topk_idx, num_experts), topk_idx // per_rank, num_ranks)  # [T, K], ranks = none
    return (rank[:, :, None] == jnp.arange(num_ranks)[None, None]).any(axis=1)


def get_dispatch_layout(topk_idx, num_experts: int, num_ranks: int) -> DispatchLayout:
    """DeepEP's layout of one rank's routing, computed locally (no communication).

    Args:
      topk_idx: [tokens, top_k] int expert ids, -1 where a slot selects nothing.
      num_experts: experts over all ranks (a multiple of num_ranks).
      num_ranks: ranks of the ep axis.
    Returns:
      DispatchLayout: tokens per rank (a token bound for two experts of one rank counts once for it),
      (token, expert) pairs per expert, and the [tokens, ranks] membership.
    """
    check_experts_split(num_experts, num_ranks)
    topk_idx = check_topk_idx(topk_idx, num_experts)
    in_rank = is_token_in_rank(topk_idx, num_experts, num_ranks)
    ids = jnp.where(valid_ids(topk_idx, num_experts), topk_idx, num_experts).reshape(-1)
    per_expert = jnp.zeros((num_experts + 1,), jnp.int32).at[ids].add(1)[:num_experts]
    return DispatchLayout(in_rank.sum(0, dtype=jnp.int32), per_expert, in_rank)
