"""Row-tile schedules: how each grouped GEMM layout becomes a list of work tiles for the kernel.

Every layout is reduced to the same table, one row per tile of ``tile_m`` rows of A (and of the
output), computed with jnp so it works under ``jit`` on traced group sizes:

    tiles[t] = (group, a_block, out_block, lo, hi, k_step_start, k_steps)

The kernel multiplies A rows ``[a_block * tile_m, (a_block + 1) * tile_m)`` by group ``group``'s B over
the 128-wide K steps ``[k_step_start, k_step_start + k_steps)`` and stores rows ``lo <= r < hi`` of the
result to output row ``out_block * tile_m + r``. A tile with ``lo >= hi`` is skipped. Ragged groups share a boundary tile (megablox's scheme), so a
contiguous layout with G groups over M rows needs at most ``ceil(M / tile_m) + G - 1`` tiles and no
per-group padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TILE_FIELDS = 7


def _table(group, a_block, out_block, lo, hi, k_start, k_steps) -> jax.Array:
    """[tiles, 7] int32 from per-field values (scalars broadcast)."""
    ones = jnp.ones_like(a_block, jnp.int32)
    return jnp.stack([jnp.asarray(v, jnp.int32) * ones
                      for v in (group, a_block, out_block, lo, hi, k_start, k_steps)], axis=1)


def _rows_within(block, tile_m, first_row, end_row):
    """(lo, hi) within the tile at ``block`` of the absolute row range [first_row, end_row)."""
    base = block * tile_m
    return jnp.clip(first_row - base, 0, tile_m), jnp.clip(end_row - base, 0, tile_m)


def dense_tiles(m: int, m_pad: int, tile_m: int, k_steps: int) -> jax.Array:
    """One group: [m_pad / tile_m, 7]."""
    block = jnp.arange(m_pad // tile_m, dtype=jnp.int32)
    lo, hi = _rows_within(block, tile_m, 0, m)
    return _table(0, block, block, lo, hi, 0, k_steps)


def contiguous_tiles(group_starts: jax.Array, group_ends: jax.Array, m_pad: int, tile_m: int,
                     k_steps: int) -> jax.Array:
    """Groups owning contiguous row ranges ``[start_g, end_g)`` (gaps between them are skipped rows).

    Args:
      group_starts, group_ends: [G] int32, with start_g <= end_g; empty groups have start_g == end_g.
    Returns:
      [m_pad / tile_m + G - 1, 7] int32.
    """
    num_groups = group_starts.shape[0]
    num_slots = m_pad // tile_m + num_groups - 1
    nonempty = group_ends > group_starts
    first_block = group_starts // tile_m
    last_block = jnp.maximum(group_ends - 1, 0) // tile_m
    tiles_per_group = jnp.where(nonempty, last_block - first_block + 1, 0)  # [G]
    ends = jnp.cumsum(tiles_per_group)
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), num_groups - 1).astype(jnp.int32)
    block = first_block[group] + slot - (ends[group] - tiles_per_group[group])
    used = slot < ends[-1]
    block = jnp.where(used, block, 0)
    lo, hi = _rows_within(block, tile_m, group_starts[group], jnp.where(used, group_ends[group], 0))
    return _table(group, block, block, lo, hi, 0, k_steps)


def masked_tiles(masked_m: jax.Array, m_max_pad: int, tile_m: int, k_steps: int) -> jax.Array:
    """Group g owns rows ``[g * m_max_pad, g * m_max_pad + masked_m[g])`` of the flattened [G * m_max_pad] rows.

    Returns:
      [G * m_max_pad / tile_m, 7] int32; tiles past a group's masked_m are empty.
    """
    num_groups = masked_m.shape[0]
    per_group = m_max_pad // tile_m
    slot = jnp.arange(num_groups * per_group, dtype=jnp.int32)
    group, local = slot // per_group, slot % per_group
    hi = jnp.clip(jnp.clip(masked_m.astype(jnp.int32), 0, m_max_pad)[group] - local * tile_m, 0, tile_m)
    return _table(group, slot, slot, 0, hi, 0, k_steps)


def k_grouped_tiles(group_ks: jax.Array, m: int, m_pad: int, tile_m: int, block_k: int) -> jax.Array:
    """K-grouped (weight-gradient) layout: group g contracts K steps of its own token range and writes
    output rows ``[g * m_pad, g * m_pad + m)`` of the stacked [G * m_pad] output.

    Args:
      group_ks: [G] int32, tokens per group, each a multiple of ``block_k``.
    Returns:
      [G * m_pad / tile_m, 7] int32; groups with no tokens have empty tiles (the caller zeroes them).
    """
    num_groups = group_ks.shape[0]
    per_group = m_pad // tile_m
    steps = group_ks.astype(jnp.int32) // block_k
    step_start = jnp.cumsum(steps) - steps
    slot = jnp.arange(num_groups * per_group, dtype=jnp.int32)
    group, local = slot // per_group, slot % per_group
    lo, hi = _rows_within(local, tile_m, 0, m)
    return _table(group, local, slot, lo, jnp.where(steps[group] > 0, hi, 0), step_start[group], steps[group])
