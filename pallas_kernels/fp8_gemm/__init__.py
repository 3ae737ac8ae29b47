"""DeepGEMM's FP8 GEMMs with fine-grained scaling, as Pallas Mosaic GPU kernels (``api.py`` for the ops,
``vjp.py`` for FP8 training layers)."""

from pallas_kernels.fp8_gemm.api import (fp8_gemm_nt, k_grouped_fp8_gemm_nt_contiguous,
                                         m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from pallas_kernels.fp8_gemm.vjp import fp8_grouped_linear, fp8_linear

__all__ = ["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "k_grouped_fp8_gemm_nt_contiguous", "fp8_linear", "fp8_grouped_linear"]
