"""The GPU variant of the MLA decoding kernel, lowered for CUDA on the CPU (``jax.export``): it lowers, and
the lowered kernel has the launch, the shared memory, the wgmma shapes and the softmax scale it must have.
The interpreted tests (test_mla_decode.py) check the code both variants share; these check what only the
GPU variant has (variant.py): P from registers, K read transposed, the per-item pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mosaic_lowering import HOPPER_SMEM_BYTES, Wgmma, lowered_kernels

from pallas_kernels.mla_decode.fp8_cache import FP8KVCache
from pallas_kernels.mla_decode.mosaic_gpu import LOG2E, DecodeConfig, partial_attention
from pallas_kernels.mla_decode.pages import DensePages, FP8Pages

S = jax.ShapeDtypeStruct


def export_kernel(s_q=1, causal=False, fp8=False, heads=64, scale=576 ** -0.5, for_interpreter=False, num_sms=132,
                  d=576, dv=512, approx_math=False):
    """The kernel for CUDA, by default DeepSeek-shaped (576/512; 4 sequences of up to 16 pages, 136 slots)."""
    pages = FP8Pages(d=d, dv=dv) if fp8 else DensePages(d=d)
    config = DecodeConfig(d=d, dv=dv, s_q=s_q, heads=heads, softmax_scale=scale, causal=causal, num_sms=num_sms,
                          pages=pages, for_interpreter=for_interpreter, approx_math=approx_math)
    cache = (FP8KVCache(S((64, 64, 1, dv), jnp.float8_e4m3fn), S((64, 64, 1, d - dv), jnp.bfloat16),
                        S((64, 1, dv // 128, 64), jnp.float32)) if fp8 else S((64, 64, 1, d), jnp.bfloat16))
    rows_pad = -(-s_q * heads // 64) * 64
    args = (S((4, rows_pad, d), jnp.bfloat16), cache, S((4, 16), jnp.int32), S((4,), jnp.int32),
            S((136, 4), jnp.int32), S((133,), jnp.int32))  # 132 SM parts
    exported = jax.export.export(jax.jit(lambda *a: partial_attention(*a, config=config, num_slots=136)),
                                 platforms=["cuda"])(*args)
    out, lse = exported.out_avals
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32  # f32 split partials (FlashMLA's oaccum)
    assert out.shape == (136, rows_pad, dv) and lse.shape == (136, rows_pad)
    (kernel,) = lowered_kernels(exported)
    return kernel


@pytest.mark.timeout(300)
@pytest.mark.parametrize("s_q, causal, fp8", [(1, False, False), (2, True, False), (1, False, True), (2, True, True)])
def test_gpu_variant_lowers_with_register_p_and_fits_shared_memory(s_q, causal, fp8):
    """A persistent grid of one CTA per SM, 3 warpgroups, SMEM within Hopper's 232,448 bytes; S = Q K^T as
    64x64 wgmmas from SMEM (K read transposed), P V as 64x256 wgmmas with P from registers; the softmax
    scale (in log2 units) is the one asked for."""
    kernel = export_kernel(s_q, causal, fp8)
    grid, threads, smem = kernel.launch()
    assert grid == (132, 1, 1) and threads == (384, 1, 1)
    assert 150_000 < smem <= HOPPER_SMEM_BYTES, smem  # Q + two page stages (+ the FP8 tile) and the rest
    assert kernel.wgmmas() == {Wgmma(64, 64, 16, "bf16", False), Wgmma(64, 256, 16, "bf16", True)}
    assert np.float32(576 ** -0.5 * LOG2E) in kernel.f32_constants()


@pytest.mark.timeout(300)
def test_variants_lower_to_different_kernels():
    """The interpreter's variant stages P in SMEM (A from a descriptor) where the GPU's keeps it in registers
    (compared at d = 192: the interpreter's extra K^T stages do not fit Hopper's SMEM at 576); causal masking,
    the cache format and the softmax scale each change the lowered kernel."""
    small_gpu = export_kernel(d=192, dv=128, scale=192 ** -0.5)
    interpreter = export_kernel(d=192, dv=128, scale=192 ** -0.5, for_interpreter=True)
    assert small_gpu.wgmmas() == {Wgmma(64, 64, 16, "bf16", False), Wgmma(64, 64, 16, "bf16", True)}
    assert interpreter.wgmmas() == {Wgmma(64, 64, 16, "bf16", False)}  # P V's A from SMEM too
    assert interpreter.launch()[2] > small_gpu.launch()[2]  # + the pre-transposed K^T stages and P
    gpu = export_kernel()
    hashes = {k.kernel_hash for k in (gpu, interpreter, export_kernel(s_q=2, causal=True), export_kernel(fp8=True))}
    assert len(hashes) == 4
    approx = export_kernel(approx_math=True)
    assert approx.kernel_hash != gpu.kernel_hash and "ex2.approx" in approx.text and "ex2.approx" not in gpu.text
    scaled = export_kernel(scale=1.02 * 576 ** -0.5)
    assert np.float32(1.02 * 576 ** -0.5 * LOG2E) in scaled.f32_constants()
    assert np.float32(576 ** -0.5 * LOG2E) not in scaled.f32_constants()


def _sweep_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "mla_decode.py"
    spec = importlib.util.spec_from_file_location("mla_decode_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_sweep_dry_run_exports_the_largest_gpu_suite_cases():
    """FlashMLA's grid as issue 19 widens it (160 cases), and the gpu_suite section's largest kernels (h_q 128,
    the longest table, per s_q and cache) lowered for CUDA from abstract shapes as ``--dry-run`` does; the
    approximate-math variant's lowering is checked by test_variants_lower_to_different_kernels."""
    sweep = _sweep_module()
    full = sweep.sweep_cases()
    assert len(full) == 160 and {c.batch for c in full} == {64, 128} and {c.h_q for c in full} == {16, 32, 64, 128}
    assert {c.mean_sk for c in full} == {1024, 2048, 4096, 8192, 16384} and {c.s_q for c in full} == {1, 2}
    assert {c.fp8 for c in full} == {False, True}
    largest = [c for c in sweep.sweep_cases(quick=True) if c.h_q == 128 and c.mean_sk == 16384]
    report = sweep.dry_run(largest, variants=("mosaic_gpu",))
    assert report["failed"] == 0, [row for row in report["rows"] if "error" in row]
    assert len(report["rows"]) == 4 and all(row["mosaic_kernels"] == 1 for row in report["rows"])
