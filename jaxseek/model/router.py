"""DeepSeek-V3 routing: sigmoid affinities, group-limited top-k, auxiliary-loss-free balancing.

Pure functions, so the EP and EPLB work can reuse them outside the layer:
1. affinities ``s = sigmoid(x @ W_gate^T)`` (float32);
2. selection on biased scores ``s + b`` (the bias only steers selection, never the weights):
   each group's score is the sum of its top-2 biased scores, the best ``topk_group`` groups stay,
   and the top-k experts are chosen inside them;
3. gating weights are the *unbiased* affinities of the chosen experts, normalised to sum to one and
   multiplied by ``routed_scaling_factor``;
4. after each step the bias moves by ``rate * sign(mean_load - load)`` (DeepSeek-V3 §2.1.2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """The router's decision for a flat batch of tokens."""

    expert_ids: jax.Array  # [tokens, top_k] int32, chosen routed experts
    weights: jax.Array  # [tokens, top_k] float32, gating weights (normalised, scaled)
    affinities: jax.Array  # [tokens, experts] float32, sigmoid scores (for the balance loss)


def group_mask(biased_scores: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """Which experts lie in the selected groups.

    Args:
      biased_scores: [tokens, experts] float32.
    Returns:
      [tokens, experts] bool, True for experts in the ``topk_group`` groups with the largest sum of
      their two best scores (ties broken toward the lower group index, as ``lax.top_k`` does).
    """
    tokens, experts = biased_scores.shape
    if n_group == 1:
        return jnp.ones((tokens, experts), bool)
    grouped = biased_scores.reshape(tokens, n_group, experts // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [tokens, n_group]
    _, top_groups = jax.lax.top_k(group_scores, topk_group)  # [tokens, topk_group]
    keep = jnp.zeros((tokens, n_group), bool).at[jnp.arange(tokens)[:, None], top_groups].set(True)
    return jnp.repeat(keep, experts // n_group, axis=1)


def route(logits: jax.Array, bias: jax.Array, *, top_k: int, n_group: int, topk_group: int,
          routed_scaling_factor: float) -> Routing:
    """Group-limited sigmoid top-k routing.

    Args:
      logits: [tokens, experts] float32 router logits.
      bias: [experts] float32 load-balancing bias, used for selection only.
    Returns:
      Routing with expert ids, gating weights and affinities.
    """
    affinities = jax.nn.sigmoid(logits.astype(jnp.float32))  # [tokens, experts]
    biased = affinities + bias.astype(jnp.float32)
    allowed = group_mask(biased, n_group, topk_group)
    _, expert_ids = jax.lax.top_k(jnp.where(allowed, biased, -jnp.inf), top_k)  # [tokens, top_k]
    chosen = jnp.take_along_axis(affinities, expert_ids, axis=1)
    weights = chosen / (chosen.sum(-1, keepdims=True) + 1e-20) * routed_scaling_factor
    return Routing(expert_ids.astype(jnp.int32), weights, affinities)


def tokens_per_expert(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """[tokens, top_k] int32 -> [num_experts] int32 histogram of routed copies."""
    return jnp.zeros((num_experts,), jnp.int32).at[expert_ids.reshape(-1)].add(1)


def sequence_balance_loss(affinities: jax.Array, expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), before its weight alpha.

    L = sum_i f_i * P_i per sequence, averaged over sequences, with
    f_i = E / (K T) * #tokens of the sequence routed to i and P_i = mean_t s_it / sum_j s_jt.

    Args:
      affinities: [batch, seq, experts] float32.
      expert_ids: [batch, seq, top_k] int32.
    Returns:
      scalar float32; 1.0 when perfectly balanced and uniform.
    """
    batch, seq, top_k = expert_ids.shape
    counts = jax.vmap(lambda ids: tokens_per_expert(ids, num_experts))(expert_ids)  # [batch, experts]
    f = counts.astype(jnp.float32) * num_experts / (top_k * seq)
    p = (affinities / affinities.sum(-1, keepdims=True)).mean(axis=1)  # [batch, experts]
    return (f * p).sum(-1).mean()


def updated_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free bias update: [..., experts] bias, [..., experts] token counts -> new bias.

    Overloaded experts (load above their layer's mean) get a lower bias, underloaded ones a higher bias.
    Leading axes (stacked layers) are independent.
    """
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)
