"""The pure training step: (TrainState, batch) -> (TrainState, metrics), built by a factory.

The loop (data, checkpoints, logging) lives in ``train.py``; a pipeline schedule can supply its own
step with the same contract. Parameters are fp32 masters; with ``compute_dtype='bfloat16'`` every
matmul runs in bf16 and the optimiser updates the fp32 copy. With a mesh, the step's inputs and outputs
keep the state's layout (``train_state.state_shardings``) and the batch is split over ``dp`` x ``ep``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxseek.config import ModelConfig, TrainConfig
from jaxseek.expert_placement import logical_gradient_norm, sum_replica_gradients
from jaxseek.model.loss import cross_entropy, language_model_loss
from jaxseek.pipeline_model import pipeline_schedule, pipelined_loss_and_grads
from jaxseek.train_state import TrainState, abstract_train_state, learning_rate_schedule, make_optimizer, state_shardings
from sharding.mesh import batch_sharding, replicated
from sharding.rules import activation_sharding, get_rules


def expert_balance(expert_load: jax.Array) -> jax.Array:
    """[moe_layers, experts] counts -> [moe_layers] max/mean load (1.0 is perfect balance)."""
    load = expert_load.astype(jnp.float32)
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)


def clip_by_norm(grads, norm: jax.Array, max_norm: float):
    """Scales the gradient tree by max_norm / norm when norm exceeds max_norm (optax's global-norm rule)."""
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


def make_train_step(graphdef: nnx.GraphDef, mc: ModelConfig, tc: TrainConfig, *, mesh: Mesh | None = None,
                    rules: str = "dp") -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jit-compiled ``step(state, tokens [batch, seq + 1 + mtp_depth] int32) -> (state, metrics)``.

    With a mesh whose ``pp`` axis is > 1, the loss and gradients come from ``tc.pipeline``'s schedule over it
    (``jaxseek.pipeline_model``): the same values as the plain step, computed micro-batch by micro-batch.
    The input state is donated. Gradients of replicas of one expert are summed (EPLB), the global norm
    counts each logical expert once, and clipping scales by it. After the update, every MoE layer's
    balancing bias moves by the auxiliary-loss-free rule using the loads this step observed.
    """
    tx = make_optimizer(tc)
    lr_schedule = learning_rate_schedule(tc)
    sharding_rules = get_rules(rules)
    schedule = pipeline_schedule(mc, tc, mesh) if mesh is not None and mesh.shape.get("pp", 1) > 1 else None

    def step(state: TrainState, tokens: jax.Array):
        def loss_fn(params):
            return language_model_loss(nnx.merge(graphdef, params, state.model_state, copy=True), tokens)

        with activation_sharding(mesh, sharding_rules) if mesh is not None else contextlib.nullcontext():
            if schedule is None:
                (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            else:
                loss, aux, grads = pipelined_loss_and_grads(graphdef, state.params, state.model_state, tokens,
                                                            schedule=schedule, mesh=mesh, rules=sharding_rules)
        if mc.moe.num_physical_experts:  # replicas of one expert take one summed update
            grads = sum_replica_gradients(graphdef, grads, state.model_state, mesh)
        grad_norm = logical_gradient_norm(graphdef, grads, state.model_state)
        grads = clip_by_norm(grads, grad_norm, tc.clip_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model = nnx.merge(graphdef, params, state.model_state)
        model.update_expert_bias(aux["expert_load"])
        _, _, model_state = nnx.split(model, nnx.Param, ...)
        metrics = {
            "loss": loss, "ce_loss": aux["ce_loss"], "mtp_loss": aux["mtp_loss"],
            "balance_loss": aux["balance_loss"], "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step), "expert_load": aux["expert_load"],
            "expert_balance": expert_balance(aux["expert_load"]), "dropped_tokens": aux["dropped_tokens"],
        }
        load = aux["expert_load"].astype(jnp.float32)
        decay = tc.eplb.load_decay
        load_average = jnp.where(state.step == 0, load, decay * state.load_average + (1 - decay) * load)
        return TrainState(state.step + 1, params, model_state, opt_state, load_average), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    shardings = state_shardings(abstract_train_state(mc, tc)[1], mesh, sharding_rules)
    return jax.jit(step, donate_argnums=0, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)))  # metrics readable on every process


def make_eval_step(graphdef: nnx.GraphDef, *, mesh: Mesh | None = None) -> Callable[[TrainState, jax.Array], jax.Array]:
    """A jit-compiled ``eval(state, tokens) -> []`` next-token cross-entropy (no MTP, no update).

    With a mesh the loss comes back replicated, so every process of a multi-process run can read it."""

    def evaluate(state: TrainState, tokens: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state.params, state.model_state)
        seq = tokens.shape[1] - 1 - model.config.mtp_depth
        return cross_entropy(model(tokens[:, :seq], with_mtp=False).logits, tokens[:, 1:seq + 1])

    return jax.jit(evaluate) if mesh is None else jax.jit(evaluate, out_shardings=replicated(mesh))
