"""The FP8 GEMM kernel's pipeline variants (``KernelConfig``): one pipeline across a CTA's tiles
(``pipeline_across_tiles``), two epilogue staging buffers (``epilogue_buffers=2``), stages released right after
the wgmma wait (``early_release``); and 256-row tiles (two 64-row waves per compute warpgroup).

Each runs in the interpreter on exp(2 randn)-scaled inputs against the XLA path (rtol 1e-5, as
``test_fp8_scales.py``) with several tiles per CTA (so the pipeline state, the buffer alternation and the
carried tile count all matter), once with empty tiles between busy ones (masked layout); and each lowers for
CUDA to a kernel of its own. Three small interpreted launches (~3-10 s each)."""

import functools
import sys
import pathlib

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.fp8_gemm import kernel_ops, reference
from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig
from pallas_kernels.quant import per_block_cast_to_fp8, per_token_cast_to_fp8

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_fp8_kernel import EXPORT_CASES, _export  # noqa: E402
from test_fp8_scales import (_abs, _reset_interpreter_after_failure, assert_matches_xla, forced,  # noqa: E402,F401
                             scaled_normal)

ALL_THREE = dict(pipeline_across_tiles=True, epilogue_buffers=2, early_release=True)


@pytest.mark.timeout(120)
def test_pipeline_variants_normal_gemm():
    # 9 column tiles of 32 over 4 CTAs: CTA 0 runs 3 tiles (START, STEADY, STOP), CTA 3 one (a plain pipeline);
    # 2 K steps in a 2-deep pipeline; tiles of 32 straddle no scale block but N spans 3.
    m, n, k = 72, 288, 256
    x, w = scaled_normal((m, k), 0, block_axes=(-1,)), scaled_normal((n, k), 1)
    (a, sa), (b, sb) = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
    out = kernel_ops.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32, interpret=True, config=forced(32, **ALL_THREE))
    assert_matches_xla(out, reference.fp8_gemm_nt(a, sa, b, sb, jnp.float32),
                       reference.fp8_gemm_nt(_abs(a), sa, _abs(b), sb, jnp.float32))


@pytest.mark.timeout(120)
def test_pipeline_variants_masked_with_empty_tiles():
    # 3 groups x 2 row tiles of 64 x 2 column tiles of 48 = 12 tiles over 4 CTAs; groups 0 and 2 have rows only
    # in their first row tile and group 1 none, so most CTAs meet empty tiles between and after busy ones (the
    # carried count, not the loop index, picks the pipeline state and the epilogue buffer).
    g, m_max, n, k = 3, 128, 96, 256
    x = scaled_normal((g, m_max, k), 2, block_axes=(-1,))
    w = scaled_normal((g, n, k), 3)
    (a, sa), (b, sb) = jax.vmap(per_token_cast_to_fp8)(x), jax.vmap(per_block_cast_to_fp8)(w)
    masked_m = jnp.array([40, 0, 64], jnp.int32)
    config = forced(48, tile_m=64, promotion="tile_scalar", **ALL_THREE)
    out = kernel_ops.m_grouped_masked(a, sa, b, sb, masked_m, 64, out_dtype=jnp.float32, interpret=True, config=config)
    xla = reference.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, jnp.float32)
    magnitude = reference.m_grouped_fp8_gemm_nt_masked(_abs(a), sa, _abs(b), sb, masked_m, jnp.float32)
    for group, rows in enumerate(masked_m.tolist()):
        assert_matches_xla(out[group, :rows], xla[group, :rows], magnitude[group, :rows])


@pytest.mark.timeout(120)
def test_tile_m_256_two_waves_per_warpgroup():
    # 300 rows: two row tiles of 256 (the second 44 rows: one partial wave, three empty ones); tile_scalar at
    # tile_n 48 straddles scale blocks, so each wave's row scales times the right block scale matter.
    m, n, k = 300, 192, 256
    x, w = scaled_normal((m, k), 4, block_axes=(-1,)), scaled_normal((n, k), 5)
    (a, sa), (b, sb) = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
    config = forced(48, tile_m=256, promotion="tile_scalar")
    assert (config.num_compute_wgs, config.waves) == (2, 2)
    out = kernel_ops.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32, interpret=True, config=config)
    assert_matches_xla(out, reference.fp8_gemm_nt(a, sa, b, sb, jnp.float32),
                       reference.fp8_gemm_nt(_abs(a), sa, _abs(b), sb, jnp.float32))


EXPORT_BASE = dict(tile_n=96, max_concurrent_steps=4, num_sms=132)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["masked", "contiguous"])
def test_pipeline_variants_lower_for_cuda(name):
    modules = {key: _export(name, KernelConfig(**EXPORT_BASE, **changes)) for key, changes in
               {"base": {}, "across": dict(pipeline_across_tiles=True), "buffers": dict(epilogue_buffers=2),
                "early": dict(early_release=True), "all": ALL_THREE}.items()}
    assert len(set(modules.values())) == len(modules)  # each flag changes the kernel


@pytest.mark.timeout(120)
def test_pipeline_across_tiles_needs_a_static_length_divisible_by_the_depth():
    fn, args = EXPORT_CASES["k_grouped"]  # the GPU's k-grouped pipelines have data-dependent lengths
    config = KernelConfig(**{**EXPORT_BASE, "tile_n": 64}, pipeline_across_tiles=True)
    with pytest.raises(ValueError, match="pipeline_across_tiles"):
        jax.export.export(jax.jit(functools.partial(fn, config=config)), platforms=["cuda"])(*args)
    fn, args = EXPORT_CASES["fp8_gemm_nt"]  # k 520 -> 5 K steps, 4 stages
    with pytest.raises(ValueError, match="5 K steps"):
        config = KernelConfig(**EXPORT_BASE, pipeline_across_tiles=True)
        jax.export.export(jax.jit(functools.partial(fn, config=config)), platforms=["cuda"])(*args)
