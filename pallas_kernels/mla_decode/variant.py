"""Where the decoding kernel the CPU interpreter runs differs from the one the GPU runs: one function each.

Everything else in ``mosaic_gpu.py`` and ``pages.py`` (the softmax, its scale, the masks, P, the pipeline's
index map, the FP8 dequantisation, the output stores) is the same code on both paths, so the interpreted
tests check it for the GPU too. What is left here cannot run in jax's Mosaic GPU interpreter (0.10-0.11);
a mutation inside a GPU branch below is only caught on a GPU (``benchmarks/gpu_validation.py mla_kernel``
asserts kernel == XLA path there) or, where it changes the lowered kernel's shape, by the CUDA export tests
(``tests/test_mla_decode_export.py``: register-P wgmma, SMEM, grid).
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

    def p_smem(self, rows: int, columns: int, dtype, num_wgs: int, transforms) -> dict:
        """Scratch for ``accumulate_pv``: [wg, rows, columns] P staged in SMEM, interpreter only."""
        if not self.for_interpreter:
            return {}
        return {"p_smem": plgpu.SMEM((num_wgs, rows, columns), dtype, transforms=transforms)}

    def accumulate_pv(self, acc, p, v_smem, wg, p_smem=None):
        """acc [64, dv_wg] f32 + p [64, 64] (q dtype) @ v_smem [64, dv_wg].

        GPU: P straight from registers as wgmma's A operand, accumulated in place with ``run_state`` (a
        second 64 x 256 f32 accumulator would not fit in registers). Interpreter: its wgmma takes A from SMEM
        only and it has no rule for ``run_state``, so P goes through ``p_smem`` and a fresh product is added.
        """
        def pv(acc_ref, p_operand):
            plgpu.wgmma(acc_ref, p_operand, v_smem)

        if self.for_interpreter:
            p_smem[wg] = p
            plgpu.commit_smem()
            product = pl.run_scoped(lambda r: (pv(r, p_smem.at[wg]), r[...])[1], plgpu.ACC(acc.shape, jnp.float32))
            return acc + product
        return pl.run_state(lambda acc_ref: pv(acc_ref, p))(plgpu.ACC.init(acc))
