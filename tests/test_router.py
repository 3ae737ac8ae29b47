import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxseek.model.router import (group_mask, route, sequence_balance_loss, tokens_per_expert, updated_bias)


def _reference_groups(biased: np.ndarray, n_group: int, topk_group: int) -> np.ndarray:
    """[tokens, experts] -> [tokens, topk_group] chosen groups, by the top-2 sum rule, in float64."""
    grouped = biased.reshape(biased.shape[0], n_group, -1)
    scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
    return np.argsort(-scores, axis=-1, kind="stable")[:, :topk_group]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(8, 4, 2, 2), (16, 8, 3, 4), (32, 8, 4, 8), (12, 6, 2, 3)]))
def test_group_limited_routing_stays_inside_the_chosen_groups(seed, shape):
    experts, n_group, topk_group, top_k = shape
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(64, experts)).astype(np.float32) * 3
    bias = rng.normal(size=(experts,)).astype(np.float32) * 0.3
    routing = route(jnp.asarray(logits), jnp.asarray(bias), top_k=top_k, n_group=n_group, topk_group=topk_group,
                    routed_scaling_factor=2.5)
    ids = np.asarray(routing.expert_ids)
    biased = 1 / (1 + np.exp(-logits.astype(np.float64))) + bias
    chosen_groups = _reference_groups(biased, n_group, topk_group)
    groups_of_ids = ids // (experts // n_group)
    assert all(set(g) <= set(c) for g, c in zip(groups_of_ids, chosen_groups))
    # Within the allowed experts the chosen ones are the top-k by biased score, with no repeats.
    allowed = np.stack([np.isin(np.arange(experts) // (experts // n_group), c) for c in chosen_groups])
    expected = np.argsort(-np.where(allowed, biased, -np.inf), axis=-1, kind="stable")[:, :top_k]
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(expected, -1))
    # Weights: unbiased affinities of the chosen experts, normalised, times the scaling factor.
    np.testing.assert_allclose(np.asarray(routing.weights).sum(-1), 2.5, rtol=1e-5)
    affinities = 1 / (1 + np.exp(-logits.astype(np.float64)))
    chosen = np.take_along_axis(affinities, ids, axis=1)
    np.testing.assert_allclose(np.asarray(routing.weights), chosen / chosen.sum(-1, keepdims=True) * 2.5, rtol=1e-5)


def test_group_mask_keeps_exactly_topk_groups():
    biased = jax.random.normal(jax.random.key(0), (10, 16))
    mask = np.asarray(group_mask(biased, n_group=4, topk_group=2))
    assert (mask.reshape(10, 4, 4).all(-1).sum(-1) == 2).all()
    assert (mask.reshape(10, 4, 4).any(-1) == mask.reshape(10, 4, 4).all(-1)).all()


def test_bias_changes_selection_but_not_the_weights_formula():
    logits = jnp.zeros((4, 8)).at[:, 0].set(5.0).at[:, 1].set(4.0)
    bias = jnp.zeros(8).at[7].set(10.0)
    routing = route(logits, bias, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    assert (np.asarray(routing.expert_ids)[:, 0] == 7).all()
    sig = jax.nn.sigmoid
    expected = np.array([sig(0.0), sig(5.0)]) / (sig(0.0) + sig(5.0))
    np.testing.assert_allclose(np.sort(np.asarray(routing.weights), -1)[0], np.sort(expected), rtol=1e-6)


def test_bias_update_moves_load_toward_balance():
    """Iterating route -> count -> update on a fixed skewed batch drives max/mean load down."""
    rng = np.random.default_rng(0)
    experts = 16
    logits = jnp.asarray(rng.normal(size=(512, experts)) + np.linspace(2, -2, experts))  # skewed toward low ids
    bias = jnp.zeros(experts)
    imbalance = []
    for _ in range(200):
        ids = route(logits, bias, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=1.0).expert_ids
        load = tokens_per_expert(ids, experts)
        imbalance.append(float(load.max() / load.mean()))
        bias = updated_bias(bias, load, rate=0.01)
    assert imbalance[0] > 2.0
    assert max(imbalance[-20:]) < 0.6 * imbalance[0]


def test_updated_bias_sign_rule():
    bias = updated_bias(jnp.zeros(4), jnp.array([10, 0, 5, 5]), rate=0.1)
    np.testing.assert_allclose(np.asarray(bias), [-0.1, 0.1, 0.0, 0.0])


def test_sequence_balance_loss_is_one_when_balanced_and_uniform():
    experts, top_k = 4, 2
    ids = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]])  # every expert picked twice
    affinities = jnp.full((1, 4, experts), 0.5)
    np.testing.assert_allclose(float(sequence_balance_loss(affinities, ids, experts)), 1.0, rtol=1e-6)
    # Concentrating both the routing and the affinities on experts 0 and 1 is penalised (f_i = 2, P_i = 0.45).
    skewed = jnp.array([[[0, 1]] * 4])
    peaked = jnp.tile(jnp.array([0.9, 0.9, 0.1, 0.1]), (1, 4, 1))
    np.testing.assert_allclose(float(sequence_balance_loss(peaked, skewed, experts)), 1.8, rtol=1e-6)
