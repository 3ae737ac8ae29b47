"""DeepEP's internode normal mode over a two-level ``shard_map``: node-limited, hierarchical dispatch and
combine. For training and prefill when the ep ranks span several nodes.

The ep ranks are two mesh axes, ``node_axis`` (N nodes) x ``local_axis`` (L ranks per node); global rank
``g = node * L + local`` (a leading axis sharded ``P((node_axis, local_axis))``), and expert ``e`` lives on
global rank ``e // experts_per_rank``, so node ``n`` hosts experts ``[n * L * epr, (n + 1) * L * epr)``.

A token crosses between nodes at most once per destination node, then fans out inside it:

    x [T, H] --1: node rows [N, C1, H]--all_to_all(node_axis)--> at rank (n, my local): [N*C1, H]  (RDMA)
             --2: rank rows [L, C2, H]--all_to_all(local_axis)--> at rank (n, l'):      [L*C2, H]  (NVLink)
             --expand--> [rows, H], one row per (token, local expert), grouped by local expert

Step 1 lands a token on the rank of the destination node with the *same* local index; step 2 forwards it
to the ranks of that node that host its experts. ``hierarchical_combine`` is the transpose: rows are summed
per received copy, sent back over ``local_axis``, reduced inside the node (one row per token and node),
sent back over ``node_axis`` and summed at the source, in float32 (wire in y's dtype). The gradient of a
dispatch is a combine and vice versa (``jax.custom_vjp``); ``use_fp8`` moves e4m3 rows with 1x128 float32
scales through both steps (the forwarder does not requantise).

Node-limited routing: DeepSeek-V3 sends each token to at most ``max_nodes`` = 4 nodes. jaxseek's router
gives exactly that with ``n_group = num_nodes`` and ``topk_group = max_nodes``
(``jaxseek.model.router.route``): group ``g`` is experts ``[g * E / n_group, (g + 1) * E / n_group)``, the
experts of node ``g`` under the split above, and top-k is taken inside the ``topk_group`` best groups.
A token whose experts span more nodes is a routing error: it is still delivered (never lost) and counted
in ``num_node_violations``.

Inter-node traffic: ``inter_node_rows`` counts the step-1 rows this rank sends to other nodes (the same
rows come back in combine); ``inter_node_bytes(...)`` computes the per-rank bytes of a routing on the host,
for the hierarchical path or the flat one (``sharding.ep.normal``, one row per destination *rank*).
Payload only (``row_bytes``), as DeepEP's bandwidth figures: routing metadata is not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant import FP8Array
from sharding.ep.layout import (as_fp8_pair, check_experts_split, check_tokens, check_topk_idx, check_topk_weights,
                                pad_row, valid_ids)
from sharding.ep.normal import expanded_rows
from sharding.ep.row_moves import received_layout, row_moves


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("node_send_token", "local_send_row", "row_source"),
                   meta_fields=("node_axis", "local_axis", "num_nodes", "ranks_per_node", "node_capacity",
                                "local_capacity", "num_tokens", "row_bytes"))
@dataclasses.dataclass(frozen=True)
class HierarchicalHandle:
    """How one hierarchical dispatch moved rows; combine and the gradients replay it."""

    node_send_token: jax.Array  # [N * C1] int32 token in each step-1 send row; num_tokens = empty
    local_send_row: jax.Array  # [L * C2] int32 step-1 received row in each step-2 send row; N * C1 = empty
    row_source: jax.Array  # [rows] int32 step-2 received row behind each output row; L * C2 = padding
    node_axis: str
    local_axis: str
    num_nodes: int  # N
    ranks_per_node: int  # L
    node_capacity: int  # C1, rows per (source rank, destination node) pair
    local_capacity: int  # C2, rows per (forwarding rank, destination rank of its node) pair
    num_tokens: int  # T, tokens on this rank
    row_bytes: int  # payload bytes of one step-1 row on the wire

    @property
    def num_rows(self) -> int:
        return self.row_source.shape[0]


class HierarchicalDispatched(NamedTuple):
    """What one rank receives: ``sharding.ep.normal.Dispatched``'s fields, then the inter-node report."""

    x: jax.Array | FP8Array  # [rows, H] in x's dtype, or an FP8 pair when x was one
    expert_ids: jax.Array  # [rows] int32 local expert ids ([rows, top_k] with expand=False), -1 = padding
    weights: jax.Array  # float32, expert_ids' shape, 0 where expert_ids is -1
    tokens_per_expert: jax.Array  # [local_experts] int32 received (token, expert) pairs
    num_dropped: jax.Array  # [] int32 (token, expert) pairs that did not fit a buffer (0 when dropless)
    handle: HierarchicalHandle
    inter_node_rows: jax.Array  # [] int32 step-1 rows this rank sent to other nodes (and gets back in combine)
    num_node_violations: jax.Array  # [] int32 tokens of this rank whose experts span more than max_nodes nodes

    @property
    def inter_node_bytes(self) -> jax.Array:
        """[] int32 payload bytes this rank sent across nodes (exact below 2 GiB per rank and dispatch)."""
        return self.inter_node_rows * self.handle.row_bytes


