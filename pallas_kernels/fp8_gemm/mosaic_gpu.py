"""The Hopper FP8 GEMM with fine-grained scaling, as a Pallas Mosaic GPU kernel.

One persistent, warp-specialised kernel serves every m-grouped layout (normal, contiguous, masked):
the wrapper turns the layout into a schedule of row tiles (``schedule.py``), each owned by one
group, and the kernel walks (row tile, column tile) pairs over a grid of one CTA per SM.

Per CTA: a memory warpgroup streams, per 128-wide K step, the A tile [tile_m, 128] e4m3, the B tile
[tile_n, 128] e4m3 (K-major: FP8 wgmma cannot transpose), the A scales [tile_m] and the tile's B scales
through a ``max_concurrent_steps``-deep TMA pipeline. One compute warpgroup per 64 rows (tile_m 128: two,
64: one; 256: two, each with two 64-row "waves", two wgmmas and two accumulators) runs per K step an e4m3
wgmma into a fresh f32 accumulator and promotes it on the CUDA cores
(DeepSeek-V3's two-level accumulation: the tensor core's limited-precision sums never span more than 128
of K); how, and in which B-scale layout, is ``config.promotion`` (``promotion.py``). The epilogue casts,
stages in SMEM and stores with TMA, only the rows of the tile's group (a ladder of power-of-two row stores).

``cluster_n=2`` pairs CTAs on neighbouring column tiles of one row tile in a cluster, and the A tile is
loaded once per cluster and multicast to both (``collective_axes`` on its BlockSpec, as jax's
``hopper_matmul_mgpu.py``).

Pipeline variants (``KernelConfig``): ``pipeline_across_tiles`` runs one pipeline over all (tile, K step) pairs
of a CTA (jax's pipeline of pipelines: START in the CTA's first busy tile, STOP in its last, found by
``_last_active_step``; STEADY between, so the memory warpgroup fetches the next tile's first stages during this
tile's last steps and epilogue); ``epilogue_buffers=2`` alternates two staging tiles (one TMA store group per
tile, waited down to one outstanding); ``early_release`` frees each stage (manual consumed barriers) after the
wgmma wait and the scale reads, before the promotion.

The CPU interpreter runs this same code except where ``interpreter_differences.py`` says (B's operand
layout, layout casts, k-grouped pipeline length, B padding; clusters are GPU-only). Status: the default
config (heuristic: tile_m 128, per_column, no cluster, B padded, one staging buffer, stages released after
the promotion, a pipeline per tile) is the one measured on an H200; the variants (tile_scalar, tile_m 64 or 256,
tile_n up to 256, cluster_n 2, pad_b False, pipeline_across_tiles, epilogue_buffers 2, early_release) lower
for CUDA and, except clusters and unpadded B, run in the interpreter; their speed and GPU numerics are not
measured yet (``benchmarks/fp8_sweep.py``, ``benchmarks/fp8_correctness.py``). Not built: clusters along M
(B multicast).
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

from pallas_kernels.fp8_gemm import interpreter_differences as interp
from pallas_kernels.fp8_gemm import promotion
from pallas_kernels.fp8_gemm.promotion import WG_ROWS, round_up  # noqa: F401 (round_up: re-exported)

BLOCK_K = 128  # one scale per 128 of K: the promotion interval
TILE_MS = (64, 128, 256)  # one or two compute warpgroups of 64 rows, or two of two 64-row waves each
WGMMA_MAX_N = 256  # the wgmma's N limit


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static shape of one kernel launch.

    tile_n: output columns per CTA tile (multiple of 8, <= 256; DeepGEMM's "unaligned" widths such as 112 or
      144 are fine).
    max_concurrent_steps: TMA pipeline depth (128-wide K steps in flight).
    num_sms: persistent CTAs, one per SM.
    grid_tile_width: row tiles per band of the tile raster; CTAs sweep a band's columns together so
      the A and B tiles they share stay in L2.
    tile_m: rows per CTA tile, 128 (two compute warpgroups), 64 (one: small M wastes less) or 256 (two, each
      issuing two 64-row wgmmas per K step into two accumulators: B's SMEM tile serves twice the rows).
    cluster_n: 1, or 2 for clusters of two CTAs working on neighbouring column tiles of the same row tile:
      each A tile is loaded once per cluster and multicast to both by TMA (N padded to 2 x tile_n; GPU-only).
    promotion: "per_column" or "tile_scalar" (``promotion.py``).
    pad_b: B is padded (copied) in XLA to whole column tiles; False: B keeps its N rows and the last column
      tile's TMA loads run past them, zero-filled by the hardware (GPU-only: the interpreter pads, it raises on
      out-of-bounds reads). The output is padded either way (TMA stores need whole tiles).
    pipeline_across_tiles: one TMA pipeline over all (tile, K step) pairs of a CTA (jax's pipeline of pipelines,
      ``pipeline_state`` START then STEADY): the memory warpgroup fetches the next tile's first stages while
      the compute warpgroups finish this tile and run its epilogue, instead of draining at every tile. Needs a
      static pipeline length (not the GPU's k-grouped kernel) divisible by the depth (K / 128 % stages == 0).
    epilogue_buffers: 1, or 2 to alternate two output staging tiles, so the store of one tile may still be
      reading shared memory while the next tile's result is written (one TMA store group per tile).
    early_release: release each pipeline stage (its consumed barriers) right after the wgmma wait and the scale
      reads, before the promotion (``manual_consumed_barriers``), as DeepGEMM does.
    k_grouped: every tile reads its own K range from the schedule (weight-gradient GEMMs); otherwise all
      tiles contract the whole K, a static pipeline length.
    for_interpreter: trace the variant the CPU interpreter can run (``interpreter_differences.py``).
    """

    tile_n: int
    max_concurrent_steps: int
    num_sms: int
    grid_tile_width: int = 8
    tile_m: int = 128
    promotion: str = "per_column"
    cluster_n: int = 1
    pad_b: bool = True
    pipeline_across_tiles: bool = False
    epilogue_buffers: int = 1
    early_release: bool = False
    k_grouped: bool = False
    for_interpreter: bool = False

    def __post_init__(self):
        if self.tile_n % 8 or not 8 <= self.tile_n <= WGMMA_MAX_N:
            raise ValueError(f"tile_n: expected a multiple of 8 in [8, {WGMMA_MAX_N}], got {self.tile_n}")
        if self.tile_m not in TILE_MS:
            raise ValueError(f"tile_m: expected one of {TILE_MS}, got {self.tile_m}")
        if self.cluster_n not in (1, 2) or self.num_sms % self.cluster_n:
            raise ValueError(f"cluster_n: expected 1 or 2, dividing num_sms={self.num_sms}, got {self.cluster_n}")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"max_concurrent_steps: expected >= 1, got {self.max_concurrent_steps}")
        if self.epilogue_buffers not in (1, 2):
            raise ValueError(f"epilogue_buffers: expected 1 or 2, got {self.epilogue_buffers}")
        promotion.check_promotion(self.promotion, self.tile_n)

    @property
    def n_multiple(self) -> int:
        """N is padded to a multiple of this: the column tiles of a cluster."""
        return self.tile_n * self.cluster_n

    @property
    def num_compute_wgs(self) -> int:
        return min(self.tile_m // WG_ROWS, 2)

    @property
    def waves(self) -> int:
        """64-row blocks (wgmmas, accumulators) per compute warpgroup: 2 for tile_m 256, else 1."""
        return self.tile_m // WG_ROWS // self.num_compute_wgs

    @property
    def scale_tile_n(self) -> int:
        """Columns of the B-scale tile per K step."""
        return promotion.scale_columns(self)

    def smem_bytes(self, out_itemsize: int) -> int:
        """Shared memory the launch needs: the pipeline's buffers plus the epilogue's staging tile."""
        per_step = (self.tile_m + self.tile_n) * BLOCK_K + 4 * (self.tile_m + self.scale_tile_n)
        return self.max_concurrent_steps * per_step + self.epilogue_buffers * self.tile_m * self.tile_n * out_itemsize


def _store_rows(out_smem, out_gmem, first, count, max_rows: int, commit_each: bool = True):
    """Stores ``count`` (dynamic, 0..max_rows) rows of ``out_smem`` starting at row ``first`` to the same
    rows of ``out_gmem`` with TMA, as a ladder of power-of-two row copies (TMA boxes are static); each copy
    its own bulk group, or (``commit_each=False``) none: the caller commits them as one."""
    offset = first
    size = max_rows
    while size > 0:
        rows = 1 << int(math.log2(size))
        size //= 2

        @pl.when((count & rows) != 0)
        def _():
            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(offset, rows)], out_gmem.at[pl.ds(offset, rows)],
                                    commit_group=commit_each)

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


