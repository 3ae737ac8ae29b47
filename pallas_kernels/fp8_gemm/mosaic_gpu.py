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


SCALE_ALIGN = 32  # f32 scale tiles are padded to 32 columns: TMA needs 128-byte-aligned SMEM slots


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static shape of one kernel launch.

    tile_n: output columns per CTA tile (multiple of 8; DeepGEMM's "unaligned" widths such as 112 or 144
      are fine).
    max_concurrent_steps: TMA pipeline depth (128-wide K steps in flight).
    num_sms: persistent CTAs, one per SM.
    grid_tile_width: row tiles per band of the tile raster; CTAs sweep a band's columns together so
      the A and B tiles they share stay in L2.
    k_grouped: every tile reads its own K range from the schedule (weight-gradient GEMMs); otherwise all
      tiles contract the whole K, a static pipeline length.
    for_interpreter: trace the variant the CPU interpreter can run (jax 0.10-0.11): B in [k, n] layout
      (it cannot yet run a wgmma on a transposed operand) and no register layout casts (it has no rule
      for them). The GPU kernel is the default: K-major B, which FP8 wgmma requires.
    """

    tile_n: int
    max_concurrent_steps: int
    num_sms: int
    grid_tile_width: int = 8
    k_grouped: bool = False
    for_interpreter: bool = False

    @property
    def tile_m(self) -> int:
        return WG_ROWS * NUM_COMPUTE_WGS

    @property
    def scale_tile_n(self) -> int:
        return round_up(self.tile_n, SCALE_ALIGN)

    def layout(self, x: jax.Array, layout) -> jax.Array:
        """Places a register array in a Mosaic GPU layout (a no-op for the interpreter)."""
        return x if self.for_interpreter else plgpu.layout_cast(x, layout)


    def smem_bytes(self, out_itemsize: int) -> int:
        """Shared memory the launch needs: the pipeline's buffers plus the epilogue's staging tile."""
        per_step = (self.tile_m + self.tile_n) * BLOCK_K + 4 * (self.tile_m + self.scale_tile_n)
        return self.max_concurrent_steps * per_step + self.tile_m * self.tile_n * out_itemsize


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


def tile_coordinates(linear, num_row_tiles: int, num_col_tiles: int, band: int):
    """Work item -> (row tile, column tile), sweeping bands of ``band`` row tiles column by column,
    alternate bands in reverse (a snake), so concurrently running CTAs share A and B tiles in L2.

    Unlike ``plgpu.planar_snake`` it never divides by zero when ``band`` divides the row tiles (XLA
    constant-folds that dead branch into a crash under the CPU interpreter).
    """
    band = max(1, min(band, num_row_tiles))
    band_idx = linear // (band * num_col_tiles)
    within = linear - band_idx * (band * num_col_tiles)
    width = jnp.maximum(jnp.minimum(band, num_row_tiles - band_idx * band), 1)  # the last band may be narrower
    col = within // width
    col = jnp.where(band_idx % 2 == 0, col, num_col_tiles - 1 - col)
    return band_idx * band + within % width, col


def _kernel(a_gmem, sa_gmem, b_gmem, sb_gmem, tiles_gmem, out_gmem, *, config: KernelConfig, n: int):
    # a_gmem:     [m_pad, k] e4m3                sa_gmem: [k / 128, m_pad] f32 (MN-major A scales)
    # b_gmem:     [g, n, k] e4m3 (K-major)       or [g, k, n] for the interpreter
    # sb_gmem:    [g, k / 128, n + 32] f32 (B scales per output column, padded)
    # tiles_gmem: [num_tiles, 7] int32 (group, a_block, out_block, lo, hi, k_step_start, k_steps)
    # out_gmem:   [out_rows, n] out dtype
    k = a_gmem.shape[1]
    tile_m, tile_n, scale_n = config.tile_m, config.tile_n, config.scale_tile_n
    n_tiles = n // tile_n
    num_row_tiles = tiles_gmem.shape[0]
    out_dtype = out_gmem.dtype
    kn_b = config.for_interpreter
    fp8_transforms = (plgpu.TilingTransform((8, BLOCK_K)), plgpu.SwizzleTransform(128))
    b_transforms = () if kn_b else fp8_transforms  # the interpreter's [128, tile_n] tile needs no swizzle

    def make_pipeline(body, compute_context, k_steps, k_offset=None):
        # The interpreter runs k-grouped tiles as full-length pipelines whose block index is offset to
        # the group's K range (clamped), the surplus steps masked in ``step``: a dynamic-length pipeline
        # can hang it (jax 0.10.2). On a GPU each tile's pipeline runs exactly its group's K steps.
        if k_offset is None:
            k_index = lambda s: s  # noqa: E731
        else:
            k_index = lambda s: jnp.minimum(k_offset + s, static_steps - 1)  # noqa: E731
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tile_m, BLOCK_K), lambda s: (0, k_index(s)), transforms=fp8_transforms),
                plgpu.BlockSpec((BLOCK_K, tile_n) if kn_b else (tile_n, BLOCK_K),
                                (lambda s: (k_index(s), 0)) if kn_b else (lambda s: (0, k_index(s))),
                                transforms=b_transforms),
                plgpu.BlockSpec((1, tile_m), lambda s: (k_index(s), 0)),
                plgpu.BlockSpec((1, scale_n), lambda s: (k_index(s), 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=NUM_COMPUTE_WGS,
            max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the body)
    static_steps = k // BLOCK_K
    dynamic_k = config.k_grouped and not config.for_interpreter
    alloc_steps = tiles_gmem[0, 6] if dynamic_k else static_steps

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=make_pipeline(ignore, ignore, alloc_steps).get_allocations(
            a_gmem, b_gmem.at[0], sa_gmem, sb_gmem.at[0]),
        out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, WG_ROWS, tile_n), out_dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_row_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(loop_info):
            row_tile, n_idx = tile_coordinates(loop_info.index[0], num_row_tiles, n_tiles, config.grid_tile_width)
            group, a_block, out_block, lo, hi, k_start, k_steps = (tiles_gmem[row_tile, f] for f in range(7))
            n_slice = pl.ds(n_idx * tile_n, tile_n)

            @pl.when(lo < hi)
            def _work():
                def compute_context(eval_pipeline):
                    zeros = config.layout(jnp.zeros((WG_ROWS, tile_n), jnp.float32), plgpu.Layout.WGMMA)
                    acc = eval_pipeline(zeros)  # [64, tile_n] f32, the promoted sum over K
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
                    out_smem[wg] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    wg_lo = jnp.clip(lo - wg * WG_ROWS, 0, WG_ROWS)  # this warpgroup's rows of [lo, hi)
                    wg_hi = jnp.clip(hi - wg * WG_ROWS, 0, WG_ROWS)
                    out_rows = pl.ds(out_block * tile_m + wg * WG_ROWS, WG_ROWS)
                    _store_rows(out_smem.at[wg], out_gmem.at[out_rows, n_slice], wg_lo,
                                jnp.maximum(wg_hi - wg_lo, 0), WG_ROWS)

                def step(indices, a_smem, b_smem, sa_smem, sb_smem, acc):
                    # a_smem [tile_m, 128] e4m3; b_smem [tile_n, 128] e4m3 ([128, tile_n] interpreted)
                    # sa_smem [1, tile_m] f32; sb_smem [1, scale_n] f32; acc [64, tile_n] f32
                    rows = pl.ds(wg * WG_ROWS, WG_ROWS)

                    def mma(partial_ref):
                        plgpu.wgmma(partial_ref, a_smem.at[rows], b_smem if kn_b else plgpu.transpose_ref(b_smem, (1, 0)))
                        return partial_ref[...]

                    partial = pl.run_scoped(mma, plgpu.ACC((WG_ROWS, tile_n), jnp.float32))  # this K step alone
                    # (loading these straight into the layouts with plgpu.load measured no faster on an H200)
                    sa = config.layout(sa_smem[0, rows], plgpu.Layout.WGMMA.reduce(1))  # [64]
                    sb = config.layout(sb_smem[0, pl.ds(0, tile_n)], plgpu.Layout.WGMMA.reduce(0))  # [tile_n]
                    scale = lax.broadcast_in_dim(sa, partial.shape, [0]) * lax.broadcast_in_dim(sb, partial.shape, [1])
                    if config.k_grouped and config.for_interpreter:  # steps past the group's K range
                        scale = jnp.where(indices[0] < k_steps, scale, 0.0)
                    return acc + partial * scale  # promotion on the CUDA cores, in f32

                m_rows = pl.ds(a_block * tile_m, tile_m)
                b_group = b_gmem.at[0 if config.k_grouped else group]
                sb_group = sb_gmem.at[0 if config.k_grouped else group]
                k_offset = None
                if dynamic_k:  # this group's K range; the slices run past k but are never read there
                    k_cols, k_blocks, steps = pl.ds(k_start * BLOCK_K, k), pl.ds(k_start, static_steps), k_steps
                else:
                    k_cols, k_blocks, steps = slice(None), slice(None), static_steps
                    k_offset = k_start if config.k_grouped else None
                b_tile = b_group.at[k_cols, n_slice] if kn_b else b_group.at[n_slice, k_cols]
                make_pipeline(step, compute_context, steps, k_offset)(
                    a_gmem.at[m_rows, k_cols], b_tile, sa_gmem.at[k_blocks, m_rows],
                    sb_group.at[k_blocks, pl.ds(n_idx * tile_n, scale_n)], allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def grouped_fp8_gemm(a, sa_t, b, sb_cols, tiles, *, out_rows: int, out_dtype, config: KernelConfig,
                     interpret=None):
    """Launches the kernel on operands already padded and laid out by ``kernel_ops.py``.

    Args:
      a: [m_pad, k] e4m3 (m_pad a multiple of 128, k of 128).
      sa_t: [k / 128, m_pad] float32 A scales, transposed.
      b: [g, n, k] e4m3 ([g, k, n] when ``config.for_interpreter``), n a multiple of tile_n.
      sb_cols: [g, k / 128, n + 32] float32 B scales per output column (the last 32 are padding).
      tiles: [num_tiles, 7] int32 schedule (``schedule.py``).
      out_rows: rows of the output (a multiple of 128).
    Returns:
      [out_rows, n] out_dtype; rows no tile covers are not written.
    """
    n = sb_cols.shape[-1] - SCALE_ALIGN
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config, n=n),
        out_type=jax.ShapeDtypeStruct((out_rows, n), out_dtype),
        grid=(config.num_sms,),
        grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return kernel(a, sa_t, b, sb_cols, tiles)
