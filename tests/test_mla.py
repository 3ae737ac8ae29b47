import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseek.config import MLAConfig
from jaxseek.model.mla import MultiHeadLatentAttention

CONFIGS = {
    "q_lora": MLAConfig(num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=12),
    "no_q_lora": MLAConfig(num_heads=2, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                           v_head_dim=8),
}


def _attention(config, seed=0):
    return MultiHeadLatentAttention(64, config, eps=1e-6, dtype=jnp.float32, init_std=0.2, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_absorbed_form_equals_expanded_form(name):
    attn = _attention(CONFIGS[name])
    x = jax.random.normal(jax.random.key(1), (3, 11, 64))
    positions = jnp.broadcast_to(jnp.arange(11), (3, 11))
    expanded = attn(x, positions, form="expanded")
    absorbed = attn(x, positions, form="absorbed")
    assert expanded.shape == (3, 11, 64)
    assert float(jnp.abs(expanded).max()) > 1e-2  # not trivially zero
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(expanded), rtol=2e-5, atol=2e-5)


def test_latent_rows_have_the_decode_layout():
    config = CONFIGS["q_lora"]
    attn = _attention(config)
    x = jax.random.normal(jax.random.key(2), (2, 5, 64))
    latent = attn.project_latent(x, jnp.broadcast_to(jnp.arange(5), (2, 5)))
    assert latent.shape == (2, 5, config.kv_lora_rank + config.qk_rope_head_dim)
    q_nope, q_rope = attn.project_queries(x, jnp.broadcast_to(jnp.arange(5), (2, 5)))
    assert attn.absorb_queries(q_nope, q_rope).shape == (2, 5, 4, config.latent_dim)


@pytest.mark.parametrize("form", ["expanded", "absorbed"])
def test_attention_is_causal(form):
    attn = _attention(CONFIGS["q_lora"])
    x = jax.random.normal(jax.random.key(3), (1, 9, 64))
    positions = jnp.arange(9)[None]
    changed = x.at[:, 6:].set(jax.random.normal(jax.random.key(4), (1, 3, 64)))
    out, out_changed = attn(x, positions, form=form), attn(changed, positions, form=form)
    np.testing.assert_array_equal(np.asarray(out[:, :6]), np.asarray(out_changed[:, :6]))
    assert not np.allclose(np.asarray(out[:, 6:]), np.asarray(out_changed[:, 6:]))


def test_rope_makes_scores_depend_on_relative_position_only():
    attn = _attention(CONFIGS["q_lora"])
    x = jax.random.normal(jax.random.key(5), (1, 6, 64))
    out = attn(x, jnp.arange(6)[None])
    shifted = attn(x, jnp.arange(6)[None] + 37)
    np.testing.assert_allclose(np.asarray(out), np.asarray(shifted), rtol=1e-4, atol=1e-5)


def test_unknown_form_is_rejected():
    attn = _attention(CONFIGS["q_lora"])
    with pytest.raises(ValueError, match="form"):
        attn(jnp.zeros((1, 2, 64)), jnp.arange(2)[None], form="flash")