def row_bytes(hidden: int, dtype) -> int:
    """Payload bytes of one row: FP8 = hidden e4m3 bytes + hidden / 128 float32 scales, else hidden x itemsize."""
    if jnp.dtype(dtype) == jnp.float8_e4m3fn:
        return hidden + hidden // 128 * 4
    return hidden * jnp.dtype(dtype).itemsize


def inter_node_bytes(topk_idx, *, num_experts: int, num_nodes: int, ranks_per_node: int, row_bytes: int,
                     hierarchical: bool = True) -> np.ndarray:
    """Bytes each source rank sends across node boundaries in one dispatch (NumPy, on the host).

    Args:
      topk_idx: [ranks * tokens, top_k] int global routing, rank-major (rank g's tokens are rows
        [g * tokens, (g + 1) * tokens)), -1 = none.
      row_bytes: payload bytes per row (``row_bytes(hidden, dtype)``).
      hierarchical: one row per (token, destination node) as ``hierarchical_dispatch`` sends, or (False)
        one row per (token, destination rank) as the flat ``dispatch`` sends.
    Returns:
      [ranks] int64 bytes; combine sends the same bytes back.
    """
    idx = np.asarray(topk_idx)
    ranks = num_nodes * ranks_per_node
    per_rank = check_experts_split(num_experts, ranks)
    if idx.ndim != 2 or idx.shape[0] % ranks:
        raise ValueError(f"topk_idx: expected [ranks * tokens, top_k] with {ranks} ranks, got shape {idx.shape}")
    tokens = idx.shape[0] // ranks
    source_node = np.arange(idx.shape[0]) // tokens // ranks_per_node  # [ranks * tokens]
    dest_rank = np.where((idx >= 0) & (idx < num_experts), idx // per_rank, -1)  # [ranks * tokens, K]
    num_dest, dest = (num_nodes, dest_rank // ranks_per_node) if hierarchical else (ranks, dest_rank)
    dest = np.where(dest_rank >= 0, dest, -1)
    goes = (dest[:, :, None] == np.arange(num_dest)).any(axis=1)  # [ranks * tokens, num_dest]
    dest_node = np.arange(num_dest) // (1 if hierarchical else ranks_per_node)
    crossing = goes & (dest_node[None] != source_node[:, None])
    return crossing.sum(axis=1).reshape(ranks, tokens).sum(axis=1).astype(np.int64) * row_bytes


# --- the linear maps (a dispatch is expand . forward . send; a combine is their transpose) ------------

def _exchange(rows: jax.Array, axis: str, blocks: int) -> jax.Array:
    """[blocks * C, ...] send rows -> [blocks * C, ...] received rows over ``axis`` (block b from / to b)."""
    return jax.lax.all_to_all(rows.reshape((blocks, -1) + rows.shape[1:]), axis, 0, 0).reshape(rows.shape)


def _send_and_expand(x: jax.Array, h: HierarchicalHandle) -> jax.Array:
    """[T, ...] -> [rows, ...]: across nodes once per node, inside the node once per rank, then expanded."""
    at_node = _exchange(pad_row(x)[h.node_send_token], h.node_axis, h.num_nodes)  # [N*C1, ...]
    at_rank = _exchange(pad_row(at_node)[h.local_send_row], h.local_axis, h.ranks_per_node)  # [L*C2, ...]
    return pad_row(at_rank)[h.row_source]


def _reduce_and_return(rows: jax.Array, h: HierarchicalHandle, dtype) -> jax.Array:
    """[rows, ...] -> [T, ...] float32: summed per copy, back inside the node, reduced there (one row per
    token and node), back across nodes as ``dtype``, summed at the source."""
    per_copy = jax.ops.segment_sum(rows.astype(jnp.float32), h.row_source, h.ranks_per_node * h.local_capacity + 1)
    at_forwarder = _exchange(per_copy[:-1].astype(dtype), h.local_axis, h.ranks_per_node)  # [L*C2, ...]
    per_node = jax.ops.segment_sum(at_forwarder.astype(jnp.float32), h.local_send_row,
                                   h.num_nodes * h.node_capacity + 1)[:-1]  # [N*C1, ...] intra-node reduce
    back = _exchange(per_node.astype(dtype), h.node_axis, h.num_nodes)  # [N*C1, ...]
    return jax.ops.segment_sum(back.astype(jnp.float32), h.node_send_token, h.num_tokens + 1)[:-1]


_MOVES = row_moves(_send_and_expand, _reduce_and_return)


# --- routing one step ------------------------------------------------------------------------------

class _Step(NamedTuple):
    send_row: jax.Array  # [D*C] int32 source row of each send row; rows = empty
    here: jax.Array  # [D*C, K] bool selections of each send row that belong to its destination
    sent: jax.Array  # [rows, D] bool (row, destination) copies that fit
    lost: jax.Array  # [] int32 selections whose destination buffer was full


def _plan_step(dest: jax.Array, num_dest: int, capacity: int) -> _Step:
    """One row per (row, destination) its selections need, ``capacity`` rows per destination.

    dest: [rows, K] int32 destination of each selection, num_dest = none.
    """
    rows = dest.shape[0]
    goes = (dest[:, :, None] == jnp.arange(num_dest)[None, None]).any(axis=1)  # [rows, D]
    position = jnp.cumsum(goes, axis=0, dtype=jnp.int32) - 1  # order among the rows bound for each destination
    sent = goes & (position < capacity)
    slot = jnp.where(sent, jnp.arange(num_dest, dtype=jnp.int32) * capacity + position, num_dest * capacity)
    row = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], slot.shape)
    send_row = jnp.full((num_dest * capacity + 1,), rows, jnp.int32).at[slot].set(row)[:-1]
    slot_dest = jnp.arange(num_dest * capacity, dtype=jnp.int32) // capacity  # [D*C]
    here = pad_row(dest, num_dest)[send_row] == slot_dest[:, None]
    fits = jnp.take_along_axis(jnp.pad(sent, ((0, 0), (0, 1))), dest, axis=1)  # [rows, K]
    return _Step(send_row, here, sent, ((dest < num_dest) & ~fits).sum(dtype=jnp.int32))


