"""The pure training step: (TrainState, batch) -> (TrainState, metrics), built by a factory.

The loop (data, checkpoints, logging) lives in ``train.py``; a pipeline schedule can supply its own
step with the same contract. Parameters are fp32 masters; with ``compute_dtype='bfloat16'`` every
matmul runs in bf16 and the optimiser updates the fp32 copy.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxseek.config import ModelConfig, TrainConfig
from jaxseek.expert_placement import sum_replica_gradients
from jaxseek.model.transformer import Transformer


class TrainState(NamedTuple):
    step: jax.Array  # [] int32, optimizer steps taken
    params: Any  # nnx.State of nnx.Param (fp32 master weights)
    model_state: Any  # nnx.State of everything else (the experts' load-balancing bias)
    opt_state: Any  # optax state
    load_average: jax.Array  # [moe_layers, experts] float32, exponential average of tokens per expert


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine decay to ``final_lr_fraction`` of it."""
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1), tc.steps,
                                              end_value=tc.learning_rate * tc.final_lr_fraction)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; weight decay skips vectors (norm scales)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(learning_rate_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay,
                    mask=decay_mask),
    )


def init_train_state(mc: ModelConfig, tc: TrainConfig) -> tuple[nnx.GraphDef, TrainState]:
    """Builds the model from ``tc.seed`` and returns (graph definition, initial state)."""
    model = Transformer(mc, rngs=nnx.Rngs(tc.seed))
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    opt_state = make_optimizer(tc).init(params)
    moe_layers = len(model.moe_layers())
    load_average = jnp.zeros((moe_layers, mc.moe.num_routed_experts), jnp.float32)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, model_state, opt_state, load_average)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[batch, seq, vocab] float32, [batch, seq] int32 -> [] mean negative log-likelihood in nats."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def language_model_loss(model: Transformer, tokens: jax.Array, seq_aux_loss_weight: float
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy + weighted MTP loss + weighted sequence-wise balance loss.

    Args:
      tokens: [batch, seq + 1 + mtp_depth] int32 windows.
    Returns:
      (scalar loss, aux) with the parts and the [moe_layers, experts] expert load.
    """
    depth = model.config.mtp_depth
    seq = tokens.shape[1] - 1 - depth
    out = model(tokens[:, :-1])
    ce = cross_entropy(out.logits, tokens[:, 1:seq + 1])
    mtp = (jnp.stack([cross_entropy(out.mtp_logits[k - 1], tokens[:, k + 1:seq + k + 1])
                      for k in range(1, depth + 1)]).mean() if depth else jnp.zeros((), jnp.float32))
    loss = ce + model.config.mtp_loss_weight * mtp + seq_aux_loss_weight * out.balance_loss
    return loss, {"ce_loss": ce, "mtp_loss": mtp, "balance_loss": out.balance_loss, "expert_load": out.expert_load}


def expert_balance(expert_load: jax.Array) -> jax.Array:
    """[moe_layers, experts] counts -> [moe_layers] max/mean load (1.0 is perfect balance)."""
    load = expert_load.astype(jnp.float32)
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)


def make_train_step(graphdef: nnx.GraphDef, mc: ModelConfig, tc: TrainConfig
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jit-compiled ``step(state, tokens [batch, seq + 1 + mtp_depth] int32) -> (state, metrics)``.

    The input state is donated. After the update, every MoE layer's balancing bias moves by the
    auxiliary-loss-free rule using the loads this step observed.
    """
    tx = make_optimizer(tc)
    schedule = learning_rate_schedule(tc)

    def step(state: TrainState, tokens: jax.Array):
        def loss_fn(params):
            return language_model_loss(nnx.merge(graphdef, params, state.model_state), tokens,
                                       mc.moe.seq_aux_loss_weight)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if mc.moe.num_physical_experts:  # replicas of one expert take one summed update
            grads = sum_replica_gradients(graphdef, grads, state.model_state)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model = nnx.merge(graphdef, params, state.model_state)
        model.update_expert_bias(aux["expert_load"])
        _, _, model_state = nnx.split(model, nnx.Param, ...)
        metrics = {
            "loss": loss, "ce_loss": aux["ce_loss"], "mtp_loss": aux["mtp_loss"],
            "balance_loss": aux["balance_loss"], "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step), "expert_load": aux["expert_load"],
            "expert_balance": expert_balance(aux["expert_load"]),
        }
        load = aux["expert_load"].astype(jnp.float32)
        decay = tc.eplb.load_decay
        load_average = jnp.where(state.step == 0, load, decay * state.load_average + (1 - decay) * load)
        return TrainState(state.step + 1, params, model_state, opt_state, load_average), metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, jax.Array], jax.Array]:
    """A jit-compiled ``eval(state, tokens) -> []`` next-token cross-entropy (no MTP, no update)."""

    def evaluate(state: TrainState, tokens: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state.params, state.model_state)
        seq = tokens.shape[1] - 1 - model.config.mtp_depth
        return cross_entropy(model(tokens[:, :seq], with_mtp=False).logits, tokens[:, 1:seq + 1])

    return jax.jit(evaluate)
