"""Grouped matmul for the MoE expert layer: rows sorted by expert, each group times its own weight.

Contract shared by every variant, ``(x, w, group_sizes) -> y``:

    x            [rows, in]          float, rows sorted by group into consecutive runs
    w            [groups, in, out]   float (cast to x's dtype), one weight per group
    group_sizes  [groups]            int, rows per group; sum(group_sizes) <= rows
    y            [rows, out]         x's dtype; row r = x[r] @ w[group of r], rows past the sum are 0

All variants are dropless (any sizes: empty groups, one group holding every row), jit-able (static
shapes), accumulate in float32, and are differentiable in x and w (first order: ``jax.grad`` and
``jax.vjp``).

Variants (``GROUPED_MATMULS``):
- ``"ragged_dot"``: ``lax.ragged_dot``, native on GPU/TPU. XLA:CPU lowers it to a masked dense
  product over every group: ``groups`` x the ideal FLOPs and a [groups, rows, out]-sized temporary.
- ``"tiled"``: each group's rows are cut into tiles of a static size (``plan_tiles``), so a group pads
  to a tile multiple; a loop over the tiles actually used multiplies [tile, in] by that tile's group
  weight, read by dynamic index (no [tiles, in, out] weight copy), and writes the tile's rows back in
  place. Work <= rows + groups * (tile - 1) padded rows < 2 * rows. ``jax.custom_vjp``: one backward
  loop computes dx (same tiles, w transposed) and accumulates dw in float32.
- ``"capacity"``: a capacity-padded batched einsum [groups, capacity, in] x [groups, in, out] with
  capacity = rows, the only static capacity that is dropless for every routing: ``groups`` x the ideal
  FLOPs and a [groups, rows, in] + [groups, rows, out] buffer. Kept as the measured baseline.

``grouped_matmul_for(platform)`` names the variant to use per backend.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def check_grouped_matmul_args(x, w, group_sizes) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x, w, group_sizes) as arrays, group_sizes int32; ``ValueError`` naming the argument when shapes
    or dtypes break the contract."""
    x, w, group_sizes = jnp.asarray(x), jnp.asarray(w), jnp.asarray(group_sizes)
    if jnp.ndim(x) != 2:
        raise ValueError(f"x: expected [rows, in], got shape {jnp.shape(x)}")
    if jnp.ndim(w) != 3:
        raise ValueError(f"w: expected [groups, in, out], got shape {jnp.shape(w)}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w: expected in-dim {x.shape[1]} (x's last dim), got shape {w.shape}")
    if jnp.shape(group_sizes) != (w.shape[0],):
        raise ValueError(f"group_sizes: expected shape ({w.shape[0]},) (one per group of w), "
                         f"got {jnp.shape(group_sizes)}")
    if not jnp.issubdtype(jnp.result_type(group_sizes), jnp.integer):
        raise ValueError(f"group_sizes: expected an integer dtype, got {jnp.result_type(group_sizes)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"x: expected a floating dtype, got {jnp.result_type(x)}")
    return x, w, group_sizes.astype(jnp.int32)


# ----------------------------------------------------------------------------------------- ragged_dot


def ragged_dot_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``lax.ragged_dot`` with float32 accumulation; see the module docstring for the contract.

    Args:
      x: [rows, in] float, rows sorted by group.
      w: [groups, in, out] float, cast to x's dtype.
      group_sizes: [groups] int, rows per group, sum <= rows.
    Returns:
      [rows, out] x.dtype; rows past sum(group_sizes) are 0.
    """
    x, w, group_sizes = check_grouped_matmul_args(x, w, group_sizes)
    y = lax.ragged_dot(x, w.astype(x.dtype), group_sizes,
                       preferred_element_type=jnp.float32)  # [rows, out] f32
    return y.astype(x.dtype)


# -------------------------------------------------------------------------------------------- tiled


class TilePlan(NamedTuple):
    """Static tiling of a grouped matmul: every group is cut into ``tile``-row tiles.

    ``max_tiles`` bounds the tiles any group sizes can need: sum_g ceil(s_g / tile)
    <= (rows + groups * (tile - 1)) // tile.
    """

    tile: int  # rows per tile
    max_tiles: int  # static upper bound on tiles used


def plan_tiles(rows: int, groups: int, tile: int | None = None) -> TilePlan:
    """Chooses the tile size statically from (rows, groups).

    Default: the largest power of two <= rows / groups (at least 1), so the padded rows
    rows + groups * (tile - 1) stay below 2 * rows while tiles stay as large as the routing allows.
    """
    if groups < 1:
        raise ValueError(f"groups: expected >= 1, got {groups}")
    if tile is None:
        tile = 1 << max(0, (max(rows, 1) // groups).bit_length() - 1)
    if tile < 1:
        raise ValueError(f"tile: expected >= 1, got {tile}")
    return TilePlan(tile, max(1, (rows + groups * (tile - 1)) // tile))  # >= 1 so tile arrays are never empty


class TileMap(NamedTuple):
    """Which rows each tile covers, for one set of group sizes (traced; ``TilePlan.max_tiles`` long)."""

    group: jax.Array  # [max_tiles] int32, group (weight index) of each tile
    row_start: jax.Array  # [max_tiles] int32, first row of the tile in x
    row_end: jax.Array  # [max_tiles] int32, end of the tile's group in x (rows >= it are not the tile's)
    num_tiles: jax.Array  # [] int32, tiles in use; tiles past it cover no rows


def tile_map(group_sizes: jax.Array, plan: TilePlan) -> TileMap:
    """Lays each group's rows into ``plan.tile``-row tiles, groups in order, empty groups taking none.

    Args:
      group_sizes: [groups] int, rows per group.
    """
    sizes = group_sizes.astype(jnp.int32)  # [groups]
    group_end = jnp.cumsum(sizes)  # [groups] first row after each group
    tiles_per_group = (sizes + plan.tile - 1) // plan.tile  # [groups]
    tile_end = jnp.cumsum(tiles_per_group)  # [groups] first tile after each group
    t = jnp.arange(plan.max_tiles, dtype=jnp.int32)  # [max_tiles]
    group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), sizes.shape[0] - 1).astype(jnp.int32)
    first_tile = (tile_end - tiles_per_group)[group]  # [max_tiles]
    row_start = (group_end - sizes)[group] + (t - first_tile) * plan.tile  # [max_tiles]
    used = t < tile_end[-1]
    return TileMap(group, jnp.where(used, row_start, 0), jnp.where(used, group_end[group], 0), tile_end[-1])


def _tile_loop(body: Callable, carry, tiles: TileMap, max_tiles: int, unroll: bool):
    """Runs ``body(t, carry)`` over the used tiles: a while loop, or all ``max_tiles`` unrolled."""
    if unroll:
        for t in range(max_tiles):
            carry = body(t, carry)
        return carry
    return lax.fori_loop(0, tiles.num_tiles, body, carry)


def _tile_rows(tiles: TileMap, t, tile: int):
    """(first row, [tile] bool mask of the rows that belong to tile t)."""
    start = tiles.row_start[t]
    return start, start + jnp.arange(tile, dtype=jnp.int32) < tiles.row_end[t]


def _tiled_products(lhs: jax.Array, w: jax.Array, tiles: TileMap, plan: TilePlan, transpose_w: bool,
                    unroll: bool) -> jax.Array:
    """Each used tile's rows of ``lhs`` times its group's weight, written in place; other rows 0.

    Args:
      lhs: [rows + tile, k] rows sorted by group, padded by one tile so no tile slice is clamped.
      w: [groups, k, n], or [groups, n, k] with ``transpose_w`` (contracts w's last dim).
    Returns:
      [rows + tile, n] lhs.dtype.
    """
    n = w.shape[1] if transpose_w else w.shape[2]
    contract = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))

    def body(t, y):  # y: [rows + tile, n]
        start, mask = _tile_rows(tiles, t, plan.tile)
        a = lax.dynamic_slice_in_dim(lhs, start, plan.tile, 0)  # [tile, k]
        wg = lax.dynamic_index_in_dim(w, tiles.group[t], 0, keepdims=False)  # [k, n] or [n, k]
        out = lax.dot_general(a, wg, contract, preferred_element_type=jnp.float32)  # [tile, n] f32
        old = lax.dynamic_slice_in_dim(y, start, plan.tile, 0)  # [tile, n]
        return lax.dynamic_update_slice_in_dim(y, jnp.where(mask[:, None], out.astype(y.dtype), old), start, 0)

    return _tile_loop(body, jnp.zeros((lhs.shape[0], n), lhs.dtype), tiles, plan.max_tiles, unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled(x_pad: jax.Array, w: jax.Array, group_sizes: jax.Array, plan: TilePlan, unroll: bool) -> jax.Array:
    """[rows + tile, in] x [groups, in, out] -> [rows + tile, out], same dtype as x_pad."""
    return _tiled_products(x_pad, w, tile_map(group_sizes, plan), plan, False, unroll)


def _tiled_fwd(x_pad, w, group_sizes, plan, unroll):
    tiles = tile_map(group_sizes, plan)
    return _tiled_products(x_pad, w, tiles, plan, False, unroll), (x_pad, w, tiles)


def _tiled_bwd(plan, unroll, residuals, dy_pad):
    """dx = dy @ w[g]^T over the same tiles; dw[g] += x_tile^T @ dy_tile, float32, in one loop."""
    x_pad, w, tiles = residuals  # [rows + tile, in], [groups, in, out], TileMap
    dy_pad = dy_pad.astype(x_pad.dtype)  # [rows + tile, out]

    def body(t, carry):
        dx, dw = carry  # [rows + tile, in] x.dtype, [groups, in, out] f32
        start, mask = _tile_rows(tiles, t, plan.tile)
        g = tiles.group[t]
        a = jnp.where(mask[:, None], lax.dynamic_slice_in_dim(x_pad, start, plan.tile, 0), 0)  # [tile, in]
        b = jnp.where(mask[:, None], lax.dynamic_slice_in_dim(dy_pad, start, plan.tile, 0), 0)  # [tile, out]
        wg = lax.dynamic_index_in_dim(w, g, 0, keepdims=False)  # [in, out]
        da = lax.dot_general(b, wg, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [tile, in]
        old = lax.dynamic_slice_in_dim(dx, start, plan.tile, 0)  # [tile, in]
        dx = lax.dynamic_update_slice_in_dim(dx, jnp.where(mask[:, None], da.astype(dx.dtype), old), start, 0)
        dwg = lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # [in, out]
        dw = lax.dynamic_update_index_in_dim(dw, lax.dynamic_index_in_dim(dw, g, 0, keepdims=False) + dwg, g, 0)
        return dx, dw

    init = (jnp.zeros_like(x_pad), jnp.zeros(w.shape, jnp.float32))
    dx, dw = _tile_loop(body, init, tiles, plan.max_tiles, unroll)
    return dx, dw.astype(w.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, tile: int | None = None,
                         unroll: bool = False) -> jax.Array:
    """Grouped matmul over per-group row tiles; work bounded by < 2x the ideal (see ``plan_tiles``).

    Args:
      x: [rows, in] float, rows sorted by group.
      w: [groups, in, out] float, cast to x's dtype.
      group_sizes: [groups] int, rows per group, sum <= rows.
      tile: rows per tile (static); default from ``plan_tiles``.
      unroll: unroll the loop over all ``max_tiles`` (static) instead of a while loop over the used
        tiles. Same result; meant for ``cost_analysis``, which counts a loop body once.
    Returns:
      [rows, out] x.dtype; rows past sum(group_sizes) are 0.
    """
    x, w, group_sizes = check_grouped_matmul_args(x, w, group_sizes)
    rows = x.shape[0]
    plan = plan_tiles(rows, w.shape[0], tile)
    x_pad = jnp.pad(x, ((0, plan.tile), (0, 0)))  # [rows + tile, in]
    return _tiled(x_pad, w.astype(x.dtype), group_sizes, plan, unroll)[:rows]


# ----------------------------------------------------------------------------------------- capacity


def capacity_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Batched einsum over a [groups, capacity = rows, in] buffer (dropless for any routing).

    Args:
      x: [rows, in] float, rows sorted by group.
      w: [groups, in, out] float, cast to x's dtype.
      group_sizes: [groups] int, rows per group, sum <= rows.
    Returns:
      [rows, out] x.dtype; rows past sum(group_sizes) are 0.
    """
    x, w, group_sizes = check_grouped_matmul_args(x, w, group_sizes)
    rows, groups = x.shape[0], w.shape[0]
    sizes = group_sizes  # [groups] int32
    group_end = jnp.cumsum(sizes)  # [groups]
    r = jnp.arange(rows, dtype=jnp.int32)  # [rows]
    group = jnp.searchsorted(group_end, r, side="right").astype(jnp.int32)  # [rows], == groups past the sum
    slot = r - (group_end - sizes)[jnp.minimum(group, groups - 1)]  # [rows] position within its group
    buffer = jnp.zeros((groups, rows, x.shape[1]), x.dtype).at[group, slot].set(x, mode="drop")  # [g, cap, in]
    out = jnp.einsum("gci,gio->gco", buffer, w.astype(x.dtype), preferred_element_type=jnp.float32)
    y = out.at[group, slot].get(mode="fill", fill_value=0)  # [rows, out] f32, 0 past the sum
    return y.astype(x.dtype)


# ------------------------------------------------------------------------------------ name -> function

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

GROUPED_MATMULS: types.MappingProxyType[str, GroupedMatmul] = types.MappingProxyType({
    "ragged_dot": ragged_dot_grouped_matmul,
    "tiled": tiled_grouped_matmul,
    "capacity": capacity_grouped_matmul,
})

# Measured choice per backend (benchmarks/grouped_matmul.py); backends not listed use lax.ragged_dot.
_BACKEND_CHOICE = types.MappingProxyType({"cpu": "tiled", "gpu": "ragged_dot", "cuda": "ragged_dot",
                                          "rocm": "ragged_dot", "tpu": "ragged_dot"})


def grouped_matmul_for(platform: str) -> str:
    """The variant name to use on ``platform`` (``jax.default_backend()`` or a device's ``platform``).

    "cpu" -> "tiled" (XLA:CPU's ragged_dot does groups x the work); "gpu"/"cuda"/"rocm"/"tpu" and any
    other backend -> "ragged_dot" (native there). Measured by ``benchmarks/grouped_matmul.py`` at 4096 rows,
    256 x 256, f32: on 2 CPU cores tiled ran 256 experts in 20 ms against ragged_dot's 1.2 s; on an H200
    (jax 0.11.2) ragged_dot took 0.17 / 0.55 / 1.2 ms at 8 / 64 / 256 experts against tiled's
    0.42 / 2.4 / 8.9 ms (a GPU while loop pays ~15 us per tile).
    """
    return _BACKEND_CHOICE.get(platform.lower(), "ragged_dot")


def get_grouped_matmul(name: str | None = None) -> GroupedMatmul:
    """The variant called ``name``; ``None`` picks ``grouped_matmul_for(jax.default_backend())``."""
    name = grouped_matmul_for(jax.default_backend()) if name is None else name
    if name not in GROUPED_MATMULS:
        raise ValueError(f"name: expected one of {tuple(GROUPED_MATMULS)}, got {name!r}")
    return GROUPED_MATMULS[name]
