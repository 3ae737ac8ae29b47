"""Where the decoding kernel the CPU interpreter runs differs from the one the GPU runs: one function each.

Everything else in ``mosaic_gpu.py`` and ``pages.py`` (the softmax, its scale, the masks, P, the score
schedules' swaps of row maxima and P, the pipeline's index map, the FP8 dequantisation, the output stores)
is the same code on both paths, so the interpreted tests check it for the GPU too. What is left here cannot
run in jax's Mosaic GPU interpreter (0.10-0.11); a mutation inside a GPU branch below is only caught on a
GPU (``benchmarks/gpu_validation.py mla_kernel`` asserts kernel == XLA path there) or, where it changes the
lowered kernel's shape, by the CUDA export tests (``tests/test_mla_decode_export.py``: register-P wgmma,
SMEM and the Q / output-stage alias, grid).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """``for_interpreter``: build the variant jax's CPU interpreter can run; else the GPU one."""

    for_interpreter: bool

    def layout(self, x, layout):
        """``plgpu.layout_cast`` of a fresh register array; the interpreter has no rule for layout_cast."""
        return x if self.for_interpreter else plgpu.layout_cast(x, layout)

    def iota(self, shape, dimension):
        """An int32 iota in the WGMMA register layout; the interpreter takes only the layout-free iota."""
        if self.for_interpreter:
            return lax.broadcasted_iota(jnp.int32, shape, dimension)
        return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)

    def pipeline_steps(self, max_blocks: int, first, end):
        """Pipeline length of a work item: its own page count on the GPU; on the interpreter every item runs
        the block table's full width (a pipeline of data-dependent length can hang it), and ``step_limit``
        masks the steps past the item's pages."""
        return max_blocks if self.for_interpreter else end - first

    def step_limit(self, limit, item_end_token):
        """Tokens at or past the returned index are masked out of S (goes with ``pipeline_steps``)."""
        return jnp.minimum(limit, item_end_token) if self.for_interpreter else limit

    def transposed(self, ref, pretransposed_ref):
        """The K^T operand of ``S = Q K^T`` for wgmma: ``transpose_ref`` of the page on the GPU (bf16 wgmma
        reads a transposed operand for free); the interpreter cannot read a ``transpose_ref``'d operand
        (``TransposeTransform`` has no ``indices``), so it reads a copy the page format made pre-transposed."""
        return pretransposed_ref if self.for_interpreter else plgpu.transpose_ref(ref, (1, 0))

    def aliased(self, *groups):
        """SMEM allocations whose groups are never live at once: one ``plgpu.RefUnion`` on the GPU (the Q tile
        and the output stage share its 72 KB); separate buffers on the interpreter, which has no rule for an
        aliased ref (``ExtractAliasedRef``). Either unpacks as ``first, second = ref``."""
        return groups if self.for_interpreter else plgpu.RefUnion(*groups)

    def p_smem(self, rows: int, columns: int, dtype, num_wgs: int, transforms) -> dict:
        """Scratch for ``accumulate_pv``: [wg, rows, columns] P staged in SMEM, interpreter only."""
        if not self.for_interpreter:
            return {}
        return {"p_smem": plgpu.SMEM((num_wgs, rows, columns), dtype, transforms=transforms)}

    def accumulate_pv(self, acc, p, v_smem, wg, p_smem=None):
        """acc [64, dv_wg] f32 + p [64, 64] (q dtype, registers) @ v_smem [64, dv_wg] (the duplicated-scores
        schedule).

        GPU: P straight from registers as wgmma's A operand, accumulated in place with ``run_state`` (a
        second 64 x 256 f32 accumulator would not fit in registers). Interpreter: its wgmma takes A from SMEM
        only, so P goes through ``p_smem`` first (then as ``accumulate``).
        """
        if self.for_interpreter:
            p_smem[wg] = p
            plgpu.commit_smem()
            return self.accumulate(acc, lambda acc_ref: plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem))
        return self.accumulate(acc, lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem))

    def p_operand(self, p_page):
        """wgmma's A operand for P V from ``p_page`` [64, 64] (SMEM, untiled, each warpgroup wrote its tokens'
        32 columns): read into registers on the GPU (an SMEM A operand needs B's 128-byte swizzle, 64-column
        tiles that a warpgroup's 32 columns cannot be written into); the ref itself on the interpreter, whose
        wgmma takes A from SMEM only."""
        return p_page if self.for_interpreter else plgpu.load(p_page, (), layout=plgpu.Layout.WGMMA)

    def accumulate(self, acc, mma):
        """acc [64, n] f32 + what ``mma(acc_ref)``'s wgmmas add to a zero accumulator (their operands sliced
        inside ``mma``: static indices closed over by ``run_state`` would become its outputs).

        GPU: the wgmmas accumulate in place into ``acc`` with ``run_state``. Interpreter: it has no rule for
        ``run_state``, so they go into a fresh accumulator that is added to ``acc``.
        """
        if self.for_interpreter:
            product = pl.run_scoped(lambda r: (mma(r), r[...])[1], plgpu.ACC(acc.shape, jnp.float32))
            return acc + product
        return pl.run_state(mma)(plgpu.ACC.init(acc))
