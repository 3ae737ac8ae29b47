"""FlashMLA-style split-KV decoding over a paged cache, as a Pallas Mosaic GPU kernel (Hopper).

Status: the interpreter's variant matches float64 and the XLA path in jax's Mosaic GPU interpreter
(tests/test_mla_decode.py: full 576/512 rows, splits, causal s_q = 2, bf16 and FP8 caches, a peaky
softmax, both score schedules); the GPU variant lowers for CUDA with the launch, SMEM, wgmma shapes and
softmax scale the export tests check (tests/test_mla_decode_export.py). The two variants share everything
but the few functions of ``variant.py``. This version has not run on a GPU (its predecessor, with both
warpgroups scoring whole pages, matched float64 on an H200: BENCHMARKS.md), so the API only launches it
when asked for by name.

Work items come from ``get_mla_metadata``, listed SM part by SM part: (sequence, first page, end page,
output slot). On a GPU each (SM part, 64-row query tile) pair has its own CTA, which walks its part's items
in order (FlashMLA's one CTA per SM part; the interpreter's few CTAs take the pairs in turn); s_q x h_q
query rows share the single latent KV head. For each item a CTA keeps the query tile in SMEM and streams
the item's KV pages through the block table with a two-stage TMA pipeline driven by a memory warpgroup
(Q 72 KB + 2 x 72 KB of bf16 pages + P 8 KB fill Hopper's shared memory; with the FP8 cache, 2 x 41 KB of
pages and a 64 KB dequantised tile, see ``pages.py``).

Scores (``DecodeConfig.split_scores``): with the split schedule (the bf16 cache's default) each of the two
compute warpgroups computes S = Q K^T over all 576 columns for its own 32 of the page's 64 tokens (wgmma
N = 32, bf16, f32 accumulation), the two swap their row maxima through SMEM, each writes P of its tokens
into a shared [64, 64] P, and each then runs O += P V over the whole page for its own 256 of the 512 value
columns: no QK^T is computed twice (FlashMLA's seesaw overlaps one's softmax with the other's MMA; this
split does the same work without that overlap). Each warpgroup sums its own tokens' P; the row sums are
swapped once per item. The duplicated schedule (round 1; the FP8 cache's default, for which the swap's
9 KB of SMEM is 64 bytes short) has both warpgroups score all 64 tokens. Tokens past the sequence (or the
causal limit) are masked out of S, and their value rows are zeroed in SMEM before P V, so poisoned cache
slots cannot leak. Each item writes its partial result (O / l and lse) to its slot in float32 (FlashMLA's
oaccum: no bf16 rounding before the merge), staged through the Q tile's buffer once the item's last page is
scored (a ``RefUnion`` on the GPU: two 128-column TMA stores per warpgroup); ``combine.py`` merges a
sequence's slots.
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

from pallas_kernels.mla_decode.metadata import BLOCK_SIZE
from pallas_kernels.mla_decode.pages import CHUNK, TILED_16BIT, DensePages, FP8Pages, StepContext
from pallas_kernels.mla_decode.variant import KernelVariant

ROWS = 64  # query rows per tile (the wgmma M)
NUM_COMPUTE_WGS = 2
PARTIAL_DTYPE = jnp.float32  # split partials (FlashMLA's oaccum), merged by combine.py
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    d: int  # cached row width (576)
    dv: int  # value width, the first dv columns (512)
    s_q: int
    heads: int  # query heads (rows = s_q * heads)
    softmax_scale: float
    causal: bool
    num_sms: int  # CTAs of the persistent grid; each takes (SM part, row tile) units in turn
    pages: DensePages | FP8Pages  # the cache's format: how a page reaches S and P V
    max_concurrent_steps: int = 2
    # exp2 / log2 by the GPU's approximate instructions (FlashMLA's fast math); GPU variant only, a sweep option
    # until a GPU has measured both (the interpreter computes exactly either way)
    approx_math: bool = False
    # Build the variant jax's CPU interpreter can run (``variant.py`` holds each difference from the GPU
    # kernel, with why). It also needs more XLA:CPU threads than the kernel has warpgroups
    # (interpret.check_interpreter_threads).
    for_interpreter: bool = False
    # True: each compute warpgroup scores its own 32 tokens of a page (S = Q K^T with N = 32) and the two swap
    # row maxima and P through SMEM, so no QK^T is computed twice. False: both score all 64 tokens (round 1's
    # schedule). None: split wherever it fits Hopper's SMEM at d = 576: the bf16/fp16 cache; not the FP8 cache,
    # whose dequantised tile leaves 64 bytes short of the 9 KB the swap needs (allocations start at 1 KB steps).
    split_scores: bool | None = None

    @property
    def dv_per_wg(self) -> int:
        return self.dv // NUM_COMPUTE_WGS

    @property
    def splits_scores(self) -> bool:
        return not isinstance(self.pages, FP8Pages) if self.split_scores is None else self.split_scores

    @property
    def variant(self) -> KernelVariant:
        return KernelVariant(self.for_interpreter)


def out_stage_columns(d: int, dv_per_wg: int, q_itemsize: int) -> int:
    """f32 output columns each compute warpgroup stages per TMA store, through the Q buffer: the most that
    fit the [64, d] Q tile for both warpgroups (and the lse), a power of two dividing ``dv_per_wg``."""
    room = (ROWS * d * q_itemsize - 1024) // (NUM_COMPUTE_WGS * ROWS * jnp.dtype(PARTIAL_DTYPE).itemsize)
    columns = dv_per_wg
    while columns > room or dv_per_wg % columns:
        columns //= 2
    return columns


def check_supported(q_dtype, d: int, dv: int, h_kv: int, fp8: bool = False) -> None:
    """Raises NotImplementedError for inputs this kernel does not take (the API then uses XLA)."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(f"mla_decode kernel: bf16/fp16 only, got {q_dtype}")
    if h_kv != 1:
        raise NotImplementedError(f"mla_decode kernel: one latent KV head (MLA), got h_kv={h_kv}")
    if d % 64 or dv % (64 * NUM_COMPUTE_WGS) or dv > d:
        raise NotImplementedError(f"mla_decode kernel: d % 64 == 0 and dv % 128 == 0 needed, got d={d}, dv={dv}")
    if fp8 and (jnp.dtype(q_dtype) != jnp.dtype(jnp.bfloat16) or dv % (128 * NUM_COMPUTE_WGS) or d == dv):
        raise NotImplementedError(f"mla_decode kernel, FP8 cache: bf16 q, dv % 256 == 0 and RoPE columns "
                                  f"(d > dv) needed, got {q_dtype}, d={d}, dv={dv}")


