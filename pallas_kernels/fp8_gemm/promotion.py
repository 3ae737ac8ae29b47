"""Promotion: how one K step's wgmma partial sum enters the f32 accumulator with its A and B scales.

``KernelConfig.promotion`` picks one (the default is the one measured fastest so far):

- ``"per_column"`` (default; 924 TFLOPS at 4096x7168x16384 on an H200): B scales expanded in XLA to one per
  output column ([g, k / 128, n_pad + 32] f32); per K step each compute warpgroup reads its 64 row scales
  and tile_n column scales after the wgmma and forms ``acc + partial * (sa[:, None] * sb[None, :])``: two
  multiplies and an add per element, and a [tile_n] scale vector held in registers. Works for any B scale
  granularity (the k-grouped weight-gradient GEMM's B scales are per column).
- ``"tile_scalar"`` (DeepGEMM's): B's 128x128 block scales stay compact ([g, k / 128, ~ceil(n_pad / 128) + 32],
  a transpose of the API's scales, no per-column expansion); per K step the pipeline brings the two block
  scales the tile can touch; before issuing the wgmma the warpgroup forms the [64] row vector
  ``sa * sb_block`` once, then promotes with ONE multiply-add per element, ``acc + partial * row[:, None]``.
  A tile that straddles a 128-column scale block (tile_n not dividing 128) takes the second block's row
  vector past the boundary column (a compare and select per element, DeepGEMM's predicated pair); widths
  dividing 128 never straddle and skip it. Needs every tile within two scale blocks:
  tile_n <= 128 + gcd(tile_n, 128). Only for 128x128 B scales (not the k-grouped GEMM). Lowers for CUDA and
  runs in the interpreter; its speed is unmeasured.

Both still zero a fresh accumulator per K step (Mosaic's wgmma has no overwrite form). By default the
pipeline stage is released when the step returns, after the promotion; with ``KernelConfig.early_release`` the
step arrives on the stage's consumed barriers right after the wgmma wait and the scale reads, before the
promotion (DeepGEMM's order; its speed is unmeasured).
``k_weight`` (interpreter only, k-grouped surplus steps) is folded into the row scales.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_gemm.interpreter_differences import in_layout

BLOCK_N = 128  # B's scale blocks are 128 x 128
SCALE_ALIGN = 32  # f32 scale tiles are padded to 32 columns: TMA needs 128-byte-aligned SMEM slots
PROMOTIONS = ("per_column", "tile_scalar")
WG_ROWS = 64


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def check_promotion(promotion: str, tile_n: int) -> None:
    if promotion not in PROMOTIONS:
        raise ValueError(f"promotion: expected one of {PROMOTIONS}, got {promotion!r}")
    if promotion == "tile_scalar" and tile_n > BLOCK_N + math.gcd(tile_n, BLOCK_N):
        raise ValueError(f"promotion: 'tile_scalar' needs tiles within two 128-column scale blocks "
                         f"(tile_n <= 128 + gcd(tile_n, 128)), got tile_n={tile_n}")


def scale_columns(config) -> int:
    """Columns of the B-scale tile the pipeline brings per K step."""
    return round_up(config.tile_n, SCALE_ALIGN) if config.promotion == "per_column" else SCALE_ALIGN


def b_scale_operand(sb: jax.Array, kind: str, n: int, n_pad: int, promotion: str) -> jax.Array:
    """The kernel's B-scale operand, built in XLA.

    Args:
      sb: [g, ceil(n / 128), kb] float32 128x128 block scales (``kind="blocks"``) or [g, kb, n] per output
        column (``kind="columns"``, the weight-gradient recipe).
    Returns:
      per_column: [g, kb, n_pad + 32]; tile_scalar: [g, kb, round_up(ceil(n_pad / 128) + 32, 4)] (needs ``kind="blocks"``).
    """
    if promotion == "tile_scalar":
        if kind != "blocks":
            raise ValueError("promotion: 'tile_scalar' needs 128x128 block scales for B; this op's B scales are "
                             "per column (use 'per_column')")
        blocks = jnp.swapaxes(sb, -1, -2)
        return _pad_last(blocks, round_up(-(-n_pad // BLOCK_N) + SCALE_ALIGN, 4))  # TMA: 16-byte row strides
    if kind == "blocks":
        sb = jnp.swapaxes(jnp.repeat(sb, BLOCK_N, axis=-2)[..., :n, :], -1, -2)
    return _pad_last(sb, n_pad + SCALE_ALIGN)


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def b_scale_tile(sb_group, k_blocks, n_idx, config):
    """This tile's B scales per K step: its columns' scales, or the scale blocks from the tile's first one."""
    if config.promotion == "per_column":
        return sb_group.at[k_blocks, pl.ds(n_idx * config.tile_n, scale_columns(config))]
    return sb_group.at[k_blocks, pl.ds((n_idx * config.tile_n) // BLOCK_N, SCALE_ALIGN)]


def scales_before_mma(config) -> bool:
    """tile_scalar reads its scales before issuing the wgmma (their latency hides behind it); per_column
    after (as measured)."""
    return config.promotion == "tile_scalar"


def straddles(config) -> bool:
    """Whether some tile can span two 128-column scale blocks (its width does not divide 128)."""
    return BLOCK_N % config.tile_n != 0


def load_scales(sa_smem, sb_smem, rows, n_idx, k_weight, config):
    """Reads this K step's scales into registers.

    sa_smem: [1, tile_m] f32; sb_smem: [1, scale_columns] f32; rows: this warpgroup's 64 rows.
    Returns per_column: (sa [64], sb [tile_n]); tile_scalar: (row0 [64],) or (row0, row1 [64], boundary i32).
    """
    sa = in_layout(sa_smem[0, rows], plgpu.Layout.WGMMA.reduce(1), config)  # [64]
    if k_weight is not None:
        sa = sa * k_weight
    if config.promotion == "per_column":
        return sa, in_layout(sb_smem[0, pl.ds(0, config.tile_n)], plgpu.Layout.WGMMA.reduce(0), config)
    row0 = sa * sb_smem[0, 0]
    if not straddles(config):
        return (row0,)
    boundary = BLOCK_N - (n_idx * config.tile_n) % BLOCK_N  # the tile's columns in its first scale block
    return row0, sa * sb_smem[0, 1], boundary


def promote(acc: jax.Array, partial: jax.Array, scales, config) -> jax.Array:
    """acc + partial * scale, in f32. acc, partial: [64, tile_n] f32."""
    shape = partial.shape
    if config.promotion == "per_column":
        sa, sb = scales
        return acc + partial * (lax.broadcast_in_dim(sa, shape, [0]) * lax.broadcast_in_dim(sb, shape, [1]))
    if len(scales) == 1:
        return acc + partial * lax.broadcast_in_dim(scales[0], shape, [0])
    row0, row1, boundary = scales
    cols = in_layout(lax.broadcasted_iota(jnp.int32, shape, 1), plgpu.Layout.WGMMA, config)
    scale = jnp.where(cols < boundary, lax.broadcast_in_dim(row0, shape, [0]), lax.broadcast_in_dim(row1, shape, [0]))
    return acc + partial * scale
