"""The Hopper FP8 GEMM with fine-grained scaling, as a Pallas Mosaic GPU kernel.

One persistent, warp-specialised kernel serves every m-grouped layout (normal, contiguous, masked):
the wrapper turns the layout into a schedule of row tiles (``schedule.py``), each owned by one
group, and the kernel walks (row tile, column tile) pairs over a grid of one CTA per SM.

Per CTA: a memory warpgroup streams, per 128-wide K step, the A tile [tile_m, 128] e4m3, the B tile
[tile_n, 128] e4m3 (K-major: FP8 wgmma cannot transpose), the A scales [tile_m] and the per-column
B scales [tile_n] through a ``max_concurrent_steps``-deep TMA pipeline. Two compute warpgroups each own
64 rows: per K step they run e4m3 wgmma into a fresh f32 accumulator and promote it on the CUDA cores,
``acc += partial * sa[:, None] * sb[None, :]`` (DeepSeek-V3's two-level accumulation: the tensor
core's limited-precision sums never span more than 128 of K). The epilogue casts, stages in SMEM and
stores with TMA, only the rows of the tile's group (a ladder of power-of-two row stores).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_K = 128  # one scale per 128 of K: the promotion interval
WG_ROWS = 64  # rows per compute warpgroup (the wgmma M granularity)
NUM_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static shape of one kernel launch.

    tile_n: output columns per CTA tile (multiple of 8, at most 256).
    max_concurrent_steps: TMA pipeline depth (K steps in flight).
    num_sms: persistent CTAs.
    for_interpreter: trace the variant the CPU interpreter can run (jax 0.10-0.11): B in [k, n] layout
      (it cannot yet run a wgmma on a transposed operand) and no register layout casts (it has no rule
      for them). The GPU kernel is the default: K-major B, which FP8 wgmma requires.
    """

    tile_n: int
    max_concurrent_steps: int
    num_sms: int
    for_interpreter: bool = False
    debug: str = ""

    @property
    def tile_m(self) -> int:
        return WG_ROWS * NUM_COMPUTE_WGS

    @property
    def b_layout(self) -> str:
        return "kn" if self.for_interpreter else "nk"

    def layout(self, x: jax.Array, layout) -> jax.Array:
        """Places a register array in a Mosaic GPU layout (a no-op for the interpreter)."""
        return x if self.for_interpreter else plgpu.layout_cast(x, layout)


def _store_rows(out_smem, out_gmem, first, count, max_rows: int):
    """Stores ``count`` (dynamic, 0..max_rows) rows of ``out_smem`` starting at row ``first`` to the same
    rows of ``out_gmem`` with TMA, as a ladder of power-of-two row copies (TMA boxes are static)."""
    offset = first
    size = max_rows
    while size > 0:
        rows = 1 << int(math.log2(size))
        size //= 2

        @pl.when((count & rows) != 0)
        def _():
            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(offset, rows)], out_gmem.at[pl.ds(offset, rows)])

        offset = offset + (count & rows)


