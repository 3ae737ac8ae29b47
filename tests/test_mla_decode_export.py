"""The GPU variant of the MLA decoding kernel, lowered for CUDA on the CPU (``jax.export``): it lowers, and
the lowered kernel has the launch, the shared memory, the wgmma shapes and the softmax scale it must have.
The interpreted tests (test_mla_decode.py) check the code both variants share; these check what only the
GPU variant has (variant.py): P from registers, K read transposed, the per-item pipeline, the output staged
through Q's buffer (a RefUnion); and that both score schedules (split, duplicated) lower."""

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
                  d=576, dv=512, approx_math=False, split_scores=None):
    """The kernel for CUDA, by default DeepSeek-shaped (576/512; 4 sequences of up to 16 pages, 136 slots)."""
    pages = FP8Pages(d=d, dv=dv) if fp8 else DensePages(d=d)
    config = DecodeConfig(d=d, dv=dv, s_q=s_q, heads=heads, softmax_scale=scale, causal=causal, num_sms=num_sms,
                          pages=pages, for_interpreter=for_interpreter, approx_math=approx_math,
                          split_scores=split_scores)
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


SPLIT_SCORES = {Wgmma(64, 32, 16, "bf16", False), Wgmma(64, 256, 16, "bf16", True)}  # S per 32-token half
DUPLICATED_SCORES = {Wgmma(64, 64, 16, "bf16", False), Wgmma(64, 256, 16, "bf16", True)}  # S over all 64 tokens
Q_BYTES, PAGE_STAGES_BYTES, P_AND_STATS_BYTES = 64 * 576 * 2, 2 * 64 * 576 * 2, 64 * 64 * 2 + 1024


@pytest.mark.timeout(300)
@pytest.mark.parametrize("s_q, causal, fp8", [(1, False, False), (2, True, False), (1, False, True), (2, True, True)])
def test_gpu_variant_lowers_with_register_p_and_fits_shared_memory(s_q, causal, fp8):
    """A persistent grid of one CTA per SM, 3 warpgroups, SMEM within Hopper's 232,448 bytes; S = Q K^T from
    SMEM (K read transposed): per warpgroup its own 32 tokens of the page (64x32 wgmmas) with the bf16 cache,
    all 64 tokens with the FP8 cache (no room for the swap); P V as 64x256 wgmmas with P from registers; the
    softmax scale (in log2 units) is the one asked for."""
    kernel = export_kernel(s_q, causal, fp8)
    grid, threads, smem = kernel.launch()
    assert grid == (132, 1, 1) and threads == (384, 1, 1)
    assert 150_000 < smem <= HOPPER_SMEM_BYTES, smem  # Q + two page stages (+ the FP8 tile) and the rest
    assert kernel.wgmmas() == (DUPLICATED_SCORES if fp8 else SPLIT_SCORES)
    assert np.float32(576 ** -0.5 * LOG2E) in kernel.f32_constants()
    if not fp8:  # the output is staged through Q's buffer: no SMEM beyond Q, the pages, P, the row stats
        assert smem < Q_BYTES + PAGE_STAGES_BYTES + P_AND_STATS_BYTES + 1024, smem


@pytest.mark.timeout(300)
def test_score_schedules_lower_to_different_kernels():
    """The split schedule (each warpgroup scores its own 32 tokens, P and the row maxima swapped in SMEM) and
    round 1's duplicated one are both selectable; the duplicated one needs no P buffer. The FP8 cache takes
    the split one when asked for at a size where it fits (d = 320)."""
    split, duplicated = export_kernel(split_scores=True), export_kernel(split_scores=False)
    assert split.wgmmas() == SPLIT_SCORES and duplicated.wgmmas() == DUPLICATED_SCORES
    assert duplicated.launch()[2] < split.launch()[2]
    fp8_split = export_kernel(fp8=True, d=320, dv=256, scale=320 ** -0.5, split_scores=True)
    assert fp8_split.wgmmas() == {Wgmma(64, 32, 16, "bf16", False), Wgmma(64, 128, 16, "bf16", True)}
    with pytest.raises(ValueError, match="shared memory"):  # why the FP8 cache's default is the duplicated one
        export_kernel(fp8=True, split_scores=True)


@pytest.mark.timeout(300)
def test_variants_lower_to_different_kernels():
    """The interpreter's variant stages P in SMEM (A from a descriptor) where the GPU's keeps it in registers
    (compared at d = 192 with the duplicated schedule: the interpreter's extra K^T stages do not fit Hopper's
    SMEM at 576, and its split schedule reads P from an untiled buffer, which only the interpreter takes);
    causal masking, the cache format and the softmax scale each change the lowered kernel."""
    small_gpu = export_kernel(d=192, dv=128, scale=192 ** -0.5, split_scores=False)
    interpreter = export_kernel(d=192, dv=128, scale=192 ** -0.5, for_interpreter=True, split_scores=False)
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
