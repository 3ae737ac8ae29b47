import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant import (AMAX_FLOOR, FP8_MAX, dequantize_per_block, dequantize_per_channel,
                                  dequantize_per_token, per_block_cast_to_fp8, per_channel_cast_to_fp8,
                                  per_token_cast_to_fp8)

E4M3_RELATIVE_STEP = 2.0 ** -3  # 3 mantissa bits: neighbouring normal values differ by at most 1/8


@pytest.mark.parametrize("shape", [(5, 128), (3, 300), (1, 1), (64, 257)])
def test_per_token_cast_round_trips_within_e4m3_precision(shape):
    x = jax.random.normal(jax.random.key(0), shape) * 10
    q = per_token_cast_to_fp8(x)
    assert q.data.shape == shape and q.data.dtype == jnp.float8_e4m3fn
    assert q.scale.shape == (shape[0], -(-shape[1] // 128)) and q.scale.dtype == jnp.float32
    back = np.asarray(dequantize_per_token(q))
    groups = np.repeat(np.asarray(q.scale), 128, axis=1)[:, :shape[1]] * FP8_MAX  # the amax of each 1x128 group
    assert np.all(np.abs(back - np.asarray(x)) <= E4M3_RELATIVE_STEP * groups / 2 + 1e-6)
    # The largest element of every group maps to +-448 exactly.
    padded = np.pad(np.abs(np.asarray(q.data, np.float32)), ((0, 0), (0, -shape[1] % 128)))
    np.testing.assert_array_equal(padded.reshape(shape[0], -1, 128).max(-1), FP8_MAX)


def test_per_block_cast_and_scales_per_block():
    w = jax.random.normal(jax.random.key(1), (300, 200))
    q = per_block_cast_to_fp8(w)
    assert q.scale.shape == (3, 2)
    np.testing.assert_allclose(np.asarray(q.scale[1, 0]), np.abs(np.asarray(w)[128:256, :128]).max() / FP8_MAX,
                               rtol=1e-6)
    back = np.asarray(dequantize_per_block(q))
    assert np.abs(back - np.asarray(w)).max() <= E4M3_RELATIVE_STEP * float(q.scale.max()) * FP8_MAX / 2


def test_per_channel_cast_is_the_transposed_per_token_cast():
    x = jax.random.normal(jax.random.key(2), (260, 40))
    q, t = per_channel_cast_to_fp8(x), per_token_cast_to_fp8(x.T)
    assert q.scale.shape == (3, 40)
    np.testing.assert_array_equal(np.asarray(q.data, np.float32), np.asarray(t.data, np.float32).T)
    np.testing.assert_allclose(np.asarray(dequantize_per_channel(q)), np.asarray(x), rtol=0.07, atol=0.05)


def test_amax_floor_keeps_zero_groups_finite():
    q = per_token_cast_to_fp8(jnp.zeros((2, 130)))
    np.testing.assert_allclose(np.asarray(q.scale), AMAX_FLOOR / FP8_MAX)
    assert not np.any(np.asarray(q.data, np.float32))


def test_ue8m0_scales_are_powers_of_two_and_never_overflow():
    x = jax.random.normal(jax.random.key(3), (8, 512)) * 37
    x = x * jnp.logspace(-9, 0, 8)[:, None]  # small groups too: exp2 is an ulp off there on XLA:CPU
    x = x.at[0, :128].set(0.0)  # a zero group sits at the amax floor
    q = per_token_cast_to_fp8(x, ue8m0=True)
    mantissa, _ = np.frexp(np.asarray(q.scale))
    np.testing.assert_array_equal(mantissa, 0.5)  # exact powers of two: the exponent byte is the whole scale
    assert np.all(np.isfinite(np.asarray(q.data, np.float32)))
    assert (np.abs(np.asarray(x)) / np.repeat(np.asarray(q.scale), 128, 1) <= FP8_MAX).all()


def test_non_matrix_input_names_the_argument():
    with pytest.raises(ValueError, match="x"):
        per_token_cast_to_fp8(jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="w"):
        per_block_cast_to_fp8(jnp.zeros((4,)))