def _capacities(num_tokens: int, top_k: int, nodes: int, local: int, max_nodes: int | None,
                capacity_factor: float | None) -> tuple[int, int]:
    """(C1, C2). Dropless: any token may need any node, any forwarded row any rank of the node."""
    if capacity_factor is None:
        return num_tokens, nodes * num_tokens
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor: must be positive (or None for dropless), got {capacity_factor}")
    spread = min(top_k, nodes if max_nodes is None else max_nodes)  # nodes per token, at most
    c1 = max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * spread / nodes)))
    return c1, max(1, min(nodes * c1, math.ceil(capacity_factor * num_tokens * top_k / local)))


# --- the public ops --------------------------------------------------------------------------------

def hierarchical_dispatch(x, topk_idx, topk_weights, *, num_experts: int, node_axis: str = "node",
                          local_axis: str = "local", max_nodes: int | None = None,
                          capacity_factor: float | None = None, use_fp8: bool = False,
                          expand: bool = True) -> HierarchicalDispatched:
    """Sends this rank's tokens to their experts' nodes once, then to the ranks there (inside a map binding
    ``node_axis`` and ``local_axis``).

    Args:
      x: [tokens, hidden] bf16/f32, or an FP8 pair (e4m3 [tokens, hidden], f32 scales [tokens, hidden/128])
        moved as is and returned as an FP8 pair (no gradient).
      topk_idx: [tokens, top_k] int global expert ids, -1 = none.
      topk_weights: [tokens, top_k] float gating weights.
      num_experts: experts over all node x local ranks (a multiple of their number).
      max_nodes: the node limit of the routing (DeepSeek-V3: 4); tokens beyond it are delivered and counted
        in ``num_node_violations``. None: no limit, no check.
      capacity_factor: None = dropless (worst-case buffers); else buffers hold this multiple of the mean
        load and copies beyond them are dropped and counted in ``num_dropped``.
      use_fp8: cast a float x to FP8 (1x128) for the wire; the result is dequantized to x's dtype.
      expand: one row per (token, local expert), sorted by expert (True), or one row per received copy with
        its [top_k] local expert ids (-1 elsewhere): block l' of the L*C2 rows came through rank l' of the node.
    Returns:
      ``HierarchicalDispatched``; ``hierarchical_combine(y, result.handle, result.weights)`` returns the
      weighted sum.
    """
    if node_axis == local_axis:
        raise ValueError(f"node_axis: must differ from local_axis, both are {node_axis!r}")
    if max_nodes is not None and (not isinstance(max_nodes, int) or max_nodes < 1):
        raise ValueError(f"max_nodes: must be a positive int (or None for no limit), got {max_nodes!r}")
    fp8_pair = as_fp8_pair(x)
    num_tokens, hidden = check_tokens(x, use_fp8=use_fp8)
    topk_idx = check_topk_idx(topk_idx, num_experts, num_tokens=num_tokens)
    topk_weights = check_topk_weights(jnp.asarray(topk_weights), topk_idx)
    nodes, ranks_per_node = jax.lax.axis_size(node_axis), jax.lax.axis_size(local_axis)
    per_rank = check_experts_split(num_experts, nodes * ranks_per_node)
    top_k = topk_idx.shape[1]
    c1, c2 = _capacities(num_tokens, top_k, nodes, ranks_per_node, max_nodes, capacity_factor)
    wire = jnp.float8_e4m3fn if (use_fp8 or fp8_pair is not None) else x.dtype

    # Step 1 (RDMA): one row per (token, destination node), to the rank of that node with my local index.
    valid = valid_ids(topk_idx, num_experts)  # [T, K]
    node_of = jnp.where(valid, topk_idx // (per_rank * ranks_per_node), nodes)  # [T, K], nodes = none
    step1 = _plan_step(node_of, nodes, c1)
    handle = HierarchicalHandle(step1.send_row, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), node_axis,
                                local_axis, nodes, ranks_per_node, c1, c2, num_tokens, row_bytes(hidden, wire))
    exchange1 = functools.partial(_exchange, axis=node_axis, blocks=nodes)
    ids1 = exchange1(jnp.where(step1.here, pad_row(topk_idx)[step1.send_row], -1))  # [N*C1, K] global ids
    weights1 = exchange1(jnp.where(step1.here, pad_row(topk_weights)[step1.send_row], 0.0))
    crossing = step1.sent & (jnp.arange(nodes) != jax.lax.axis_index(node_axis))[None]  # [T, N]
    nodes_touched = (node_of[:, :, None] == jnp.arange(nodes)[None, None]).any(axis=1).sum(axis=1)  # [T]
    violations = (jnp.zeros((), jnp.int32) if max_nodes is None
                  else (nodes_touched > max_nodes).sum(dtype=jnp.int32))

    # Step 2 (NVLink): the receiving rank forwards each row to the ranks of its node that host its experts.
    rank_in_node = jnp.where(ids1 >= 0, ids1 // per_rank % ranks_per_node, ranks_per_node)  # [N*C1, K]
    step2 = _plan_step(rank_in_node, ranks_per_node, c2)
    handle = dataclasses.replace(handle, local_send_row=step2.send_row,
                                 row_source=jnp.arange(ranks_per_node * c2, dtype=jnp.int32))
    exchange2 = functools.partial(_exchange, axis=local_axis, blocks=ranks_per_node)
    recv_ids = exchange2(jnp.where(step2.here, pad_row(ids1)[step2.send_row] % per_rank, -1))  # [L*C2, K] local
    recv_weights = exchange2(jnp.where(step2.here, pad_row(weights1)[step2.send_row], 0.0))

    invalid = ((topk_idx != -1) & ~valid).sum(dtype=jnp.int32)
    rows = expanded_rows(num_tokens, top_k, ranks_per_node, per_rank, c2, capacity_factor) if expand else None
    landed = received_layout(recv_ids, recv_weights, per_rank, rows)
    handle = dataclasses.replace(handle, row_source=landed.row_source)

    if fp8_pair is not None:
        received = _MOVES.send_fp8(fp8_pair, handle)
    else:
        received = _MOVES.dispatch_x(x, handle, use_fp8)
    dropped = step1.lost + step2.lost + landed.lost + invalid
    return HierarchicalDispatched(received, landed.expert_ids, landed.weights, landed.tokens_per_expert, dropped, handle,
                                  crossing.sum(dtype=jnp.int32), violations)


def hierarchical_combine(y: jax.Array, handle: HierarchicalHandle, topk_weights: jax.Array | None = None) -> jax.Array:
    """Sums each token's rows back at its source: inside the destination node first, then across nodes once.

    Args:
      y: [rows, hidden] float, in the layout ``hierarchical_dispatch`` returned (padding rows are ignored).
      handle: the dispatch's handle.
      topk_weights: [rows] float32 weight per row (e.g. the expanded ``weights``), or None for an unweighted sum.
    Returns:
      [tokens, hidden] in y's dtype (accumulated in float32).
    """
    return _MOVES.combine(y, handle, topk_weights)
