"""DeepEP's normal mode over ``shard_map``: ``dispatch`` moves each token once to every ``ep`` rank that
hosts one of its experts, ``combine`` sums the copies back. For training and prefill.

Both are per-rank functions: call them inside ``jax.shard_map`` (or any map) that binds ``axis_name``,
with this rank's tokens ``x [tokens, hidden]`` and routing ``topk_idx [tokens, top_k]`` (global expert
ids, -1 = none). Expert ``e`` lives on rank ``e // experts_per_rank``.

How rows move (static shapes, so XLA:CPU's plain ``all_to_all`` carries them; DeepEP's own fixed-size
design, its issue #39 and ``num_worst_tokens``):

    x [T, H] --send rows--> [R, C, H] --all_to_all--> [R, C, H] (block r from rank r) --expand--> [N, H]

``C`` rows per (source, destination) pair: ``T`` (dropless, the default) or ``capacity_factor`` x the
mean. ``expand=True`` (the default, DeepEP V2's ``do_expand``) turns each received token into one row per
local expert it selected, sorted by local expert: the contiguous layout the grouped GEMMs take
(``m_grouped_fp8_gemm_nt_contiguous``, ``jaxseek.model.grouped_matmul``), padding rows last with expert
-1 and weight 0. ``expand=False`` keeps DeepEP V1's layout: one row per received (token, rank) copy with
its [top_k] local expert ids (-1 where the expert is not local) and weights (0 there).

``combine`` is the transpose: rows are summed per received token, sent back, and summed over ranks at
the source, in float32, returned in y's dtype. The gradient of dispatch is a combine and the gradient of
combine is a dispatch over the same handle (``jax.custom_vjp``). With ``use_fp8=True`` rows travel as
e4m3 with one float32 scale per 128 channels (``pallas_kernels.quant``'s 1x128 cast): about half the
bytes of bf16; the gradient (a combine) travels in the gradient's dtype. Copies that do not fit are
counted in ``num_dropped``, never lost silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.quant import FP8Array
from sharding.ep.layout import (as_fp8_pair, check_experts_split, check_tokens, check_topk_idx, check_topk_weights,
                                is_token_in_rank, pad_row, valid_ids)
from sharding.ep.row_moves import received_layout, row_moves


TRANSPORTS = ("all_to_all", "ragged")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("send_slot", "send_token", "row_source", "send_counts", "recv_counts"),
                   meta_fields=("axis_name", "num_ranks", "capacity", "num_tokens", "transport"))
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """How one dispatch moved rows; combine and the gradients replay it."""

    send_slot: jax.Array  # [tokens, ranks] int32 send-buffer row of each (token, rank) copy; ranks*capacity = not sent
    send_token: jax.Array  # [ranks * capacity] int32 token in each send row; tokens = empty
    row_source: jax.Array  # [rows] int32 received row behind each output row; ranks*capacity = padding
    send_counts: jax.Array  # [ranks] int32 rows sent to each rank
    recv_counts: jax.Array  # [ranks] int32 rows received from each rank
    axis_name: str
    num_ranks: int
    capacity: int  # C, rows per (source, destination) pair
    num_tokens: int  # T, tokens on this rank
    transport: str  # "all_to_all": whole [R, C] buffers; "ragged": only the filled rows (GPU/TPU)

    @property
    def num_rows(self) -> int:
        return self.row_source.shape[0]


class Dispatched(NamedTuple):
    """What one rank receives. Expanded layout: x [N, H], expert_ids [N], weights [N]; DeepEP V1 layout
    (``expand=False``): x [R*C, H], expert_ids [R*C, top_k], weights [R*C, top_k]."""

    x: jax.Array | FP8Array  # rows in x's dtype, or an FP8 pair when x was one
    expert_ids: jax.Array  # int32 local expert ids, -1 = padding / not local
    weights: jax.Array  # float32, 0 where expert_ids is -1
    tokens_per_expert: jax.Array  # [local_experts] int32 received (token, expert) pairs
    num_dropped: jax.Array  # [] int32 (token, expert) pairs of this rank's tokens or rows that did not fit
    handle: DispatchHandle


def pair_capacity(num_tokens: int, top_k: int, num_ranks: int, capacity_factor: float | None) -> int:
    """C: rows per (source, destination) buffer. Dropless: every token may go to one rank."""
    if capacity_factor is None:
        return num_tokens
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor: must be positive (or None for dropless), got {capacity_factor}")
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_ranks)))


def expanded_rows(num_tokens: int, top_k: int, num_ranks: int, local_experts: int, capacity: int,
                  capacity_factor: float | None) -> int:
    """N: rows of the expanded layout. Dropless: every received copy may select min(top_k, local) experts."""
    worst = num_ranks * capacity * min(top_k, local_experts)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * num_tokens * top_k)))


# --- the linear maps (a dispatch is expand . exchange . send; a combine is their transpose) -----------

def _exchange(rows: jax.Array, handle: DispatchHandle, *, back: bool = False, fill=0) -> jax.Array:
    """[R*C, ...] send rows -> [R*C, ...] received rows (block r from / back to rank r).

    "ragged" sends only each block's filled rows (``lax.ragged_all_to_all``, which XLA:CPU lacks) into the
    same [R, C] block layout, the rest set to ``fill`` (what a padding row holds), so everything around the
    exchange is shared; ``back`` swaps the counts."""
    r, c = handle.num_ranks, handle.capacity
    if handle.transport == "ragged":
        sent, received = (handle.recv_counts, handle.send_counts) if back else (handle.send_counts, handle.recv_counts)
        starts = jnp.arange(r, dtype=jnp.int32) * c
        at_receiver = jnp.full((r,), jax.lax.axis_index(handle.axis_name) * c, jnp.int32)  # my block there
        return jax.lax.ragged_all_to_all(rows, jnp.full_like(rows, fill), starts, sent, at_receiver, received,
                                         axis_name=handle.axis_name)
    blocks = rows.reshape((r, c) + rows.shape[1:])
    return jax.lax.all_to_all(blocks, handle.axis_name, 0, 0).reshape(rows.shape)


def _send_and_expand(x: jax.Array, handle: DispatchHandle) -> jax.Array:
    """[T, ...] -> [rows, ...]: each token to its ranks, then one row per received (token, local expert)."""
    received = _exchange(pad_row(x)[handle.send_token], handle)
    return pad_row(received)[handle.row_source]


def _collapse_and_return(rows: jax.Array, handle: DispatchHandle, dtype) -> jax.Array:
    """[rows, ...] -> [T, ...] float32: summed per received token, sent back as ``dtype``, summed over ranks."""
    per_copy = jax.ops.segment_sum(rows.astype(jnp.float32), handle.row_source,
                                   handle.num_ranks * handle.capacity + 1)[:-1]
    back = _exchange(per_copy.astype(dtype), handle, back=True)
    return pad_row(back)[handle.send_slot].astype(jnp.float32).sum(axis=1)


_MOVES = row_moves(_send_and_expand, _collapse_and_return)


# --- the public ops --------------------------------------------------------------------------------

def dispatch(x, topk_idx, topk_weights, *, num_experts: int, axis_name: str = "ep",
             capacity_factor: float | None = None, use_fp8: bool = False, expand: bool = True,
             transport: str = "all_to_all") -> Dispatched:
    """Sends this rank's tokens to the ranks of their experts (inside a map binding ``axis_name``).

    Args:
      x: [tokens, hidden] bf16/f32, or an FP8 pair (e4m3 [tokens, hidden], f32 scales [tokens, hidden/128])
        which is moved as is and returned as an FP8 pair (no gradient).
      topk_idx: [tokens, top_k] int global expert ids, -1 = none.
      topk_weights: [tokens, top_k] float gating weights.
      num_experts: experts over the whole axis (a multiple of its size).
      capacity_factor: None = dropless (worst-case buffers); else buffers hold this multiple of the mean
        load and copies beyond them are dropped and counted.
      use_fp8: cast a float x to FP8 (1x128) for the wire; the result is dequantized to x's dtype.
      expand: one row per (token, local expert), sorted by expert (True), or DeepEP V1's per-rank rows.
      transport: "all_to_all" moves whole fixed-capacity buffers (every backend); "ragged" only the filled
        rows, through ``lax.ragged_all_to_all`` (GPU/TPU; XLA:CPU does not implement it).
    Returns:
      ``Dispatched`` (see its fields); ``combine(y, result.handle, result.weights)`` returns the weighted sum.
    """
    fp8_pair = as_fp8_pair(x)
    num_tokens, hidden = check_tokens(x, use_fp8=use_fp8)
    topk_idx = check_topk_idx(topk_idx, num_experts, num_tokens=num_tokens)
    topk_weights = check_topk_weights(jnp.asarray(topk_weights), topk_idx)
    if transport not in TRANSPORTS:
        raise ValueError(f"transport: expected one of {TRANSPORTS}, got {transport!r}")
    num_ranks = jax.lax.axis_size(axis_name)
    local = check_experts_split(num_experts, num_ranks)
    top_k = topk_idx.shape[1]
    capacity = pair_capacity(num_tokens, top_k, num_ranks, capacity_factor)

    valid = valid_ids(topk_idx, num_experts)  # [T, K]
    rank_of = jnp.where(valid, topk_idx // local, num_ranks)  # [T, K], num_ranks = none
    in_rank = is_token_in_rank(topk_idx, num_experts, num_ranks)  # [T, R]
    position = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1  # [T, R] order among the tokens for rank r
    sent = in_rank & (position < capacity)
    send_slot = jnp.where(sent, jnp.arange(num_ranks, dtype=jnp.int32) * capacity + position, num_ranks * capacity)
    token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], send_slot.shape)
    send_token = jnp.full((num_ranks * capacity + 1,), num_tokens, jnp.int32).at[send_slot].set(token)[:-1]

    # Routing metadata per send row: the [top_k] ids local to the destination rank (-1 elsewhere), and weights.
    row_rank = jnp.arange(num_ranks * capacity, dtype=jnp.int32) // capacity  # [R*C]
    ids_rows = pad_row(topk_idx)[send_token]  # [R*C, K]; padding rows hold zeros
    here = (pad_row(rank_of)[send_token] == row_rank[:, None]) & (send_token < num_tokens)[:, None]
    send_counts = sent.sum(axis=0, dtype=jnp.int32)  # [R]
    recv_counts = (jax.lax.all_to_all(send_counts, axis_name, 0, 0, tiled=True) if transport == "ragged"
                   else jnp.full((num_ranks,), capacity, jnp.int32))  # all_to_all moves every buffer row
    received_rows = jnp.arange(num_ranks * capacity, dtype=jnp.int32)
    handle = DispatchHandle(send_slot, send_token, received_rows, send_counts, recv_counts, axis_name, num_ranks,
                            capacity, num_tokens, transport)
    recv_ids = _exchange(jnp.where(here, ids_rows - row_rank[:, None] * local, -1), handle, fill=-1)  # [R*C, K]
    recv_weights = _exchange(jnp.where(here, pad_row(topk_weights)[send_token], 0.0), handle)

    lost_on_send = (valid & ~jnp.take_along_axis(pad_row(sent.T).T, rank_of, axis=1)).sum(dtype=jnp.int32)
    invalid = ((topk_idx != -1) & ~valid).sum(dtype=jnp.int32)
    rows = expanded_rows(num_tokens, top_k, num_ranks, local, capacity, capacity_factor) if expand else None
    landed = received_layout(recv_ids, recv_weights, local, rows)
    handle = dataclasses.replace(handle, row_source=landed.row_source)

    if fp8_pair is not None:
        received = _MOVES.send_fp8(fp8_pair, handle)
    else:
        received = _MOVES.dispatch_x(x, handle, use_fp8)
    return Dispatched(received, landed.expert_ids, landed.weights, landed.tokens_per_expert,
                      lost_on_send + landed.lost + invalid, handle)


def combine(y: jax.Array, handle: DispatchHandle, topk_weights: jax.Array | None = None) -> jax.Array:
    """Sums each token's rows back at its source rank (inside the map that ran the dispatch).

    Args:
      y: [rows, hidden] float, in the layout ``dispatch`` returned (padding rows are ignored).
      handle: the dispatch's handle.
      topk_weights: [rows] float32 weight per row (e.g. ``Dispatched.weights`` of the expanded layout), or
        None for an unweighted sum.
    Returns:
      [tokens, hidden] in y's dtype (accumulated in float32).
    """
    return _MOVES.combine(y, handle, topk_weights)
