"""FP8 GEMMs: every op in ``xla`` and ``interpret`` (the Mosaic GPU kernel on the CPU) against float64
products of the unquantised inputs (DeepGEMM's calc_diff < 1e-3), on scaled-down DeepGEMM shape
families and odd shapes. Interpret mode starts every buffer as NaN, so an output element the kernel
never writes shows up as NaN (the poison check)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_gemm import api
from pallas_kernels.interpret import reset_interpreter
from pallas_kernels.numerics import calc_diff
from pallas_kernels.quant import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8

IMPLEMENTATIONS = ["xla", "interpret"]


@pytest.fixture(autouse=True)
def _reset_interpreter_after_failure(request):
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        reset_interpreter()


def _normal(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# DeepGEMM's normal families (M in {64, 128, 4096} x (N, K) in {(2112, 7168), (7168, 2048), ...}) scaled
# down for the interpreter, plus m = 1, K not a multiple of 128 and N not a multiple of 64.
NORMAL_SHAPES = [(64, 264, 896), (128, 128, 256), (1, 64, 384), (96, 80, 200), (200, 136, 640)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("m,n,k", NORMAL_SHAPES)
def test_fp8_gemm_nt(implementation, m, n, k):
    x, w = _normal((m, k), 0), _normal((n, k), 1)
    out = api.fp8_gemm_nt(per_token_cast_to_fp8(x), per_block_cast_to_fp8(w), out_dtype=jnp.float32,
                          implementation=implementation)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()  # every element written
    assert calc_diff(out, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) < 1e-3


@pytest.mark.timeout(300)
def test_interpret_matches_xla_to_float32_rounding():
    x, w = _normal((130, 300), 2), _normal((72, 300), 3)
    lhs, rhs = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
    kernel = api.fp8_gemm_nt(lhs, rhs, out_dtype=jnp.float32, implementation="interpret")
    xla = api.fp8_gemm_nt(lhs, rhs, out_dtype=jnp.float32, implementation="xla")
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(xla), rtol=1e-5, atol=1e-4)
    bf16 = api.fp8_gemm_nt(lhs, rhs, implementation="interpret")
    assert bf16.dtype == jnp.bfloat16


def _grouped_reference(x, w, row_groups):
    out = np.zeros((x.shape[0], w.shape[1]))
    for row, group in enumerate(row_groups):
        if group >= 0:
            out[row] = np.asarray(w[group], np.float64) @ np.asarray(x[row], np.float64)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("sizes", [(40, 0, 130, 7), (200,), (0, 0, 64)], ids=["ragged_with_empty", "one_group",
                                                                               "leading_empty"])
def test_m_grouped_contiguous_ragged_groups(implementation, sizes):
    k, n = 256, 96
    num_groups = len(sizes)
    skipped = 9  # rows marked -1 between the first and second group
    row_groups = np.concatenate([np.full(sizes[0], 0), np.full(skipped, -1)]
                                + [np.full(s, g) for g, s in enumerate(sizes[1:], start=1)]).astype(np.int32)
    x, w = _normal((row_groups.size, k), 4), _normal((num_groups, n, k), 5)
    out = api.m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(x), jax.vmap(per_block_cast_to_fp8)(w),
                                               jnp.asarray(row_groups), out_dtype=jnp.float32,
                                               implementation=implementation)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out)[row_groups < 0], 0.0)
    assert calc_diff(out, _grouped_reference(x, w, row_groups)) < 1e-3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_m_grouped_contiguous_group_offsets_layout(implementation):
    offsets = jnp.array([0, 70, 70, 150], jnp.int32)  # groups of 70, 0 and 80 rows; rows 150+ skipped
    x, w = _normal((170, 128), 6), _normal((3, 64, 128), 7)
    out = api.m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(x), jax.vmap(per_block_cast_to_fp8)(w),
                                               group_offsets=offsets, out_dtype=jnp.float32,
                                               implementation=implementation)
    row_groups = np.concatenate([np.zeros(70), np.full(80, 2), np.full(20, -1)]).astype(int)
    assert calc_diff(out, _grouped_reference(x, w, row_groups)) < 1e-3
    np.testing.assert_array_equal(np.asarray(out)[150:], 0.0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("masked_m", [(5, 0, 150), (150,)], ids=["with_zero", "one_group"])
def test_m_grouped_masked(implementation, masked_m):
    num_groups, m_max, n, k = len(masked_m), 150, 80, 384
    x, w = _normal((num_groups, m_max, k), 8), _normal((num_groups, n, k), 9)
    lhs = jax.vmap(per_token_cast_to_fp8)(x)
    out = api.m_grouped_fp8_gemm_nt_masked(lhs, jax.vmap(per_block_cast_to_fp8)(w), jnp.asarray(masked_m, jnp.int32),
                                           expected_m=64, out_dtype=jnp.float32, implementation=implementation)
    assert out.shape == (num_groups, m_max, n)
    for g, rows in enumerate(masked_m):
        valid = np.asarray(out[g, :rows])
        assert np.isfinite(valid).all()
        if rows:
            assert calc_diff(valid, np.asarray(x[g, :rows], np.float64) @ np.asarray(w[g], np.float64).T) < 1e-3


def _token_major(x):
    q = per_channel_cast_to_fp8(x)
    return q.data.T, q.scale.T


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("group_ks", [(256, 0, 384), (512,)], ids=["with_empty", "one_group"])
def test_k_grouped_weight_gradient(implementation, group_ks):
    tokens, m, n = 640, 48, 136
    dy, x = _normal((tokens, m), 10), _normal((tokens, n), 11)
    c = _normal((len(group_ks), m, n), 12)
    out = api.k_grouped_fp8_gemm_nt_contiguous(_token_major(dy), _token_major(x), jnp.asarray(group_ks, jnp.int32),
                                               c=c, implementation=implementation)
    assert out.shape == (len(group_ks), m, n) and out.dtype == jnp.float32
    start = 0
    for g, size in enumerate(group_ks):
        expected = np.asarray(dy[start:start + size], np.float64).T @ np.asarray(x[start:start + size], np.float64)
        if size:
            assert calc_diff(out[g] - c[g], expected) < 1e-3
        else:
            np.testing.assert_array_equal(np.asarray(out[g]), np.asarray(c[g]))
        start += size


def _pair(m=8, k=256):
    return per_token_cast_to_fp8(_normal((m, k), 13))


@pytest.mark.parametrize("call, argument", [
    (lambda: api.fp8_gemm_nt((jnp.zeros((8, 256), jnp.bfloat16), jnp.ones((8, 2))), per_block_cast_to_fp8(
        _normal((16, 256), 1))), "lhs"),  # wrong dtype
    (lambda: api.fp8_gemm_nt((_pair().data, jnp.ones((8, 3))), per_block_cast_to_fp8(_normal((16, 256), 1))),
     "lhs scales"),  # scale shape
    (lambda: api.fp8_gemm_nt(_pair(), per_block_cast_to_fp8(_normal((16, 128), 1))), "rhs"),  # K mismatch
    (lambda: api.fp8_gemm_nt(_pair(), per_block_cast_to_fp8(_normal((16, 256), 1)), out_dtype=jnp.int8),
     "out_dtype"),
    (lambda: api.fp8_gemm_nt(_pair(), per_block_cast_to_fp8(_normal((16, 256), 1)), implementation="cublas"),
     "implementation"),
    (lambda: api.m_grouped_fp8_gemm_nt_contiguous(_pair(), jax.vmap(per_block_cast_to_fp8)(_normal((2, 16, 256), 1)),
                                                  jnp.array([0, 1, 2, 0, 0, 0, 0, 0], jnp.int32)), "m_indices"),
    (lambda: api.m_grouped_fp8_gemm_nt_contiguous(_pair(), jax.vmap(per_block_cast_to_fp8)(_normal((2, 16, 256), 1)),
                                                  jnp.zeros((8,), jnp.float32)),
     "m_indices"),
    (lambda: api.m_grouped_fp8_gemm_nt_contiguous(_pair(), jax.vmap(per_block_cast_to_fp8)(_normal((2, 16, 256), 1)),
                                                  group_offsets=jnp.array([0, 9, 4], jnp.int32)), "group_offsets"),
    (lambda: api.m_grouped_fp8_gemm_nt_masked(jax.vmap(per_token_cast_to_fp8)(_normal((2, 8, 256), 1)),
                                              jax.vmap(per_block_cast_to_fp8)(_normal((2, 16, 256), 1)),
                                              jnp.array([1, 2], jnp.int32), expected_m=-3), "expected_m"),
    (lambda: api.k_grouped_fp8_gemm_nt_contiguous(_token_major(_normal((256, 8), 1)), _token_major(_normal((256, 8), 2)),
                                                  jnp.array([100, 156], jnp.int32)), "group_ks"),
])
def test_bad_inputs_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_implementation_choice_on_a_cpu():
    lhs, rhs = _pair(), per_block_cast_to_fp8(_normal((16, 256), 1))
    with pytest.raises(NotImplementedError, match="Hopper"):
        api.fp8_gemm_nt(lhs, rhs, implementation="mosaic_gpu")
    default = api.fp8_gemm_nt(lhs, rhs)  # falls back to xla on a CPU
    np.testing.assert_array_equal(np.asarray(default), np.asarray(api.fp8_gemm_nt(lhs, rhs, implementation="xla")))


def test_ops_are_jittable_with_traced_groups():
    x, w = _normal((100, 256), 1), _normal((2, 32, 256), 2)
    lhs, rhs = per_token_cast_to_fp8(x), jax.vmap(per_block_cast_to_fp8)(w)
    fn = jax.jit(lambda l, r, i: api.m_grouped_fp8_gemm_nt_contiguous(l, r, i, out_dtype=jnp.float32))
    row_groups = jnp.asarray(np.repeat([0, 1], 50), jnp.int32)
    assert calc_diff(fn(lhs, rhs, row_groups), _grouped_reference(x, w, np.asarray(row_groups))) < 1e-3
