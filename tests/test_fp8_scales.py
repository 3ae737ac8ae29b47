"""FP8 GEMM tests that can see scale bugs: every op's kernel (interpret) == its XLA path to float32 rounding.

With i.i.d. normal inputs all 128x128 B scales are nearly equal, so a kernel that applies the wrong scale
to a column (a tile's first block scale to every column of a tile straddling two blocks, a swapped scale
axis) is still within DeepGEMM's calc_diff < 1e-3. Here the inputs are scaled per row and per 128-block by
exp(2 randn) (each scale block differs from its neighbours by ~e^2), N spans several 128-column scale
blocks and the tile width (48, 80) does not divide 128, so tiles straddle scale blocks. Each op is checked
element by element against the XLA path (both promote per 128 of K in f32) at rtol 1e-5, and against the
float64 product of the dequantised operands (calc_diff < 1e-9: the kernel computes the quantised product to
float32 rounding). (Scaling B's rows inside a 128x128 block costs the small rows precision in the cast itself,
so the unquantised product is not the oracle here; ``test_fp8_gemm.py`` checks that at calc_diff < 1e-3.)

Each case is one small interpreted launch (~3-5 s)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_gemm import kernel_ops, reference
from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig
from pallas_kernels.interpret import INTERPRET_SMS, reset_interpreter
from pallas_kernels.numerics import calc_diff
from pallas_kernels.quant import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _reset_interpreter_after_failure(request):
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        reset_interpreter()


def scaled_normal(shape, seed, row_axis=-2, block_axes=(-2, -1)):
    """[..., r, c] float32 normal values times exp(2 randn) per row and per 128x128 block (per 128 along
    an axis of ``block_axes``; a block axis left out is not blocked), so neighbouring scale blocks differ."""
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], shape, jnp.float32)
    row_shape = [1] * len(shape)
    row_shape[row_axis] = shape[row_axis]
    x = x * jnp.exp(2 * jax.random.normal(keys[1], row_shape))
    block_shape = [1] * len(shape)
    for axis in block_axes:
        block_shape[axis] = -(-shape[axis] // 128)
    block = jnp.exp(2 * jax.random.normal(keys[2], block_shape))
    for axis in block_axes:
        block = jnp.repeat(block, 128, axis=axis)
    return x * block[tuple(slice(0, s) for s in shape)]


def _abs(x):
    """|x| of an e4m3 array (exact)."""
    return jnp.abs(x.astype(jnp.float32)).astype(x.dtype)


def dequantized(data, scale, blocked_rows=False):
    """float64 values of an FP8 operand: data [..., r, k] times its scales [..., r or ceil(r / 128), ceil(k / 128)]."""
    scale = np.repeat(np.asarray(scale, np.float64), 128, axis=-1)[..., :data.shape[-1]]
    if blocked_rows:
        scale = np.repeat(scale, 128, axis=-2)[..., :data.shape[-2], :]
    return np.asarray(data.astype(jnp.float32), np.float64) * scale


QUANTISED_CALC_DIFF = 1e-9


def assert_matches_xla(kernel, xla, magnitude):
    """|kernel - xla| <= RTOL * (|xla| + magnitude) element by element; ``magnitude`` is the same GEMM on |a|
    and |b| (the sum of the terms' sizes, which bounds float32 rounding when terms cancel)."""
    kernel, xla, magnitude = (np.asarray(v, np.float64) for v in (kernel, xla, magnitude))
    assert np.isfinite(kernel).all()
    bad = np.abs(kernel - xla) > RTOL * (np.abs(xla) + magnitude)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} elements differ from the XLA path, first at "
                           f"{np.argwhere(bad)[0]}: kernel {kernel[bad][0]}, xla {xla[bad][0]}")


def forced(tile_n, **changes):
    """A config whose tile width does not divide 128 (the heuristic would choose otherwise)."""
    return dataclasses.replace(KernelConfig(tile_n=tile_n, max_concurrent_steps=2, num_sms=INTERPRET_SMS), **changes)


# Each promotion with a tile width that straddles scale blocks, and the one-warpgroup 64-row tile.
NORMAL_CONFIGS = {"per_column_48": forced(48), "tile_scalar_48": forced(48, promotion="tile_scalar"),
                  "tile_scalar_80_m64": forced(80, promotion="tile_scalar", tile_m=64)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", list(NORMAL_CONFIGS.values()), ids=list(NORMAL_CONFIGS))
def test_normal_gemm_scale_blocks(config):
    m, n, k = 72, 288, 384  # 3 x 3 B scale blocks (square: a swapped scale axis still type-checks)
    x, w = scaled_normal((m, k), 0, block_axes=(-1,)), scaled_normal((n, k), 1)
    (a, sa), (b, sb) = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
    out = kernel_ops.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32, interpret=True, config=config)
    assert out.shape == (m, n)
    assert_matches_xla(out, reference.fp8_gemm_nt(a, sa, b, sb, jnp.float32),
                       reference.fp8_gemm_nt(_abs(a), sa, _abs(b), sb, jnp.float32))
    assert calc_diff(out, dequantized(a, sa) @ dequantized(b, sb, True).T) < QUANTISED_CALC_DIFF


