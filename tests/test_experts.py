import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseek.config import MoEConfig
from jaxseek.model.experts import get_dispatcher, get_grouped_matmul, local_combine, local_dispatch
from jaxseek.model.moe import MoE


def test_dispatch_groups_rows_by_expert_and_combine_undoes_it():
    rng = np.random.default_rng(0)
    tokens, hidden, experts, top_k = 13, 6, 5, 2
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(4, 2, replace=False) for _ in range(tokens)]), jnp.int32)  # expert 4 empty
    rows, layout = local_dispatch(x, ids, experts)
    sizes = np.asarray(layout.group_sizes)
    np.testing.assert_array_equal(sizes, np.bincount(np.asarray(ids).ravel(), minlength=experts))
    assert sizes[4] == 0
    owners = np.repeat(np.arange(experts), sizes)  # expert of each sorted row
    for row, flat in enumerate(np.asarray(layout.order)):
        token, slot = divmod(int(flat), top_k)
        assert owners[row] == int(ids[token, slot])
        np.testing.assert_array_equal(np.asarray(rows[row]), np.asarray(x[token]))
    weights = jnp.asarray(rng.uniform(size=(tokens, top_k)), jnp.float32)
    combined = local_combine(rows, weights, layout)  # identity experts: sum_k w_k * x
    np.testing.assert_allclose(np.asarray(combined), np.asarray(x) * np.asarray(weights).sum(-1, keepdims=True),
                               rtol=1e-6)


def test_grouped_matmul_matches_a_loop_over_groups_with_empty_groups():
    rng = np.random.default_rng(1)
    sizes = np.array([3, 0, 5, 0, 2])
    x = rng.normal(size=(sizes.sum(), 4)).astype(np.float32)
    w = rng.normal(size=(5, 4, 7)).astype(np.float32)
    out = np.asarray(get_grouped_matmul("xla")(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32)))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    expected = np.concatenate([x[bounds[g]:bounds[g + 1]] @ w[g] for g in range(5)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_unknown_strategies_are_rejected():
    with pytest.raises(ValueError, match="moe.dispatch"):
        get_dispatcher("deepep")
    with pytest.raises(ValueError, match="moe.grouped_matmul"):
        get_grouped_matmul("deepgemm")


def test_moe_layer_matches_a_per_token_reference():
    config = MoEConfig(num_routed_experts=8, num_shared_experts=1, num_experts_per_token=3, intermediate_size=12,
                       n_group=4, topk_group=3, routed_scaling_factor=2.0)
    layer = MoE(16, config, dtype=jnp.float32, init_std=0.3, rngs=nnx.Rngs(0))
    layer.expert_bias[...] = jax.random.normal(jax.random.key(9), (8,)) * 0.1
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    y, stats = layer(x)
    flat = np.asarray(x, np.float64).reshape(10, 16)
    logits = flat @ np.asarray(layer.router[...], np.float64).T
    from jaxseek.model.router import route
    routing = route(jnp.asarray(logits, jnp.float32), layer.expert_bias[...], top_k=3, n_group=4, topk_group=3,
                    routed_scaling_factor=2.0)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    wg, wu, wd = (np.asarray(w[...], np.float64) for w in (layer.w_gate, layer.w_up, layer.w_down))
    expected = np.zeros_like(flat)
    for t in range(10):
        for e, weight in zip(np.asarray(routing.expert_ids[t]), np.asarray(routing.weights[t], np.float64)):
            expected[t] += weight * (silu(flat[t] @ wg[e]) * (flat[t] @ wu[e])) @ wd[e]
    shared = layer.shared
    sg, su, sd = (np.asarray(m.kernel[...], np.float64) for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
    expected += (silu(flat @ sg) * (flat @ su)) @ sd
    np.testing.assert_allclose(np.asarray(y).reshape(10, 16), expected, rtol=1e-4, atol=1e-5)
    assert int(stats.tokens_per_expert.sum()) == 10 * 3
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert),
                                  np.bincount(np.asarray(routing.expert_ids).ravel(), minlength=8))
