"""RoPE as DeepSeek-V3 applies it (adjacent pairs as complex numbers) and YaRN's scaling, against NumPy and
hand-computed values; attention must depend on relative positions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseek.config import MLAConfig
from jaxseek.model import rope
from jaxseek.model.mla import MultiHeadLatentAttention

V3_MLA = MLAConfig(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                   v_head_dim=128, rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0)


def test_rotation_equals_numpy_complex_multiplication_of_adjacent_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 1000, (2, 5)).astype(np.int32)
    freqs = np.array([1.0, 0.1, 0.01, 0.001])
    rotated = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(positions), freqs))
    pairs = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2]
    turned = pairs * np.exp(1j * positions[:, :, None, None] * freqs)
    expected = np.stack([turned.real, turned.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(rotated, expected, rtol=1e-4, atol=1e-4)


def test_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
    freqs = rope.rope_frequencies(MLAConfig(num_heads=1, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=8,
                                            qk_rope_head_dim=16, v_head_dim=8), 4096)

    def score(m, n):
        rq = rope.apply_rope(q, jnp.full((1, 1), m), freqs)
        rk = rope.apply_rope(k, jnp.full((1, 1), n), freqs)
        return float((rq * rk).sum())

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4)
    assert abs(score(7, 3) - score(7, 5)) > 1e-2  # fails if RoPE rotated nothing


def test_attention_output_changes_with_relative_positions():
    attn = MultiHeadLatentAttention(32, MLAConfig(num_heads=2, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                                                  qk_rope_head_dim=8, v_head_dim=8), eps=1e-6, dtype=jnp.float32,
                                    init_std=0.3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 6, 32))
    near = attn(x, jnp.arange(6)[None])
    shifted = attn(x, jnp.arange(6)[None] + 50)
    gapped = attn(x, jnp.array([[0, 1, 2, 30, 31, 32]]))
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(near), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(gapped[:, 3:]) - np.asarray(near[:, 3:])).max() > 1e-3


def test_yarn_frequencies_and_scale_for_deepseek_v3():
    """dim 64, theta 1e4, 4K original context: pairs < floor(10.47) keep theta^(-2i/64), pairs >= ceil(22.51)
    are divided by 40, a linear ramp between; softmax scale 192^-0.5 * (0.1 ln 40 + 1)^2."""
    plain = 1e4 ** (-np.arange(0, 64, 2) / 64)
    freqs = rope.rope_frequencies(V3_MLA, 163840)
    np.testing.assert_allclose(freqs[:10], plain[:10], rtol=1e-12)
    np.testing.assert_allclose(freqs[23:], plain[23:] / 40, rtol=1e-12)
    ramp = np.clip((np.arange(32) - 10) / 13, 0, 1)
    np.testing.assert_allclose(freqs, plain / 40 * ramp + plain * (1 - ramp), rtol=1e-12)
    assert math.isclose(rope.softmax_scale(V3_MLA, 163840), 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    # within the original context YaRN is off: plain frequencies and scale
    np.testing.assert_allclose(rope.rope_frequencies(V3_MLA, 4096), plain, rtol=1e-12)
    assert rope.softmax_scale(V3_MLA, 4096) == 192 ** -0.5