def _last_active_step(tiles_gmem, num_tiles: int, num_row_tiles: int, cluster_tiles: int, band: int):
    """The last local step of this CTA's tile loop (``plgpu.nd_loop``'s order: linear = step x CTAs + CTA) whose
    tile has rows to compute, or -1: where ``pipeline_across_tiles`` drains its pipeline."""
    cta, ctas = lax.axis_index("sm"), lax.axis_size("sm")
    steps = (num_tiles - cta + ctas - 1) // ctas

    def visit(step, last):
        row_tile, _ = tile_coordinates(step * ctas + cta, num_row_tiles, cluster_tiles, band)
        return jnp.where(tiles_gmem[row_tile, 3] < tiles_gmem[row_tile, 4], step, last)

    return lax.fori_loop(0, steps, visit, jnp.int32(-1))


def _kernel(a_gmem, sa_gmem, b_gmem, sb_gmem, tiles_gmem, out_gmem, *, config: KernelConfig, n: int):
    # a_gmem:     [m_pad, k] e4m3                sa_gmem: [k / 128, m_pad] f32 (MN-major A scales)
    # b_gmem:     [g, n, k] e4m3 (K-major)       or [g, k, n] for the interpreter
    # sb_gmem:    [g, k / 128, n + 32] f32 per output column (per_column), or
    #             [g, k / 128, ceil(n / 128) + 32] f32 per 128x128 block (tile_scalar)
    # tiles_gmem: [num_tiles, 7] int32 (group, a_block, out_block, lo, hi, k_step_start, k_steps)
    # out_gmem:   [out_rows, n] out dtype
    k = a_gmem.shape[1]
    tile_m, tile_n, scale_n = config.tile_m, config.tile_n, config.scale_tile_n
    n_tiles = n // tile_n
    cluster_tiles = n_tiles // config.cluster_n  # column tiles of cluster_n neighbours
    num_row_tiles = tiles_gmem.shape[0]
    out_dtype = out_gmem.dtype
    static_steps = k // BLOCK_K
    waves = config.waves

    dynamic_k = interp.dynamic_k_steps(config)
    # (k-grouped kernels are refused in the interpreter too, though its whole-K pipelines are static: one rule)
    uneven = static_steps % min(config.max_concurrent_steps, static_steps)
    if config.pipeline_across_tiles and (config.k_grouped or uneven):
        raise ValueError(f"pipeline_across_tiles: needs a static pipeline length divisible by its depth; got "
                         f"{'a k-grouped (dynamic) one' if config.k_grouped else f'{static_steps} K steps'} and "
                         f"max_concurrent_steps={config.max_concurrent_steps}")

    def make_pipeline(body, compute_context, k_steps, k_offset=None, pipeline_state=None):
        k_index = interp.pipeline_k_index(config, k_offset, static_steps)
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tile_m, BLOCK_K), lambda s: (0, k_index(s)), transforms=interp.FP8_SWIZZLE_TRANSFORMS,
                                collective_axes=("cluster",) if config.cluster_n > 1 else ()),  # TMA multicast
                interp.b_block_spec(config, tile_n, k_index),
                plgpu.BlockSpec((1, tile_m), lambda s: (k_index(s), 0)),
                plgpu.BlockSpec((1, scale_n), lambda s: (k_index(s), 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=config.num_compute_wgs,
            max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
            manual_consumed_barriers=config.early_release,
            pipeline_state=pipeline_state,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the body)
    alloc_steps = tiles_gmem[0, 6] if dynamic_k else static_steps

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=make_pipeline(ignore, ignore, alloc_steps).get_allocations(
            a_gmem, b_gmem.at[0], sa_gmem, sb_gmem.at[0]),
        out_smem=plgpu.SMEM((config.epilogue_buffers,) * (config.epilogue_buffers > 1)
                            + (tile_m // WG_ROWS, WG_ROWS, tile_n), out_dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        # carry: the tiles this CTA has run so far (picks the pipeline state and the epilogue buffer); None when
        # neither needs it (the default kernel has no loop carry)
        def tile_body(loop_info, carry):
            row_tile, cluster_idx = tile_coordinates(loop_info.index[0], num_row_tiles, cluster_tiles,
                                                     config.grid_tile_width)
            n_idx = cluster_idx * config.cluster_n + (lax.axis_index("cluster") if config.cluster_n > 1 else 0)
            group, a_block, out_block, lo, hi, k_start, k_steps = (tiles_gmem[row_tile, f] for f in range(7))
            n_slice = pl.ds(n_idx * tile_n, tile_n)

            @pl.when(lo < hi)
            def _work():
                def compute_context(eval_pipeline):
                    zeros = interp.in_layout(jnp.zeros((WG_ROWS, tile_n), jnp.float32), plgpu.Layout.WGMMA, config)
                    accs = eval_pipeline(zeros if waves == 1 else (zeros,) * waves)  # [64, tile_n] f32 per wave
                    accs = (accs,) if waves == 1 else accs  # the promoted sums over K
                    # the store that last read this buffer is done (1 buffer: every store; 2: all but the last
                    # tile's, which reads the other buffer)
                    staging = out_smem if config.epilogue_buffers == 1 else out_smem.at[carry % config.epilogue_buffers]
                    plgpu.wait_smem_to_gmem(config.epilogue_buffers - 1, wait_read_only=True)
                    for wave, acc in enumerate(accs):
                        staging[wg * waves + wave] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    one_group = config.epilogue_buffers > 1
                    for wave in range(waves):
                        block = wg * waves + wave  # this wave's 64 rows of the tile
                        wg_lo = jnp.clip(lo - block * WG_ROWS, 0, WG_ROWS)  # its rows of [lo, hi)
                        wg_hi = jnp.clip(hi - block * WG_ROWS, 0, WG_ROWS)
                        out_rows = pl.ds(out_block * tile_m + block * WG_ROWS, WG_ROWS)
                        _store_rows(staging.at[block], out_gmem.at[out_rows, n_slice], wg_lo,
                                    jnp.maximum(wg_hi - wg_lo, 0), WG_ROWS, commit_each=not one_group)
                    if one_group:
                        plgpu.commit_smem_to_gmem_group()  # this tile's row stores: one bulk group

                def step(indices, a_smem, b_smem, sa_smem, sb_smem, *consumed_and_acc):
                    *consumed_barriers, acc = consumed_and_acc  # the stage's barriers with early_release
                    # a_smem [tile_m, 128] e4m3; b_smem [tile_n, 128] e4m3 ([128, tile_n] interpreted)
                    # sa_smem [1, tile_m] f32; sb_smem [1, scale_n] f32; acc [64, tile_n] f32 (a tuple per wave)
                    accs = (acc,) if waves == 1 else acc
                    wave_rows = [pl.ds((wg * waves + wave) * WG_ROWS, WG_ROWS) for wave in range(waves)]
                    k_weight = interp.k_step_weight(indices[0], k_steps, config)

                    def load_scales():
                        return [promotion.load_scales(sa_smem, sb_smem, rows, n_idx, k_weight, config)
                                for rows in wave_rows]

                    def mma(*partial_refs):
                        for partial_ref, rows in zip(partial_refs, wave_rows):
                            plgpu.wgmma(partial_ref, a_smem.at[rows], interp.mma_b_operand(b_smem, config))
                        return tuple(partial_ref[...] for partial_ref in partial_refs)

                    scales = load_scales() if promotion.scales_before_mma(config) else None
                    partials = pl.run_scoped(mma, *[plgpu.ACC((WG_ROWS, tile_n), jnp.float32)] * waves)  # this K step
                    # (per_column: loading the scales straight into the layouts with plgpu.load measured no
                    # faster on an H200)
                    if scales is None:
                        scales = load_scales()
                    for barrier in consumed_barriers:  # early_release: the stage is free for the next fetch
                        plgpu.barrier_arrive(barrier)
                    accs = tuple(promotion.promote(acc, partial, wave_scales, config)  # on the CUDA cores, in f32
                                 for acc, partial, wave_scales in zip(accs, partials, scales))
                    return accs[0] if waves == 1 else accs

                m_rows = pl.ds(a_block * tile_m, tile_m)
                b_group = b_gmem.at[0 if config.k_grouped else group]
                sb_group = sb_gmem.at[0 if config.k_grouped else group]
                k_offset = None
                if dynamic_k:  # this group's K range; the slices run past k but are never read there
                    k_cols, k_blocks, steps = pl.ds(k_start * BLOCK_K, k), pl.ds(k_start, static_steps), k_steps
                else:
                    k_cols, k_blocks, steps = slice(None), slice(None), static_steps
                    k_offset = k_start if config.k_grouped else None
                def run_pipeline(state):
                    make_pipeline(step, compute_context, steps, k_offset, state)(
                        a_gmem.at[m_rows, k_cols], interp.b_tile(b_group, n_slice, k_cols, config),
                        sa_gmem.at[k_blocks, m_rows], promotion.b_scale_tile(sb_group, k_blocks, n_idx, config),
                        allocations=pipeline_allocs)

                if not config.pipeline_across_tiles:
                    run_pipeline(None)
                else:  # the prologue only in the CTA's first tile, the drain only after its last
                    first, last = carry == 0, loop_info.local_index == last_active
                    state = jnp.where(first, int(plgpu.PipelinePipeline.START), jnp.where(
                        last, int(plgpu.PipelinePipeline.STOP), int(plgpu.PipelinePipeline.STEADY))).astype(jnp.int32)
                    pl.when(first & last)(lambda: run_pipeline(None))  # the only tile: a plain pipeline
                    pl.when(~(first & last))(lambda: run_pipeline(state))

            return None if carry is None else carry + (lo < hi).astype(jnp.int32)

        num_tiles = num_row_tiles * cluster_tiles
        if config.pipeline_across_tiles:
            last_active = _last_active_step(tiles_gmem, num_tiles, num_row_tiles, cluster_tiles, config.grid_tile_width)
        tile_loop = functools.partial(plgpu.nd_loop, (num_tiles,), collective_axes="sm")
        if config.pipeline_across_tiles or config.epilogue_buffers > 1:
            tile_loop(init_carry=jnp.int32(0))(tile_body)
        else:
            tile_loop()(lambda loop_info: tile_body(loop_info, None))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def grouped_fp8_gemm(a, sa_t, b, sb, tiles, *, out_rows: int, out_dtype, config: KernelConfig, n: int,
                     interpret=None):
    """Launches the kernel on operands already padded and laid out by ``kernel_ops.py``.

    Args:
      a: [m_pad, k] e4m3 (m_pad a multiple of tile_m, k of 128).
      sa_t: [k / 128, m_pad] float32 A scales, transposed.
      b: [g, n_b, k] e4m3 ([g, k, n_b] for the interpreter: ``interpreter_differences.b_operand``), n_b = n
        or, with ``config.pad_b=False`` on the GPU, fewer (the rest read as zeros).
      sb: B scales in the promotion's layout (``promotion.b_scale_operand``).
      tiles: [num_tiles, 7] int32 schedule (``schedule.py``).
      out_rows: rows of the output (a multiple of tile_m).
      n: columns of the output, a multiple of tile_n x cluster_n.
    Returns:
      [out_rows, n] out_dtype; rows no tile covers are not written.
    """
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config, n=n),
        out_type=jax.ShapeDtypeStruct((out_rows, n), out_dtype),
        grid=(config.num_sms // config.cluster_n,),
        grid_names=("sm",),
        **(dict(cluster=(config.cluster_n,), cluster_names=("cluster",)) if config.cluster_n > 1 else {}),
        num_threads=config.num_compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return kernel(a, sa_t, b, sb, tiles)
