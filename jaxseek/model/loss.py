"""The training objective: next-token cross-entropy + weighted MTP losses + weighted balance loss.

``head_loss`` is the post-stage with its loss (final norm, head, MTP modules, cross-entropies), so a
pipeline's last stage can call it on the hidden states it receives; ``language_model_loss`` runs the
whole model (pre-stage -> MoE blocks -> post-stage) on one batch of token windows.

Alignment of a window ``tokens`` [batch, seq + 1 + D]: the model reads ``tokens[:, :seq]``; position i
predicts token i+1 (``tokens[:, 1:seq + 1]``); MTP depth k at position i embeds token i+k
(``tokens[:, k:seq + k]``) and predicts token i+k+1 (``tokens[:, k + 1:seq + k + 1]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseek.model.moe import MoEStats
from jaxseek.model.transformer import Transformer, dropped_tokens, expert_statistics


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[batch, seq, vocab] float32, [batch, seq] int32 -> [] mean negative log-likelihood in nats."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def mtp_targets(tokens: jax.Array, depth: int, seq: int) -> jax.Array:
    """[batch, seq + 1 + D] windows -> [depth, batch, seq] int32: MTP depth k's target at i is token i+k+1."""
    return jnp.stack([tokens[:, k + 1:seq + k + 1] for k in range(1, depth + 1)])


def head_loss(model: Transformer, h: jax.Array, tokens: jax.Array, positions: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The post-stage with its loss.

    Args:
      h: [batch, seq, hidden] the last block's output.
      tokens: [batch, seq + 1 + D] int32 windows (D = mtp_depth).
      positions: [batch, seq] int32.
    Returns:
      (next-token CE + mtp_loss_weight * mean MTP CE, {"ce_loss", "mtp_loss", "mtp_stats"}).
    """
    depth, seq = model.config.mtp_depth, h.shape[1]
    head = model.post_stage(h, tokens[:, :seq + depth], positions)
    ce = cross_entropy(head.logits, tokens[:, 1:seq + 1])
    if depth:
        targets = mtp_targets(tokens, depth, seq)
        mtp = jax.vmap(cross_entropy)(head.mtp_logits, targets).mean()
    else:
        mtp = jnp.zeros((), jnp.float32)
    return ce + model.config.mtp_loss_weight * mtp, {"ce_loss": ce, "mtp_loss": mtp, "mtp_stats": head.mtp_stats}


def language_model_loss(model: Transformer, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token CE + weighted MTP loss + weighted sequence-wise balance loss over [batch, seq + 1 + D] windows.

    Returns:
      (scalar loss, aux) with the parts, the [moe_layers, experts] expert load and the [] dropped copies.
    """
    config = model.config
    seq = tokens.shape[1] - 1 - config.mtp_depth
    positions = model.positions(tokens.shape[0], seq)
    h, block_stats = model.moe_stage(model.pre_stage(tokens[:, :seq], positions), positions)
    loss, aux = head_loss(model, h, tokens, positions)
    stats: list[MoEStats | None] = [block_stats, aux.pop("mtp_stats")]
    load, balance = expert_statistics(stats, config.moe.num_routed_experts)
    loss = loss + config.moe.seq_aux_loss_weight * balance
    return loss, {**aux, "balance_loss": balance, "expert_load": load, "dropped_tokens": dropped_tokens(stats)}
