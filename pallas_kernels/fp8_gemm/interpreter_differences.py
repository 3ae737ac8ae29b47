"""Where the kernel the CPU interpreter runs differs from the GPU kernel: one named function per difference.

Everything else (the schedule, the tile raster, the pipeline, the scale reads, the promotion, the epilogue's
row stores) is the same code on both. Each function takes the kernel config and returns the GPU's choice
unless ``config.for_interpreter``; each says why the interpreter needs its own (jax 0.10.2; see
``../shared/PALLAS_NOTES.md``). A GPU-only branch is proven only by the CUDA export (it lowers) and a numeric
check on a GPU (``benchmarks/gpu_suite.py``'s ``fp8_correctness``).

1. ``b_operand_layout``: B is [n, k] (K-major) on the GPU, [k, n] in the interpreter. FP8 wgmma cannot
   transpose, so the GPU needs K-major B passed as a transposed ref; the interpreter cannot read a
   ``transpose_ref``'d wgmma operand (``'TransposeTransform' object has no attribute 'indices'``).
   It implies ``b_operand`` (the copy to [k, n] in XLA), ``b_block_spec`` (the tile's shape, index map and
   swizzle: a [128, tile_n] e4m3 tile with tile_n < 128 cannot take a 128-byte swizzle) and
   ``mma_b_operand`` (the transpose).
2. ``in_layout``: the GPU pins register arrays to wgmma layouts with ``plgpu.layout_cast``; the interpreter
   has no rule for it (its arrays have no layouts, so it is a no-op there).
3. ``dynamic_k_steps``: the k-grouped kernel runs each tile's pipeline for exactly its group's K steps on
   the GPU; a pipeline of data-dependent length can hang the interpreter, which runs every tile for the
   whole K (block index offset to the group's range, clamped) and zeroes the surplus steps' scale
   (``k_step_weight``).
4. ``pads_b``: a ``pad_b=False`` config leaves B unpadded along N on the GPU (TMA zero-fills the last column
   tile's rows past N); the interpreter, as this project sets it up (``interpret.py``), raises on
   out-of-bounds reads, so it pads.
5. ``check_interpretable``: 2-CTA clusters (``cluster_n=2``, TMA multicast of A) are GPU-only: the interpreter
   cannot allocate cluster barriers (jax 0.10.2: ``NotImplementedError: nan + cluster_barrier``, and with
   zero-filled memory it fails creating them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_K = 128
FP8_SWIZZLE_TRANSFORMS = (plgpu.TilingTransform((8, BLOCK_K)), plgpu.SwizzleTransform(128))


def pads_b(config) -> bool:
    """Whether B is padded to whole column tiles in XLA (difference 4)."""
    return config.pad_b or config.for_interpreter


def check_interpretable(config) -> None:
    """Raises NotImplementedError for a config the interpreter cannot run (difference 5)."""
    if config.for_interpreter and config.cluster_n > 1:
        raise NotImplementedError("cluster_n: the Mosaic GPU interpreter cannot run 2-CTA clusters (jax 0.10.2 cannot "
                                  "allocate cluster barriers); they are checked by the CUDA export and on a GPU")


def b_operand_layout(config) -> str:
    """"nk" (K-major, what FP8 wgmma needs) on the GPU; "kn" for the interpreter (difference 1)."""
    return "kn" if config.for_interpreter else "nk"


def b_operand(b: jax.Array, config) -> jax.Array:
    """[g, n, k] e4m3 -> the kernel's B operand: unchanged on the GPU, [g, k, n] for the interpreter."""
    return jnp.swapaxes(b, 1, 2) if b_operand_layout(config) == "kn" else b


def b_block_spec(config, tile_n: int, k_index) -> plgpu.BlockSpec:
    """The pipeline's B tile per K step: [tile_n, 128] swizzled (GPU) or [128, tile_n] unswizzled (interpreter)."""
    if b_operand_layout(config) == "kn":
        return plgpu.BlockSpec((BLOCK_K, tile_n), lambda s: (k_index(s), 0))
    return plgpu.BlockSpec((tile_n, BLOCK_K), lambda s: (0, k_index(s)), transforms=FP8_SWIZZLE_TRANSFORMS)


def b_tile(b_group, n_slice, k_cols, config):
    """This tile's columns of one group's B ([n, k] or [k, n]) over the K range ``k_cols``."""
    return b_group.at[k_cols, n_slice] if b_operand_layout(config) == "kn" else b_group.at[n_slice, k_cols]


def mma_b_operand(b_smem, config):
    """The wgmma's B operand: the K-major tile seen as [128, tile_n] (GPU), or the [128, tile_n] tile itself."""
    return b_smem if b_operand_layout(config) == "kn" else plgpu.transpose_ref(b_smem, (1, 0))


def in_layout(x: jax.Array, layout, config) -> jax.Array:
    """Pins a register array to a Mosaic GPU layout on the GPU; a no-op for the interpreter (difference 2)."""
    return x if config.for_interpreter else plgpu.layout_cast(x, layout)


def dynamic_k_steps(config) -> bool:
    """Whether each k-grouped tile's pipeline runs exactly its group's K steps (GPU) rather than the whole
    K with the surplus masked (interpreter, difference 3)."""
    return config.k_grouped and not config.for_interpreter


def k_step_weight(step, k_steps, config):
    """1 for a K step inside the tile's group, 0 for the interpreter's surplus steps; None when all count."""
    if config.k_grouped and not dynamic_k_steps(config):
        return jnp.where(step < k_steps, 1.0, 0.0).astype(jnp.float32)
    return None


def pipeline_k_index(config, k_offset, static_steps: int):
    """K step s of a tile -> the block index along K: s itself, or offset to the group's K range and clamped
    (the interpreter's whole-K pipelines for k-grouped tiles)."""
    if k_offset is None:
        return lambda s: s
    return lambda s: jnp.minimum(k_offset + s, static_steps - 1)

