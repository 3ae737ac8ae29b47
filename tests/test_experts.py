import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseek.config import MoEConfig
from jaxseek.model.experts import ExpertWeights, get_grouped_matmul, get_moe_strategy, local_moe_apply
from jaxseek.model.moe import MoE
from jaxseek.model.router import route
from sharding.mesh import make_mesh
from sharding.rules import activation_sharding, get_rules

silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731


def _expert_loop(x, ids, weights, experts: ExpertWeights) -> np.ndarray:
    """float64 sum_k weight_k * swiglu_{expert_k}(x_t), one token and one slot at a time."""
    wg, wu, wd = (np.asarray(w, np.float64) for w in experts)
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, weight in zip(np.asarray(ids[t]), np.asarray(weights[t], np.float64)):
            out[t] += weight * (silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e]
    return out


@pytest.mark.parametrize("grouped_matmul", ["ragged_dot", "tiled", "capacity", "auto"])
def test_local_region_matches_a_per_token_loop_with_an_empty_expert(grouped_matmul):
    rng = np.random.default_rng(0)
    tokens, hidden, inter, experts, top_k = 13, 6, 5, 5, 2
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(4, 2, replace=False) for _ in range(tokens)]), jnp.int32)  # expert 4 empty
    weights = jnp.asarray(rng.uniform(size=(tokens, top_k)), jnp.float32)
    params = ExpertWeights(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                             ((experts, hidden, inter), (experts, hidden, inter), (experts, inter, hidden))))
    y, counts, dropped = local_moe_apply(x, ids, weights, params, get_grouped_matmul(grouped_matmul))
    assert int(dropped) == 0
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(np.asarray(ids).ravel(), minlength=experts))
    np.testing.assert_allclose(np.asarray(y), _expert_loop(x, ids, weights, params), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_expert_parallel_region_matches_the_per_token_loop_on_a_dp_by_ep_mesh(devices, capacity_factor):
    """One shard_map (dispatch -> local experts -> combine) over dp=2 x ep=4 with experts over ep; with a
    small capacity some copies drop: they are counted and the kept ones are still exact."""
    rng = np.random.default_rng(1)
    tokens, hidden, inter, experts, top_k = 64, 8, 6, 8, 3
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]), jnp.int32)
    ids = ids.at[:40, 0].set(5)  # a hot expert
    weights = jnp.asarray(rng.uniform(size=(tokens, top_k)), jnp.float32)
    params = ExpertWeights(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                             ((experts, hidden, inter), (experts, hidden, inter), (experts, inter, hidden))))
    mesh = make_mesh(dp=2, ep=4, devices=devices)
    strategy = get_moe_strategy("ep", capacity_factor=capacity_factor)
    with activation_sharding(mesh, get_rules("ep")):
        y, counts, dropped = jax.jit(strategy, static_argnums=4)(x, ids, weights, params, get_grouped_matmul("tiled"))
    if capacity_factor is None:
        assert int(dropped) == 0
        np.testing.assert_array_equal(np.asarray(counts), np.bincount(np.asarray(ids).ravel(), minlength=experts))
        np.testing.assert_allclose(np.asarray(y), _expert_loop(x, ids, weights, params), rtol=1e-4, atol=1e-4)
    else:
        assert int(dropped) > 0 and int(counts.sum()) + int(dropped) == tokens * top_k
    y_local = get_moe_strategy("ep")(x, ids, weights, params, get_grouped_matmul("tiled")).y  # no mesh: local
    np.testing.assert_allclose(np.asarray(y_local), _expert_loop(x, ids, weights, params), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoding", [False, True], ids=["normal", "low_latency"])
def test_expert_parallel_region_with_fp8_dispatch_stays_within_deepgemm_tolerance(devices, decoding):
    """moe.fp8_dispatch: tokens travel as 1x128 e4m3 in both DeepEP modes (the decode step's low-latency one
    too); the result moves off the exact one by FP8 rounding only."""
    from pallas_kernels.numerics import calc_diff

    rng = np.random.default_rng(2)
    tokens, hidden, inter, experts, top_k = 16, 128, 8, 8, 2
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(tokens, top_k)), jnp.float32)
    params = ExpertWeights(*(jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in
                             ((experts, hidden, inter), (experts, hidden, inter), (experts, inter, hidden))))
    exact = _expert_loop(x, ids, weights, params)
    with activation_sharding(make_mesh(dp=1, ep=8, devices=devices), get_rules("ep")):
        y = jax.jit(get_moe_strategy("ep", fp8_dispatch=True, decoding=decoding), static_argnums=4)(
            x, ids, weights, params, get_grouped_matmul("tiled")).y
    assert 1e-6 < calc_diff(np.asarray(y), exact) < 1e-3  # float32 reordering alone stays near 1e-12


def test_the_region_is_one_strategy_by_name():
    assert get_moe_strategy("local") is local_moe_apply
    with pytest.raises(ValueError, match="moe.strategy"):
        get_moe_strategy("deepep")
    with pytest.raises(ValueError, match="moe.grouped_matmul"):
        get_grouped_matmul("deepgemm")


def test_auto_grouped_matmul_follows_the_backend():
    from jaxseek.model.grouped_matmul import GROUPED_MATMULS
    assert get_grouped_matmul("auto", "cpu") is GROUPED_MATMULS["tiled"]
    assert get_grouped_matmul("auto", "gpu") is GROUPED_MATMULS["ragged_dot"]


def test_moe_layer_matches_a_per_token_reference():
    config = MoEConfig(num_routed_experts=8, num_shared_experts=1, num_experts_per_token=3, intermediate_size=12,
                       n_group=4, topk_group=3, routed_scaling_factor=2.0)
    layer = MoE(16, config, dtype=jnp.float32, init_std=0.3, rngs=nnx.Rngs(0))
    layer.expert_bias[...] = jax.random.normal(jax.random.key(9), (8,)) * 0.1
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    y, stats = layer(x)
    flat = np.asarray(x, np.float64).reshape(10, 16)
    logits = flat @ np.asarray(layer.router[...], np.float64).T
    routing = route(jnp.asarray(logits, jnp.float32), layer.expert_bias[...], top_k=3, n_group=4, topk_group=3,
                    routed_scaling_factor=2.0)
    expected = _expert_loop(flat, routing.expert_ids, routing.weights, layer.expert_weights())
    shared = layer.shared
    sg, su, sd = (np.asarray(m.kernel[...], np.float64) for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
    expected += (silu(flat @ sg) * (flat @ su)) @ sd
    np.testing.assert_allclose(np.asarray(y).reshape(10, 16), expected, rtol=1e-4, atol=1e-5)
    assert int(stats.tokens_per_expert.sum()) == 10 * 3
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert),
                                  np.bincount(np.asarray(routing.expert_ids).ravel(), minlength=8))