@pytest.mark.timeout(300)
@pytest.mark.parametrize("promotion", ["tile_scalar"])  # per_column: the normal, masked and k-grouped tests
def test_contiguous_scale_blocks(promotion):
    sizes, k, n = (40, 0, 100), 256, 288  # tile 80 pads N to 320; tiles straddle columns 128 and 256
    m = sum(sizes)
    row_groups = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    starts = jnp.asarray(np.cumsum((0,) + sizes[:-1]), jnp.int32)
    ends = starts + jnp.asarray(sizes, jnp.int32)
    x, w = scaled_normal((m, k), 2, block_axes=(-1,)), scaled_normal((len(sizes), n, k), 3)
    (a, sa), (b, sb) = per_token_cast_to_fp8(x), jax.vmap(per_block_cast_to_fp8)(w)
    out = kernel_ops.m_grouped_contiguous(a, sa, b, sb, starts, ends, out_dtype=jnp.float32, interpret=True,
                                          config=forced(80, promotion=promotion))
    groups = jnp.asarray(row_groups)
    assert_matches_xla(out, reference.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, groups, jnp.float32),
                       reference.m_grouped_fp8_gemm_nt_contiguous(_abs(a), sa, _abs(b), sb, groups, jnp.float32))
    expected = np.einsum("mk,mnk->mn", dequantized(a, sa), dequantized(b, sb, True)[row_groups])
    assert calc_diff(out, expected) < QUANTISED_CALC_DIFF


@pytest.mark.timeout(300)
def test_masked_scale_blocks():
    masked_m, m_max, n, k = (70, 33), 70, 208, 256  # 2 x 2 B scale blocks per group; tile 48 pads N to 240
    x, w = scaled_normal((2, m_max, k), 4, block_axes=(-1,)), scaled_normal((2, n, k), 5)
    (a, sa), (b, sb) = jax.vmap(per_token_cast_to_fp8)(x), jax.vmap(per_block_cast_to_fp8)(w)
    mm = jnp.asarray(masked_m, jnp.int32)
    out = kernel_ops.m_grouped_masked(a, sa, b, sb, mm, 64, out_dtype=jnp.float32, interpret=True,
                                      config=forced(48, promotion="tile_scalar", tile_m=64))
    xla = reference.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, mm, jnp.float32)
    magnitude = reference.m_grouped_fp8_gemm_nt_masked(_abs(a), sa, _abs(b), sb, mm, jnp.float32)
    expected = np.einsum("gmk,gnk->gmn", dequantized(a, sa), dequantized(b, sb, True))
    for g, rows in enumerate(masked_m):
        assert_matches_xla(out[g, :rows], xla[g, :rows], magnitude[g, :rows])
        assert calc_diff(out[g, :rows], expected[g, :rows]) < QUANTISED_CALC_DIFF


@pytest.mark.timeout(300)
def test_k_grouped_scale_blocks():
    group_ks, m, n = (256, 0, 128), 40, 176  # 1x128 scales on both sides, per column of B; 64-row tiles
    tokens = sum(group_ks)
    dy = scaled_normal((tokens, m), 6, row_axis=-1, block_axes=(-2,))  # scaled per channel and per 128 tokens
    act = scaled_normal((tokens, n), 7, row_axis=-1, block_axes=(-2,))
    qa, qb = per_channel_cast_to_fp8(dy), per_channel_cast_to_fp8(act)
    (a, sa), (b, sb) = (qa.data.T, qa.scale.T), (qb.data.T, qb.scale.T)
    ks = jnp.asarray(group_ks, jnp.int32)
    out = kernel_ops.k_grouped_contiguous(a, sa, b, sb, ks, interpret=True, config=forced(48, tile_m=64))
    assert_matches_xla(out, reference.k_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, ks),
                       reference.k_grouped_fp8_gemm_nt_contiguous(_abs(a), sa, _abs(b), sb, ks))
    a64, b64 = dequantized(a, sa), dequantized(b, sb)
    start = 0
    for g, size in enumerate(group_ks):
        expected = a64[:, start:start + size] @ b64[:, start:start + size].T
        if size:
            assert calc_diff(out[g], expected) < QUANTISED_CALC_DIFF
        else:
            np.testing.assert_array_equal(np.asarray(out[g]), 0.0)
        start += size


def test_tile_scalar_promotion_limits():
    with pytest.raises(ValueError, match="promotion"):  # a 200-wide tile can span three 128-column blocks
        forced(200, promotion="tile_scalar")
    assert forced(192, promotion="tile_scalar").tile_n == 192  # 192 + 64 <= 256: never more than two
    x = per_channel_cast_to_fp8(jnp.ones((128, 16)))
    with pytest.raises(ValueError, match="per column"):  # the weight-gradient GEMM's B scales are per column
        kernel_ops.k_grouped_contiguous(x.data.T, x.scale.T, x.data.T, x.scale.T, jnp.array([128], jnp.int32),
                                        interpret=True, config=forced(16, promotion="tile_scalar"))


def test_clusters_are_refused_by_the_interpreter():
    x = per_token_cast_to_fp8(jnp.ones((8, 128)))
    w = per_block_cast_to_fp8(jnp.ones((256, 128)))
    with pytest.raises(NotImplementedError, match="cluster"):  # GPU-only: export-tested in test_fp8_kernel.py
        kernel_ops.fp8_gemm_nt(x.data, x.scale, w.data, w.scale, out_dtype=jnp.float32, interpret=True,
                               config=forced(128, cluster_n=2))