def _kernel(q_gmem, table_gmem, lens_gmem, work_gmem, parts_gmem, *refs, config: DecodeConfig):
    # q_gmem:     [batch, rows_pad, d]           query rows of each sequence (s_q-major, then heads)
    # table_gmem: [batch, max_blocks] int32      lens_gmem: [batch] int32
    # work_gmem:  [items, 4] int32               (sequence, first page, end page, slot), part by part
    # parts_gmem: [parts + 1] int32              part p's items are work rows parts[p] .. parts[p + 1] - 1
    # refs:       the page format's operands (pages.py: page p is rows 64 p .. 64 p + 63 of each), then
    #             out_gmem [slots, rows_pad, dv] f32 and lse_gmem [slots, rows_pad] f32
    *page_gmem, out_gmem, lse_gmem = refs
    rows_pad, d = q_gmem.shape[1], q_gmem.shape[2]
    row_tiles = rows_pad // ROWS
    dv_wg = config.dv_per_wg
    pages = config.pages
    variant = config.variant
    scale = config.softmax_scale * LOG2E  # scores in log2 units, softmax by exp2

    def make_pipeline(body, compute_context, steps, index_map):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=40,
            in_specs=pages.in_specs(index_map, variant),
            wg_axis="wg", num_compute_wgs=NUM_COMPUTE_WGS, max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context)

    ignore = lambda *_, **__: None  # noqa: E731
    max_blocks = table_gmem.shape[1]

    split = config.splits_scores
    half = CHUNK // NUM_COMPUTE_WGS  # tokens of a page each warpgroup scores (split schedule)
    stage_columns = out_stage_columns(d, dv_wg, jnp.dtype(q_gmem.dtype).itemsize)
    q_and_out_stage = variant.aliased(  # Q is dead once an item's last page is scored: its output goes through it
        plgpu.SMEM((ROWS, d), q_gmem.dtype, transforms=TILED_16BIT),
        [plgpu.SMEM((NUM_COMPUTE_WGS, ROWS, stage_columns), PARTIAL_DTYPE), plgpu.SMEM((ROWS,), jnp.float32)])
    schedule_scratch = dict(
        # [64, 64] P of the page, untiled: each warpgroup writes the 32 columns of its own tokens, both read
        # all of it for P V (KernelVariant.p_operand)
        p_page=plgpu.SMEM((ROWS, CHUNK), q_gmem.dtype),
        exchange_barrier=plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),
    ) if split else variant.p_smem(ROWS, CHUNK, q_gmem.dtype, NUM_COMPUTE_WGS, TILED_16BIT)
    # [wg, 64] f32 row maxima (per page), then the row sums (per item), swapped between the warpgroups
    row_stats = {"row_stats": plgpu.SMEM((NUM_COMPUTE_WGS, ROWS), jnp.float32)} if split else {}

    @functools.partial(
        pl.run_scoped,
        allocs=make_pipeline(ignore, ignore, variant.pipeline_steps(max_blocks, 0, work_gmem[0, 2]),
                             lambda j: (j, 0)).get_allocations(*page_gmem),
        q_and_out_stage=q_and_out_stage,
        **schedule_scratch,
        **pages.scratch(variant),
        q_barrier=plgpu.Barrier(num_arrivals=1),
        # per work item: both compute warpgroups are done with the last tile's Q (and its output staged
        # there) before it is reloaded
        item_barrier=plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),
        # per page (FP8 cache): the shared dequantised tile's handshakes, apart from the per-item one
        page_barrier=plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),
        **row_stats,
        collective_axes="wg",
    )
    def _scope(allocs, q_and_out_stage, q_barrier, item_barrier, page_barrier, p_smem=None, p_page=None,
               row_stats=None, exchange_barrier=None, **page_scratch):
        wg = lax.axis_index("wg")
        q_smem, (stage_smem, lse_smem) = q_and_out_stage

        def swap(values):
            """[64] f32 row values of each warpgroup -> both warpgroups' ([wg0's, wg1's], read in the same
            order by both, so what they make of them is identical), through ``row_stats``."""
            row_stats[wg] = values
            plgpu.commit_smem()
            plgpu.barrier_arrive(exchange_barrier)
            plgpu.barrier_wait(exchange_barrier)
            return [variant.layout(row_stats[h], plgpu.Layout.WGMMA.reduce(1)) for h in range(NUM_COMPUTE_WGS)]

        def _item(item, tile):
            seq, first, end, slot = (work_gmem[item, f] for f in range(4))
            length = lens_gmem[seq]
            q_rows = pl.ds(tile * ROWS, ROWS)

            @pl.when(first < end)
            def _work():
                def compute_context(eval_pipeline):
                    plgpu.barrier_arrive(item_barrier)  # both warpgroups are done with the last tile's Q
                    plgpu.barrier_wait(item_barrier)  # and with the output stores staged in it

                    @pl.when(wg == 0)
                    def _load_q():
                        plgpu.copy_gmem_to_smem(q_gmem.at[seq, q_rows], q_smem, q_barrier)

                    plgpu.barrier_wait(q_barrier)
                    acc = variant.layout(jnp.zeros((ROWS, dv_wg), jnp.float32), plgpu.Layout.WGMMA)
                    m = variant.layout(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    l = variant.layout(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    acc, m, l = eval_pipeline((acc, m, l))
                    if split:  # l holds this warpgroup's tokens only; the swap's barrier also means Q is dead
                        l_0, l_1 = swap(l)
                        l = l_0 + l_1
                    else:
                        plgpu.barrier_arrive(item_barrier)  # both are done scoring with Q: stage the output in it
                        plgpu.barrier_wait(item_barrier)
                    visible = l > 0
                    acc = acc / lax.broadcast_in_dim(jnp.where(visible, l, 1.0), acc.shape, [0])
                    lse = jnp.where(visible, (m + jnp.log2(jnp.where(visible, l, 1.0))) / LOG2E, -jnp.inf)
                    out = acc.astype(stage_smem.dtype)
                    for c in range(dv_wg // stage_columns):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        stage_smem[wg] = out[:, c * stage_columns:(c + 1) * stage_columns]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            stage_smem.at[wg], out_gmem.at[slot, q_rows, pl.ds(wg * dv_wg + c * stage_columns,
                                                                              stage_columns)])

                    @pl.when(wg == 0)
                    def _store_lse():
                        lse_smem[...] = lse
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[slot, q_rows])

                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before the next item's Q load reuses it

                def step(indices, *refs):
                    # refs: the page format's SMEM blocks of the item's page j, then the carry
                    # (acc [64, dv_wg] f32, m [64], l [64]) in log2 units; with the split schedule l sums
                    # this warpgroup's tokens only
                    *page_refs, (acc, m, l) = refs
                    token0 = first * BLOCK_SIZE + indices[0] * CHUNK
                    ctx = StepContext(token0=token0, valid=jnp.minimum(length, end * BLOCK_SIZE), wg=wg,
                                      dv_per_wg=dv_wg, page_barrier=page_barrier, variant=variant,
                                      score_rows=pl.ds(wg * half, half) if split else None)
                    score_operands = pages.score_operands(page_refs, page_scratch, ctx)
                    tokens = half if split else CHUNK  # scored by this warpgroup

                    def qk(s_ref):
                        for q_columns, k_t in score_operands:  # S = sum over column ranges of Q K^T
                            plgpu.wgmma(s_ref, q_smem if q_columns is None else q_smem.at[:, q_columns], k_t)
                        return s_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((ROWS, tokens), jnp.float32)) * scale  # [64, tokens]
                    token = token0 + (wg * half if split else 0) + variant.iota((ROWS, tokens), 1)
                    row = tile * ROWS + variant.iota((ROWS, tokens), 0)
                    limit = length - config.s_q + row // config.heads + 1 if config.causal else length
                    s = jnp.where(token < variant.step_limit(limit, end * BLOCK_SIZE), s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1))
                    if split:  # the page's row maximum: both warpgroups' tokens
                        m_new = functools.reduce(jnp.maximum, swap(m_new))
                    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    alpha = jnp.exp2(m - m_safe)
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
                    l = l * alpha + p.sum(axis=1)
                    if split:  # P of both halves in SMEM before either runs P V over the whole page
                        p_page[:, pl.ds(wg * half, half)] = p.astype(q_smem.dtype)
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(exchange_barrier)
                        plgpu.barrier_wait(exchange_barrier)
                    v_smem = pages.value_ref(page_refs, page_scratch, ctx)  # [64, dv_wg]
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    if split:
                        p_full = variant.p_operand(p_page)  # [64, 64]: both warpgroups' tokens
                        acc = variant.accumulate(acc, lambda acc_ref: plgpu.wgmma(acc_ref, p_full, v_smem))
                    else:
                        acc = variant.accumulate_pv(acc, p.astype(q_smem.dtype), v_smem, wg, p_smem)
                    return acc, m_new, l

                def index_map(j):  # step j -> the page (block row) of the item's j-th block
                    return (table_gmem[seq, jnp.minimum(first + j, end - 1)], 0)

                steps = variant.pipeline_steps(max_blocks, first, end)
                make_pipeline(step, compute_context, steps, index_map)(*page_gmem, allocations=allocs)

        @plgpu.nd_loop(((parts_gmem.shape[0] - 1) * row_tiles,), collective_axes="sm")
        def _unit_loop(loop_info):  # one (SM part, row tile) unit per CTA when the grid has one per unit
            part, tile = loop_info.index[0] // row_tiles, loop_info.index[0] % row_tiles

            @pl.loop(parts_gmem[part], parts_gmem[part + 1])
            def _part_items(item):  # the part's items, in sequence order
                _item(item, tile)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def partial_attention(q_rows, k_cache, block_table, lengths, work, part_offsets, *, config: DecodeConfig,
                      num_slots: int, interpret=None):
    """Launches the kernel: per work item, the partial softmax over its pages.

    Args:
      q_rows: [batch, rows_pad, d] bf16/fp16; k_cache: [num_blocks, 64, 1, d] in q's dtype (``DensePages``)
      or an ``FP8KVCache`` (``FP8Pages``); block_table: [batch, max_blocks]; lengths: [batch] int32;
      work: [items, 4] int32 and part_offsets: [parts + 1] int32, ``MLAMetadata``'s.
    Returns:
      (out [num_slots, rows_pad, dv] float32, lse [num_slots, rows_pad] float32 natural log); slots no item
      writes are left unwritten.
    """
    rows_pad = q_rows.shape[1]
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config),
        out_type=(jax.ShapeDtypeStruct((num_slots, rows_pad, config.dv), PARTIAL_DTYPE),
                  jax.ShapeDtypeStruct((num_slots, rows_pad), jnp.float32)),
        grid=(config.num_sms,), grid_names=("sm",), num_threads=NUM_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             approx_math=config.approx_math,
                                             # the kernel's row reductions stay inside a warp (WGMMA layout):
                                             # the 2 KB jax reserves for cross-warp ones are SMEM it needs
                                             reduction_scratch_bytes=0),
        interpret=interpret,
    )
    pages = config.pages.gmem_operands(k_cache, config.variant)
    return kernel(q_rows, block_table, lengths, work, part_offsets, *pages)
