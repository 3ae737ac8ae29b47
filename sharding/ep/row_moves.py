"""The differentiable core every dispatch/combine pair shares, built from its two linear maps.

A mode (normal, hierarchical) supplies ``send_and_expand(x [T, ...], handle) -> [rows, ...]`` (each token to
its ranks, one output row per (token, local expert)) and its transpose ``collapse_and_return(rows, handle,
dtype) -> [T, ...] float32`` (rows summed back at their source, travelling as ``dtype``). ``row_moves`` turns
them into the custom-VJP ops: the gradient of a dispatch is a combine and the gradient of a combine is a
dispatch over the same handle, and the FP8 wire (1x128 e4m3 + float32 scales, the e4m3 bytes moved as uint8:
XLA:CPU gathers float8 rows an order of magnitude slower) dequantizes on arrival.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.quant import FP8Array, dequantize_per_token, per_token_cast_to_fp8


class ReceivedLayout(NamedTuple):
    expert_ids: jax.Array  # [rows] int32 local expert of each output row, sorted, -1 = padding (last); or the
    #                        received [received, top_k] ids unexpanded
    weights: jax.Array  # expert_ids' shape, float32, 0 where expert_ids is -1
    row_source: jax.Array  # [rows] int32 received row behind each output row; received rows = padding
    tokens_per_expert: jax.Array  # [local_experts] int32 (token, expert) pairs kept
    lost: jax.Array  # [] int32 (token, expert) pairs received but beyond the rows


def received_layout(recv_ids: jax.Array, recv_weights: jax.Array, local_experts: int,
                    rows: int | None) -> ReceivedLayout:
    """Received copies -> the output layout: with ``rows``, one row per (copy, local expert) sorted by expert
    (the contiguous grouped layout, ``rows`` static); None keeps one row per received copy (DeepEP V1).

    recv_ids: [received, top_k] int32 local expert ids, -1 where the expert is elsewhere or the row empty;
    recv_weights: [received, top_k] float32.
    """
    received, top_k = recv_ids.shape
    flat = jnp.where(recv_ids >= 0, recv_ids, local_experts).reshape(-1)  # local_experts = nothing
    if rows is None:
        expert_ids, weights = recv_ids, recv_weights
        row_source, lost = jnp.arange(received, dtype=jnp.int32), jnp.zeros((), jnp.int32)
    else:
        order = jnp.argsort(flat, stable=True)[:rows].astype(jnp.int32)
        kept = flat[order] < local_experts
        expert_ids = jnp.where(kept, flat[order], -1)
        weights = jnp.where(kept, recv_weights.reshape(-1)[order], 0.0)
        row_source = jnp.where(kept, order // top_k, received)
        lost = (flat < local_experts).sum(dtype=jnp.int32) - kept.sum(dtype=jnp.int32)
    ids = jnp.where(expert_ids >= 0, expert_ids, local_experts).reshape(-1)
    per_expert = jnp.zeros((local_experts + 1,), jnp.int32).at[ids].add(1)[:local_experts]
    return ReceivedLayout(expert_ids, weights, row_source, per_expert, lost)


class RowMoves(NamedTuple):
    dispatch_x: Callable  # (x [T, H] float, handle, use_fp8: bool) -> [rows, H] in x's dtype, differentiable in x
    combine_rows: Callable  # (y [rows, H], weights [rows] f32, handle) -> [T, H] in y's dtype, differentiable
    send_fp8: Callable  # (FP8Array [T, H], handle) -> FP8Array [rows, H], no gradient

    def combine(self, y: jax.Array, handle, topk_weights: jax.Array | None = None) -> jax.Array:
        """The public combine: checks y [handle.num_rows, hidden] and topk_weights [num_rows] (None = 1)."""
        rows = handle.num_rows
        if y.ndim != 2 or y.shape[0] != rows:
            raise ValueError(f"y: expected [{rows}, hidden] (the dispatch's rows), got shape {tuple(y.shape)}")
        if topk_weights is None:
            topk_weights = jnp.ones((rows,), jnp.float32)
        elif tuple(topk_weights.shape) != (rows,):
            raise ValueError(f"topk_weights: expected [{rows}] (one per row of y), got {tuple(topk_weights.shape)}")
        return self.combine_rows(y, topk_weights.astype(jnp.float32), handle)


def row_moves(send_and_expand: Callable, collapse_and_return: Callable) -> RowMoves:
    def send_fp8(q: FP8Array, handle) -> FP8Array:
        data = jax.lax.bitcast_convert_type(q.data, jnp.uint8)
        moved = jax.lax.bitcast_convert_type(send_and_expand(data, handle), q.data.dtype)
        return FP8Array(moved, send_and_expand(q.scale, handle))

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def dispatch_x(x: jax.Array, handle, use_fp8: bool) -> jax.Array:
        if use_fp8:
            return dequantize_per_token(send_fp8(per_token_cast_to_fp8(x), handle)).astype(x.dtype)
        return send_and_expand(x, handle)

    def dispatch_x_fwd(x, handle, use_fp8):
        return dispatch_x(x, handle, use_fp8), handle

    def dispatch_x_bwd(use_fp8, handle, g):  # a combine (unweighted), in the gradient's dtype
        del use_fp8
        return collapse_and_return(g, handle, g.dtype).astype(g.dtype), None

    dispatch_x.defvjp(dispatch_x_fwd, dispatch_x_bwd)

    @jax.custom_vjp
    def combine_rows(y: jax.Array, weights: jax.Array, handle) -> jax.Array:
        return collapse_and_return(y.astype(jnp.float32) * weights[:, None], handle, y.dtype).astype(y.dtype)

    def combine_rows_fwd(y, weights, handle):
        return combine_rows(y, weights, handle), (y, weights, handle)

    def combine_rows_bwd(residual, g):  # a dispatch of the output gradient over the same handle
        y, weights, handle = residual
        g_rows = send_and_expand(g, handle).astype(jnp.float32)  # [rows, H]
        return (g_rows * weights[:, None]).astype(y.dtype), (g_rows * y.astype(jnp.float32)).sum(-1), None

    combine_rows.defvjp(combine_rows_fwd, combine_rows_bwd)
    return RowMoves(dispatch_x, combine_rows, send_fp8)
