"""The split-KV tile schedule (FlashMLA's ``get_mla_metadata``), computed once per decode step.

Every sequence costs ``ceil(len / 64)`` KV blocks plus a fixed overhead of 5 blocks (FlashMLA's
``fixed_overhead_num_blocks``: launching a split, its combine). The total cost is divided into
``num_sm_parts`` equal payloads of ``ceil(total / parts) + 5``; a part takes the blocks that fall in its
payload window, so a long sequence is split over several parts and several short ones share a part.
Each (part, sequence) overlap is one work item. Items are listed part by part (``part_offsets``), and the
kernel gives each (part, 64-row query tile) pair one CTA, which walks its part's items in order (FlashMLA's
one CTA per SM part); each item writes its partial softmax to its own slot, numbered sequence by sequence, and
``combine.py`` merges a sequence's slots. The schedule depends only on the lengths and the device's SM count
(never on which implementation runs), so every layer of a decode step reuses it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import HOPPER_SMS, num_sms_of_device

BLOCK_SIZE = 64  # tokens per KV-cache page
FIXED_OVERHEAD_BLOCKS = 5
ROWS_PER_TILE = 64  # query rows (s_q x heads per KV head) per kernel tile


class MLAMetadata(NamedTuple):
    """Split-KV schedule. ``work[i] = (batch, first_block, end_block, slot)``, listed part by part:
    ``work[part_offsets[p]:part_offsets[p + 1]]`` are SM part p's items in sequence order; rows past
    ``part_offsets[-1]`` are empty (``first_block >= end_block``). ``split_offsets[b]:split_offsets[b + 1]`` are
    sequence b's slots."""

    work: jax.Array  # [num_sm_parts + batch, 4] int32
    num_splits: jax.Array  # [batch] int32, splits (work items) per sequence
    split_offsets: jax.Array  # [batch + 1] int32, prefix sum of num_splits
    part_offsets: jax.Array  # [num_sm_parts + 1] int32, prefix sum of the items per part

    @property
    def num_sm_parts(self) -> int:
        return self.part_offsets.shape[0] - 1

    @property
    def num_slots(self) -> int:
        return self.work.shape[0]


def num_sm_parts(num_q_tokens_per_head_k: int, num_heads_k: int, num_sms: int = HOPPER_SMS) -> int:
    """FlashMLA's rule: the SMs left for one (KV head, 64-row query tile) pair, at least 1."""
    row_tiles = -(-num_q_tokens_per_head_k // ROWS_PER_TILE)
    return max(num_sms // num_heads_k // row_tiles, 1)


def get_mla_metadata(cache_seqlens: jax.Array, num_q_tokens_per_head_k: int, num_heads_k: int, *,
                     num_sms: int | None = None) -> MLAMetadata:
    """The schedule for one decode step.

    Args:
      cache_seqlens: [batch] int32 tokens in each sequence's cache (including this step's).
      num_q_tokens_per_head_k: s_q * h_q / h_kv, the query rows that share one KV head.
      num_heads_k: KV heads (1 for MLA).
      num_sms: SMs to plan for; default the device's (Hopper's 132 on a CPU), whichever implementation runs.
    Returns:
      MLAMetadata with ``num_sm_parts + batch`` work slots.
    """
    if cache_seqlens.ndim != 1:
        raise ValueError(f"cache_seqlens: expected [batch], got shape {cache_seqlens.shape}")
    if num_q_tokens_per_head_k < 1 or num_heads_k < 1:
        raise ValueError(f"num_q_tokens_per_head_k, num_heads_k: must be >= 1, got "
                         f"{num_q_tokens_per_head_k}, {num_heads_k}")
    parts = num_sm_parts(num_q_tokens_per_head_k, num_heads_k, num_sms_of_device() if num_sms is None else num_sms)
    batch = cache_seqlens.shape[0]
    blocks = (jnp.maximum(cache_seqlens.astype(jnp.int32), 0) + BLOCK_SIZE - 1) // BLOCK_SIZE  # [batch]
    cost = blocks + jnp.where(blocks > 0, FIXED_OVERHEAD_BLOCKS, 0)
    cost_start = jnp.cumsum(cost) - cost
    payload = (cost.sum() + parts - 1) // parts + FIXED_OVERHEAD_BLOCKS
    # Sequence b's blocks sit at cost positions [cost_start + 5, cost_start + 5 + blocks).
    first_pos = cost_start + FIXED_OVERHEAD_BLOCKS
    window = jnp.arange(parts, dtype=jnp.int32)[:, None] * payload  # [parts, 1]
    lo = jnp.clip(window - first_pos[None], 0, blocks[None])  # [parts, batch]
    hi = jnp.clip(window + payload - first_pos[None], 0, blocks[None])
    overlaps = hi > lo
    # Slots ordered by (batch, part): a sequence's splits get consecutive slots.
    slot = (jnp.cumsum(overlaps.T.reshape(-1)) - 1).reshape(batch, parts).T  # [parts, batch]
    # Rows ordered by (part, batch): a part's items are consecutive, in sequence order.
    flat_overlaps = overlaps.reshape(-1)  # [parts * batch]
    num_items = parts + batch
    target = jnp.where(flat_overlaps, jnp.cumsum(flat_overlaps) - 1, num_items)  # non-overlaps are dropped
    batch_ids = jnp.tile(jnp.arange(batch, dtype=jnp.int32), parts)
    work = jnp.zeros((num_items, 4), jnp.int32)
    for field, value in enumerate((batch_ids, lo.reshape(-1), hi.reshape(-1), slot.reshape(-1))):
        work = work.at[target, field].set(value.astype(jnp.int32), mode="drop")
    num_items_used = flat_overlaps.sum()
    unused = jnp.arange(num_items) >= num_items_used  # empty rows take the slots no item writes
    work = work.at[:, 3].set(jnp.where(unused, jnp.arange(num_items, dtype=jnp.int32), work[:, 3]))
    num_splits = overlaps.sum(0).astype(jnp.int32)
    split_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(num_splits)]).astype(jnp.int32)
    part_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(overlaps.sum(1))]).astype(jnp.int32)
    return MLAMetadata(work, num_splits, split_offsets, part_offsets)
