"""DeepEP's low-latency mode over ``shard_map``: ``low_latency_dispatch`` sends one row per (token, expert)
pair into DeepGEMM's *masked layout*, ``low_latency_combine`` returns the expert outputs and sums them with
the gating weights at the source. For decoding: static worst-case buffers, no host sync, jit-friendly.

Both are per-rank functions: call them inside ``jax.shard_map`` (or any map) that binds ``axis_name``,
with this rank's tokens ``x [tokens, hidden]`` and routing ``topk_idx [tokens, top_k]`` (global expert
ids, -1 = none). Expert ``e`` lives on rank ``e // local_experts`` as local expert ``e % local_experts``.

How rows move (R ranks, L local experts, M = ``num_max_dispatch_tokens_per_rank``, E = R * L):

    x [T, H] --messages--> [E * M, B] = [R, L*M, B] --all_to_all--> [R (source), L, M, B]
             --compact--> masked layout [L, R*M, H] + count [L]

Each (token, expert) pair is one message in slot ``(expert, position)`` of the send buffer, ``position``
its order among this rank's pairs for that expert (T <= M, so a pair always fits unless a token names one
expert twice). A message is DeepEP's: a 16-byte header (source token index, three reserved int32) and the
payload, e4m3 data + one float32 scale per 128 channels (``hidden + hidden/128*4 + 16`` bytes) or x's
dtype, all one uint8 buffer and one ``all_to_all``. The receiver compacts the blocks so that expert e's
rows are sorted by (source rank, source token): deterministic, where DeepEP's atomics order the source
blocks by arrival. Rows at or past ``count[e]`` are zero (DeepEP leaves them undefined; readers must not
rely on either). ``low_latency_combine`` is the reverse ``all_to_all`` of the valid rows only (padding
rows are never read: they may hold anything, NaN included), then ``sum_k w[t, k] * y(t, k)`` in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant import FP8_DTYPE, FP8Array, GROUP, per_token_cast_to_fp8
from sharding.ep.layout import (check_experts_split, check_tokens, check_topk_idx, check_topk_weights, pad_row,
                                valid_ids)

HEADER_BYTES = 16  # DeepEP's int4 header: source token index + 3 reserved int32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("src_info", "layout_range", "send_slot", "recv_row"),
                   meta_fields=("axis_name", "num_max_dispatch_tokens_per_rank", "hidden", "num_experts"))
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """How one low-latency dispatch moved rows (DeepEP's handle, plus the slots the combine replays)."""

    src_info: jax.Array  # [L, R*M] int32 source token index of each masked-layout row; -1 = padding
    layout_range: jax.Array  # [L, R, 2] int32 (begin, count) of the rows of expert l from source rank r
    send_slot: jax.Array  # [T, K] int32 send-buffer slot (expert * M + position) of each pair; E*M = not sent
    recv_row: jax.Array  # [R*L*M] int32 masked-layout row (l * R*M + row) of each received slot; L*R*M = empty
    axis_name: str
    num_max_dispatch_tokens_per_rank: int  # M
    hidden: int  # H
    num_experts: int  # E

    @property
    def num_local_experts(self) -> int:
        return self.src_info.shape[0]

    @property
    def num_ranks(self) -> int:
        return self.layout_range.shape[1]


class LowLatencyDispatched(NamedTuple):
    """What one rank receives, in the masked layout (``m_grouped_fp8_gemm_nt_masked``'s lhs and masked_m)."""

    x: jax.Array | FP8Array  # [L, R*M, H] x's dtype, or FP8Array(e4m3 [L, R*M, H], f32 scales [L, R*M, H/128])
    count: jax.Array  # [L] int32 valid rows per local expert (DeepEP's recv_count; masked_m)
    handle: LowLatencyHandle
    num_dropped: jax.Array  # [] int32 this rank's pairs not sent: an expert named twice by one token beyond
    #                         M slots, or an out-of-range id under jit (treated as -1); 0 for DeepEP's inputs


class LowLatencyBytes(NamedTuple):
    dispatch: int  # bytes this rank puts on the wire for its dispatch messages
    combine: int  # bytes the expert outputs of this rank's pairs take back


def message_bytes(hidden: int, use_fp8: bool, dtype=jnp.bfloat16) -> int:
    """Bytes of one dispatch message: DeepEP's ``hidden + hidden/128*4 + 16`` for FP8, else
    ``hidden * itemsize + 16`` (DeepEP's test counts bf16 messages as ``hidden * 2``, without the header)."""
    if use_fp8:
        return HEADER_BYTES + hidden + hidden // GROUP * 4
    return HEADER_BYTES + hidden * jnp.dtype(dtype).itemsize


def low_latency_bytes(hidden: int, num_selections: int, use_fp8: bool = True, dtype=jnp.bfloat16) -> LowLatencyBytes:
    """Wire bytes of one rank's low-latency dispatch and combine, as DeepEP's test_low_latency.py counts
    them: one message per selected (token, expert) pair (``num_selections``, -1 slots excluded) and one
    combine row in ``dtype`` (bf16) per pair."""
    if num_selections < 0 or hidden < 1:
        raise ValueError(f"num_selections: expected a non-negative count (and hidden > 0), got {num_selections}, {hidden}")
    return LowLatencyBytes(num_selections * message_bytes(hidden, use_fp8, dtype),
                           num_selections * hidden * jnp.dtype(dtype).itemsize)


# --- messages: rows <-> one uint8 buffer ---------------------------------------------------------------

def _to_bytes(a: jax.Array) -> jax.Array:
    """[n, c] any dtype -> [n, c * itemsize] uint8."""
    if a.dtype.itemsize == 1:
        return jax.lax.bitcast_convert_type(a, jnp.uint8)
    return jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(a.shape[0], -1)


def _from_bytes(b: jax.Array, dtype) -> jax.Array:
    """[..., c * itemsize] uint8 -> [..., c] dtype."""
    size = jnp.dtype(dtype).itemsize
    if size == 1:
        return jax.lax.bitcast_convert_type(b, dtype)
    return jax.lax.bitcast_convert_type(b.reshape(b.shape[:-1] + (-1, size)), dtype)


def _payload_parts(hidden: int, use_fp8: bool, dtype) -> list[tuple[object, int]]:
    """(dtype, channels) of each payload field, in message order."""
    return [(FP8_DTYPE, hidden), (jnp.float32, hidden // GROUP)] if use_fp8 else [(dtype, hidden)]


def _pack(src_token: jax.Array, parts: list[jax.Array]) -> jax.Array:
    """[n] int32 source token and [n, c_i] payload fields -> [n, B] uint8 messages."""
    header = jnp.zeros((src_token.shape[0], 4), jnp.int32).at[:, 0].set(src_token)  # [n, 4]
    return jnp.concatenate([_to_bytes(header)] + [_to_bytes(p) for p in parts], axis=1)


def _unpack(messages: jax.Array, layout: list[tuple[object, int]]) -> tuple[jax.Array, list[jax.Array]]:
    """[..., B] uint8 -> ([...] int32 source token, payload fields [..., c_i])."""
    src = _from_bytes(messages[..., :4], jnp.int32)[..., 0]
    fields, at = [], HEADER_BYTES
    for dtype, channels in layout:
        width = channels * jnp.dtype(dtype).itemsize
        fields.append(_from_bytes(messages[..., at:at + width], dtype))
        at += width
    return src, fields


# --- the public ops ------------------------------------------------------------------------------------

def low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int, *,
                         axis_name: str = "ep", use_fp8: bool = True, round_scale: bool = False) -> LowLatencyDispatched:
    """Sends each (token, expert) pair of this rank to its expert's rank, into the masked layout.

    Args:
      x: [tokens, hidden] bf16/f32, tokens <= num_max_dispatch_tokens_per_rank (the same M on every rank).
      topk_idx: [tokens, top_k] int global expert ids, -1 = none.
      num_max_dispatch_tokens_per_rank: M, the static per-rank token bound that sizes every buffer.
      num_experts: E over the whole axis (a multiple of its size R).
      use_fp8: send e4m3 with a float32 scale per 1x128 group (returned as an FP8Array); else x's dtype.
      round_scale: with use_fp8, power-of-two scales (``ue8m0``, as DeepGEMM's UE8M0 recipes want).
    Returns:
      ``LowLatencyDispatched``: x [L, R*M, H], count [L] int32 (rows of expert l sorted by source rank,
      then source token), the handle for ``low_latency_combine``, num_dropped [] int32.
    """
    if isinstance(x, (tuple, list)):
        raise ValueError("x: low_latency_dispatch takes bf16/f32 tokens and casts them itself (use_fp8=True), "
                         "not an FP8 pair")
    num_tokens, hidden = check_tokens(x, use_fp8=use_fp8)
    max_tokens = num_max_dispatch_tokens_per_rank
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"num_max_dispatch_tokens_per_rank: expected a positive int, got {max_tokens!r}")
    if num_tokens > max_tokens:
        raise ValueError(f"num_max_dispatch_tokens_per_rank: x has {num_tokens} tokens, more than the "
                         f"{max_tokens} the buffers hold")
    if round_scale and not use_fp8:
        raise ValueError("round_scale: power-of-two scales apply only to FP8 dispatch (use_fp8=True)")
    topk_idx = check_topk_idx(topk_idx, num_experts, num_tokens=num_tokens)
    num_ranks = jax.lax.axis_size(axis_name)
    local = check_experts_split(num_experts, num_ranks)
    m, e_total, top_k = int(max_tokens), num_experts, topk_idx.shape[1]

    # Step 1: a send slot per (token, expert) pair: expert * M + its order among this rank's pairs for it.
    valid = valid_ids(topk_idx, e_total)  # [T, K]
    expert = jnp.where(valid, topk_idx, e_total).reshape(-1)  # [T*K] in (token, k) order; E = none
    order = jnp.argsort(expert, stable=True)  # [T*K]
    sorted_expert = expert[order]
    first = jnp.searchsorted(sorted_expert, sorted_expert, side="left").astype(jnp.int32)
    position = jnp.zeros_like(expert).at[order].set(jnp.arange(expert.shape[0], dtype=jnp.int32) - first)
    sent = (expert < e_total) & (position < m)  # [T*K]
    send_slot = jnp.where(sent, expert * m + position, e_total * m)  # [T*K]
    token = jnp.arange(num_tokens * top_k, dtype=jnp.int32) // top_k
    send_token = jnp.full((e_total * m + 1,), -1, jnp.int32).at[send_slot].set(token)[:-1]  # [E*M]; -1 = empty
    num_dropped = (valid.reshape(-1) & ~sent).sum(dtype=jnp.int32) + ((topk_idx != -1) & ~valid).sum(dtype=jnp.int32)

    # Step 2: messages (header + payload), one all_to_all: block r of [R, L*M, B] goes to rank r.
    if use_fp8:
        q = per_token_cast_to_fp8(x, ue8m0=round_scale)
        payload = [q.data, q.scale]  # [T, H] e4m3, [T, H/128] f32
    else:
        payload = [x]
    layout = _payload_parts(hidden, use_fp8, x.dtype)
    gather = jnp.where(send_token >= 0, send_token, num_tokens)  # [E*M], T = the zero row
    messages = _pack(send_token, [pad_row(p)[gather] for p in payload])  # [E*M, B]
    received = jax.lax.all_to_all(messages.reshape(num_ranks, local * m, -1), axis_name, 0, 0)  # [R(src), L*M, B]
    received = received.reshape(num_ranks * local * m, -1)  # [R*L*M, B], slot (src, l, position)

    # Step 3: compact into the masked layout, expert l's rows ordered by (source rank, source token).
    recv_src = _from_bytes(received[:, :4], jnp.int32)[:, 0].reshape(num_ranks, local, m)  # [R, L, M]; -1 = empty
    pairs = (recv_src >= 0).sum(-1, dtype=jnp.int32).T  # [L, R] rows of expert l from rank r (a prefix of M)
    begin = jnp.cumsum(pairs, axis=1, dtype=jnp.int32) - pairs  # [L, R]
    count = pairs.sum(1, dtype=jnp.int32)  # [L]
    slot_pos = jnp.arange(m, dtype=jnp.int32)[None, None]  # [1, 1, M]
    row = begin.T[:, :, None] + slot_pos  # [R, L, M] row within expert l's block
    flat_row = jnp.arange(local, dtype=jnp.int32)[None, :, None] * (num_ranks * m) + row
    recv_row = jnp.where(recv_src >= 0, flat_row, local * num_ranks * m).reshape(-1)  # [R*L*M]
    empty = num_ranks * local * m
    row_source = jnp.full((local * num_ranks * m + 1,), empty, jnp.int32).at[recv_row].set(
        jnp.arange(empty, dtype=jnp.int32))[:-1]  # [L*R*M] received slot behind each row; R*L*M = padding
    src, fields = _unpack(pad_row(received)[row_source], layout)  # zero padding rows, header 0
    padding = (row_source == empty).reshape(local, num_ranks * m)
    src_info = jnp.where(padding, -1, src.reshape(local, num_ranks * m))  # [L, R*M]
    fields = [f.reshape(local, num_ranks * m, -1) for f in fields]
    out = FP8Array(*fields) if use_fp8 else fields[0]
    handle = LowLatencyHandle(src_info, jnp.stack([begin, pairs], axis=-1), send_slot.reshape(num_tokens, top_k),
                              recv_row, axis_name, m, hidden, e_total)
    return LowLatencyDispatched(out, count, handle, num_dropped)


def low_latency_combine(y: jax.Array, topk_idx, topk_weights, handle: LowLatencyHandle) -> jax.Array:
    """Returns each expert output row to its source and sums ``topk_weights[t, k] * y(t, k)`` over k.

    Args:
      y: [L, R*M, hidden_out] bf16/f32 expert outputs in the dispatch's masked layout (hidden_out need not
        be the dispatch's hidden); rows at or past count[l] are never read (they may hold NaN).
      topk_idx: [tokens, top_k] int, the routing given to the dispatch; its -1 slots contribute 0 (as do
        pairs the dispatch did not send).
      topk_weights: [tokens, top_k] float gating weights.
      handle: the dispatch's handle.
    Returns:
      [tokens, hidden_out] in y's dtype, accumulated in float32; rows travel in y's dtype.
    """
    local, m, r = handle.num_local_experts, handle.num_max_dispatch_tokens_per_rank, handle.num_ranks
    if getattr(y, "ndim", None) != 3 or tuple(y.shape[:2]) != (local, r * m):
        raise ValueError(f"y: expected the masked layout [{local}, {r * m}, hidden], got shape {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.floating) or y.dtype == FP8_DTYPE:
        raise ValueError(f"y: expected bfloat16/float32 expert outputs, got {y.dtype}")
    num_tokens, top_k = handle.send_slot.shape
    topk_idx = check_topk_idx(topk_idx, handle.num_experts, num_tokens=num_tokens)
    if topk_idx.shape[1] != top_k:
        raise ValueError(f"topk_idx: expected [{num_tokens}, {top_k}] (the dispatch's), got {tuple(topk_idx.shape)}")
    topk_weights = check_topk_weights(jnp.asarray(topk_weights), topk_idx)

    rows = pad_row(y.reshape(local * r * m, -1))[handle.recv_row]  # [R*L*M, H]: received slot order, padding 0
    back = jax.lax.all_to_all(rows.reshape(r, local * m, -1), handle.axis_name, 0, 0)  # [R(dest), L*M, H]
    per_pair = pad_row(back.reshape(r * local * m, -1))[handle.send_slot]  # [T, K, H]; unsent pairs 0
    weights = jnp.where(valid_ids(topk_idx, handle.num_experts), topk_weights, 0.0)  # [T, K]
    return (weights[:, :, None] * per_pair.astype(jnp.float32)).sum(1).astype(y.dtype)  # f32, no TF32 matmul
