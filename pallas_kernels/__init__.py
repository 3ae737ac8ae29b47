"""jaxseek.pallas_kernels: Pallas Mosaic GPU kernels, one folder per op, each with its XLA reference.

Planned: ``quant`` (1x128 per-token and 128x128 per-block FP8 casts, UE8M0 scales), ``fp8_gemm``
(DeepGEMM's normal, m-grouped contiguous/masked and k-grouped FP8 GEMMs with two-level accumulation,
plus the ``custom_vjp`` for FP8 training) and ``mla_decode`` (FlashMLA's paged MLA decoding with
split-KV scheduling). Every op has ``xla``, ``mosaic_gpu`` and ``interpret`` implementations behind an
``implementation=`` argument. The package imports only jax, so it loads on a GPU machine that lacks
polars or grain.
"""
