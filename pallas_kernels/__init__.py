"""jaxseek.pallas_kernels: Pallas Mosaic GPU kernels, one folder per op, each with its XLA reference.

* ``quant``: 1x128 per-token, 128x128 per-block and 128x1 per-channel FP8 casts, UE8M0 scales.
* ``fp8_gemm``: DeepGEMM's normal, m-grouped (contiguous, masked) and k-grouped FP8 GEMMs with
  two-level accumulation, and the ``custom_vjp`` layers for FP8 training.
* ``numerics``: ``calc_diff``, the comparison every kernel test uses.
* ``mla_decode``: FlashMLA's paged MLA decoding: split-KV metadata, the split-KV kernel over bf16/fp16
  or FP8 (dequantised in the kernel) caches, the combine step.
* ``interpret``: the single door to jax's CPU interpreter for Mosaic GPU kernels.

Every op has ``xla``, ``mosaic_gpu`` and ``interpret`` implementations behind an ``implementation=``
argument. The package imports only jax, so it loads on a GPU machine that lacks polars or grain.
"""