def _kernel(a_gmem, sa_gmem, b_gmem, sb_gmem, tiles_gmem, out_gmem, *, config: KernelConfig, n: int):
    # a_gmem:     [m_pad, k] e4m3            sa_gmem: [k / 128, m_pad] f32 (MN-major A scales)
    # b_gmem:     [g, n, k] e4m3 ("nk") or [g, k, n] ("kn")
    # sb_gmem:    [g, k / 128, n] f32 (B scales, one per output column)
    # tiles_gmem: [num_row_tiles, 4] int32: (group, row block, first row, end row); empty when first >= end
    # out_gmem:   [m_pad, n] out dtype
    k = a_gmem.shape[1]
    tile_m, tile_n = config.tile_m, config.tile_n
    k_steps = k // BLOCK_K
    n_tiles = n // tile_n
    num_row_tiles = tiles_gmem.shape[0]
    out_dtype = out_gmem.dtype
    fp8_transforms = (plgpu.TilingTransform((8, BLOCK_K)), plgpu.SwizzleTransform(128))
    b_block = (tile_n, BLOCK_K) if config.b_layout == "nk" else (BLOCK_K, tile_n)
    b_index = (lambda s: (0, s)) if config.b_layout == "nk" else (lambda s: (s, 0))
    if config.b_layout == "kn":  # the "kn" tile is [128, tile_n]: swizzle along n
        swizzle = plgpu.find_swizzle(tile_n * 8)
        b_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    else:
        b_transforms = fp8_transforms

    def make_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tile_m, BLOCK_K), lambda s: (0, s), transforms=fp8_transforms),
                plgpu.BlockSpec(b_block, b_index, transforms=b_transforms),
                plgpu.BlockSpec((1, tile_m), lambda s: (s, 0)),
                plgpu.BlockSpec((1, tile_n), lambda s: (s, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=NUM_COMPUTE_WGS,
            max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the body)

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=make_pipeline(ignore, ignore).get_allocations(
            a_gmem, b_gmem.at[0], sa_gmem, sb_gmem.at[0]),
        out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, WG_ROWS, tile_n), out_dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_row_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(loop_info):
            (linear,) = loop_info.index
            row_tile, n_idx = linear // n_tiles, linear % n_tiles
            group = tiles_gmem[row_tile, 0]
            m_block = tiles_gmem[row_tile, 1]
            first_row = tiles_gmem[row_tile, 2]
            end_row = tiles_gmem[row_tile, 3]
            m_slice = pl.ds(m_block * tile_m, tile_m)
            n_slice = pl.ds(n_idx * tile_n, tile_n)

            @pl.when(first_row < end_row)
            def _work():
                def compute_context(eval_pipeline):
                    zeros = config.layout(jnp.zeros((WG_ROWS, tile_n), jnp.float32), plgpu.Layout.WGMMA)
                    acc = eval_pipeline(zeros)  # [64, tile_n] f32, promoted sum over K
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store read out_smem
                    out_smem[wg] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    wg_first = m_block * tile_m + wg * WG_ROWS  # first global row of this warpgroup
                    lo = jnp.clip(first_row - wg_first, 0, WG_ROWS)
                    hi = jnp.clip(end_row - wg_first, 0, WG_ROWS)
                    if "plainstore" in config.debug:
                        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[pl.ds(wg_first, WG_ROWS), n_slice])
                    else:
                        _store_rows(out_smem.at[wg], out_gmem.at[pl.ds(wg_first, WG_ROWS), n_slice],
                                    lo, jnp.maximum(hi - lo, 0), WG_ROWS)

                def step(_, a_smem, b_smem, sa_smem, sb_smem, acc):
                    # a_smem [tile_m, 128] e4m3; b_smem [tile_n, 128] or [128, tile_n] e4m3
                    # sa_smem [1, tile_m] f32; sb_smem [1, tile_n] f32
                    rows = pl.ds(wg * WG_ROWS, WG_ROWS)

                    def mma(partial_ref):
                        b_operand = plgpu.transpose_ref(b_smem, (1, 0)) if config.b_layout == "nk" else b_smem
                        plgpu.wgmma(partial_ref, a_smem.at[rows], b_operand)
                        return partial_ref[...]

                    partial = pl.run_scoped(mma, plgpu.ACC((WG_ROWS, tile_n), jnp.float32))  # [64, tile_n]
                    if "noscale" in config.debug:
                        return acc + partial
                    sa = config.layout(sa_smem[0, rows], plgpu.Layout.WGMMA.reduce(1))  # [64]
                    sb = config.layout(sb_smem[0, :], plgpu.Layout.WGMMA.reduce(0))  # [tile_n]
                    scale = lax.broadcast_in_dim(sa, partial.shape, [0]) * lax.broadcast_in_dim(sb, partial.shape, [1])
                    return acc + partial * scale

                b_group = b_gmem.at[group]
                b_tile = b_group.at[n_slice, :] if config.b_layout == "nk" else b_group.at[:, n_slice]
                make_pipeline(step, compute_context)(
                    a_gmem.at[m_slice, :], b_tile, sa_gmem.at[:, m_slice], sb_gmem.at[group, :, n_slice],
                    allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def grouped_fp8_gemm(a, sa_t, b, sb_cols, tiles, *, out_dtype, config: KernelConfig, interpret=None):
    """Launches the kernel on operands already padded and laid out by the wrapper.

    Args:
      a: [m_pad, k] e4m3 (m_pad a multiple of 128, k of 128).
      sa_t: [k / 128, m_pad] float32 A scales, transposed.
      b: [g, n, k] e4m3, or [g, k, n] when ``config.for_interpreter`` (n a multiple of tile_n).
      sb_cols: [g, k / 128, n] float32 B scales per output column.
      tiles: [num_row_tiles, 4] int32 row-tile schedule.
    Returns:
      [m_pad, n] out_dtype; rows outside every tile's [first, end) are not written.
    """
    m_pad = a.shape[0]
    n = sb_cols.shape[-1]
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config, n=n),
        out_type=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid=(config.num_sms,),
        grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return kernel(a, sa_t, b, sb_cols, tiles)
