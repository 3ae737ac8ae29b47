"""jaxseek's model as pipeline stages: the loss and gradients of one training batch through a schedule.

The MoE blocks' layer stack is cut into ``schedule.num_stages`` equal slices (the stages). The rest of the
model (embedding, dense blocks, final norm, head, MTP modules) runs around them: the embedding and the
dense blocks as the pre-stage on the rank that holds stage 0, the head, MTP modules and the loss as the
post-stage on the rank that holds the last stage (``sharding.pipeline``). The MTP modules share the
embedding, so the rest of the model is passed as both the pre- and the post-stage parameters and their
two gradients are summed.

The result matches ``language_model_loss`` on the whole batch: cross-entropies are per-token means of
equal micro-batches, balance losses are per-sequence means, and expert loads are counts.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseek.config import ModelConfig, TrainConfig
from jaxseek.model.loss import head_loss
from jaxseek.model.transformer import Transformer
from sharding.dualpipe import Schedule, build_schedule
from sharding.pipeline import PipelineFns, PipelineParams, pipeline_step
from sharding.rules import ShardingRules, activation_sharding


def pipeline_schedule(mc: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh) -> Schedule:
    """``tc.pipeline``'s schedule over ``mesh``'s ``pp`` ranks; ``ValueError`` naming the setting that does not fit
    (the schedule's preconditions, the model's layers, the batch)."""
    pp = mesh.shape["pp"]
    chunks = tc.pipeline.chunks(pp)
    schedule = build_schedule(tc.pipeline.schedule, pp, chunks)
    check_pipeline(mc, schedule)
    shards = mesh.shape.get("dp", 1) * mesh.shape.get("ep", 1)
    if tc.batch_size % (chunks * shards):
        raise ValueError(f"batch_size: {tc.batch_size} must be a multiple of micro_batches x data shards = "
                         f"{chunks} x {shards}")
    return schedule


def check_pipeline(mc: ModelConfig, schedule: Schedule) -> None:
    """``ValueError`` naming what to change when the model cannot be cut into the schedule's stages."""
    layers, stages = mc.num_moe_layers, schedule.num_stages
    if layers == 0 or layers % stages:
        raise ValueError(f"num_layers: the {layers} MoE layers (num_layers - first_k_dense) must split evenly into "
                         f"the {schedule.kind} schedule's {stages} stages on {schedule.num_ranks} pp ranks, e.g. "
                         f"num_layers={mc.first_k_dense + stages} (jaxseek train --layers)")


def _in_layout(rules: ShardingRules | None, fn: Callable) -> Callable:
    """``fn`` traced with the model's activation constraints on the pipeline's inner (partly manual) mesh."""
    if rules is None:
        return fn

    def wrapped(*args):
        inner = jax.sharding.get_abstract_mesh()
        if not inner.axis_names:  # traced for shapes outside the pipeline's shard_map
            return fn(*args)
        with activation_sharding(inner, rules):
            return fn(*args)
    return wrapped


def model_pipeline_fns(rest_graphdef: nnx.GraphDef, stage_graphdef: nnx.GraphDef, mc: ModelConfig,
                       rules: ShardingRules | None) -> PipelineFns:
    """The model's pre-stage, stage and post-stage as ``PipelineFns`` over [micro, seq + 1 + D] token windows."""
    seq_of = lambda tokens: tokens.shape[1] - 1 - mc.mtp_depth  # noqa: E731
    weight = mc.moe.seq_aux_loss_weight

    def pre(rest, tokens):
        model = nnx.merge(rest_graphdef, rest)
        seq = seq_of(tokens)
        return model.pre_stage(tokens[:, :seq], model.positions(tokens.shape[0], seq))

    def stage(layers, h):
        blocks = nnx.merge(stage_graphdef, layers)
        positions = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32), h.shape[:2])
        h, stats = blocks(h, positions)
        balance = stats.balance_loss.sum()
        return h, weight * balance, {"load": stats.tokens_per_expert, "balance": balance,
                                     "dropped": stats.dropped_tokens.sum()}

    def head(rest, h, tokens):
        model = nnx.merge(rest_graphdef, rest)
        loss, aux = head_loss(model, h, tokens, model.positions(h.shape[0], h.shape[1]))
        stats = aux["mtp_stats"]
        no_mtp_moe = stats is None
        mtp_load = (jnp.zeros((0, mc.moe.num_routed_experts), jnp.int32) if no_mtp_moe else stats.tokens_per_expert)
        mtp_balance = jnp.zeros((), jnp.float32) if no_mtp_moe else stats.balance_loss.sum()
        mtp_dropped = jnp.zeros((), jnp.int32) if no_mtp_moe else stats.dropped_tokens.sum()
        return loss + weight * mtp_balance, {"ce": aux["ce_loss"], "mtp": aux["mtp_loss"], "load": mtp_load,
                                             "balance": mtp_balance, "dropped": mtp_dropped}

    return PipelineFns(_in_layout(rules, pre), _in_layout(rules, stage), _in_layout(rules, head))


def pipelined_loss_and_grads(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                             tokens: jax.Array, *, schedule: Schedule, mesh: jax.sharding.Mesh,
                             rules: ShardingRules | None = None):
    """``language_model_loss`` and its parameter gradients, computed by running ``schedule`` over ``mesh``'s
    ``pp`` axis on ``tokens`` [batch, seq + 1 + D] int32 split into ``schedule.num_chunks`` micro-batches.

    Returns:
      (loss [], aux like ``language_model_loss``'s, grads shaped like ``params``).
    """
    model: Transformer = nnx.merge(graphdef, params, model_state, copy=True)
    mc = model.config
    check_pipeline(mc, schedule)
    stage_graphdef, layers = nnx.split(model.moe_blocks)
    model.moe_blocks = None
    rest_graphdef, rest = nnx.split(model)
    stages = schedule.num_stages
    per_stage = jax.tree.map(lambda leaf: leaf.reshape((stages, leaf.shape[0] // stages) + leaf.shape[1:]), layers)
    fns = model_pipeline_fns(rest_graphdef, stage_graphdef, mc, rules)
    result = pipeline_step(schedule, fns, PipelineParams(rest, per_stage, rest), tokens, mesh=mesh)
    chunks = schedule.num_chunks
    d_rest = jax.tree.map(jnp.add, result.grads.pre, result.grads.post)
    d_layers = jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), result.grads.stages)
    grads_model = nnx.merge(rest_graphdef, d_rest)
    grads_model.moe_blocks = nnx.merge(stage_graphdef, d_layers)
    _, grads, _ = nnx.split(grads_model, nnx.Param, ...)
    block, mtp = result.stage_stats, result.head_stats
    balance = (block["balance"].sum() + mtp["balance"]) / chunks
    aux = {"ce_loss": mtp["ce"] / chunks, "mtp_loss": mtp["mtp"] / chunks, "balance_loss": balance,
           "expert_load": jnp.concatenate([block["load"].reshape((-1,) + block["load"].shape[2:]), mtp["load"]]),
           "dropped_tokens": block["dropped"].sum() + mtp["dropped"]}
    return result.losses.mean(), aux, grads
