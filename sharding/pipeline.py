"""Runs a pipeline schedule (``sharding.dualpipe``) inside ``shard_map`` over ``pp``: SPMD, tick by tick.

Each rank runs one ``lax.scan`` over the ticks of ``pipeline_ticks.compile_ticks(schedule)``; at each tick
it takes its row of the table and runs that slot's branch (idle, F, B, W, BW or an overlapped F&B) with
``lax.switch``, then activations and input gradients move one hop by ``ppermute``. The backward is split
zero-bubble style: B computes the input gradient and sends it upstream at once, W computes the weight
gradients later. Both recompute the stage's forward from the stage input kept in a ring buffer (activation
recomputation: JAX cannot keep a vjp closure across loop iterations), so memory per rank is the schedule's
activation count of stage inputs, not of every intermediate.

The model is given as three functions (``PipelineFns``), generic over a user's model:

- ``pre(pre_params, batch_mb) -> x``: the first stage's input from one micro-batch (e.g. the embedding);
- ``stage(stage_params, x) -> (y, extra_loss [], stats)``: one stage; ``extra_loss`` is added to the
  objective (e.g. MoE balance losses), ``stats`` (a pytree) is summed over micro-batches per stage;
- ``head(post_params, y, batch_mb) -> (loss [], stats)``: after the last stage (e.g. head, MTP, loss).

Parameters are ``PipelineParams(pre, stages, post)`` with ``stages`` stacked on a leading [num_stages] axis;
pre and post parameters are replicated over ``pp``. Each rank holds the stages ``Schedule.placement()``
gives it (DualPipe: two copies of every stage); gradients of copies are summed. The objective is the mean
over micro-batches of (head loss + extra losses), so gradients equal those of the sequential loop.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from sharding import pipeline_ticks as ticks
from sharding.dualpipe import Schedule


class PipelineFns(NamedTuple):
    pre: Callable  # (pre_params, batch_mb) -> x
    stage: Callable  # (stage_params, x) -> (y, extra_loss [], stats)
    head: Callable  # (post_params, y, batch_mb) -> (loss [], stats)


class PipelineParams(NamedTuple):
    pre: Any
    stages: Any  # every leaf [num_stages, ...]
    post: Any


class PipelineResult(NamedTuple):
    losses: jax.Array  # [num_chunks] float32 (or the head loss's wider dtype): each micro-batch's objective, in batch order
    grads: PipelineParams | None  # of the mean objective; None for a forward-only step
    stage_stats: Any  # stage stats summed over micro-batches, leaves [num_stages, ...]
    head_stats: Any  # head stats summed over micro-batches
    outputs: jax.Array | None  # [num_chunks, *y] the last stage's outputs when asked for


def forward_only(schedule: Schedule) -> Schedule:
    """The schedule's forwards alone, in the same order (an inference step)."""
    ranks = tuple(tuple((op,) for slot in slots for op in slot if op.kind == "F") for slots in schedule.ranks)
    return Schedule(schedule.kind, schedule.num_ranks, schedule.num_stages, schedule.num_chunks, ranks)


def _check(schedule: Schedule, mesh: Mesh, axis: str, params: PipelineParams, batch) -> None:
    if axis not in mesh.shape:
        raise ValueError(f"mesh: no {axis!r} axis in {dict(mesh.shape)}")
    if mesh.shape[axis] != schedule.num_ranks:
        raise ValueError(f"schedule: built for {schedule.num_ranks} ranks but the mesh's {axis!r} axis has "
                         f"{mesh.shape[axis]}")
    for leaf in jax.tree.leaves(params.stages):
        if leaf.shape[:1] != (schedule.num_stages,):
            raise ValueError(f"params.stages: every leaf needs a leading [num_stages={schedule.num_stages}] axis, "
                             f"got shape {leaf.shape}")
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[0] % schedule.num_chunks:
            raise ValueError(f"batch: leading dimension {leaf.shape[0]} is not divisible into "
                             f"num_chunks={schedule.num_chunks} micro-batches")


def _micro_batch(chunks, index):
    """Micro-batch ``index`` (maybe traced) of a batch reshaped to [num_chunks, micro, ...] leaves."""
    return jax.tree.map(lambda leaf: leaf[index], chunks)


def pipeline_step(schedule: Schedule, fns: PipelineFns, params: PipelineParams, batch, *, mesh: Mesh,
                  axis: str = "pp", train: bool = True, return_outputs: bool = False) -> PipelineResult:
    """Runs ``schedule`` over ``batch`` (a pytree, leaves [num_chunks * micro, ...], split into micro-batches
    in order; DualPipe's direction 1 takes the second half) on ``mesh``'s ``axis``.

    ``train=False`` runs the forwards only (``forward_only``) and returns no gradients. Call it inside
    ``jax.jit``; other mesh axes stay automatic, so a stage may run its own ``shard_map`` over them (EP).
    """
    _check(schedule, mesh, axis, params, batch)
    run = schedule if train else forward_only(schedule)
    tables = ticks.compile_ticks(run)
    num_chunks, stage_of_phase = schedule.num_chunks, tables.stage_of_phase
    num_ranks, num_phases = stage_of_phase.shape
    present = sorted(set(tables.kind.flat) | {ticks.IDLE})
    branch_of_kind = np.zeros(len(ticks.KIND_NAMES), np.int32)
    branch_of_kind[present] = np.arange(len(present))
    batch = jax.tree.map(lambda leaf: leaf.reshape((num_chunks, -1) + leaf.shape[1:]), batch)
    batch_0 = _micro_batch(batch, 0)
    x_struct = jax.eval_shape(fns.pre, params.pre, batch_0)
    one_stage = jax.tree.map(lambda leaf: leaf[0], params.stages)
    y_struct, _, stage_stats_struct = jax.eval_shape(fns.stage, one_stage, x_struct)
    if (y_struct.shape, y_struct.dtype) != (x_struct.shape, x_struct.dtype):
        raise ValueError(f"fns.stage: must map x {x_struct.shape} {x_struct.dtype} to the same shape and dtype, "
                         f"got {y_struct.shape} {y_struct.dtype}")
    loss_struct, head_stats_struct = jax.eval_shape(fns.head, params.post, y_struct, batch_0)
    loss_dtype = jnp.promote_types(loss_struct.dtype, jnp.float32)
    # [ranks, phases, ...]: each rank's copies of its stages, sharded over the pipeline axis. Stage r on rank r
    # (1F1B, ZB1P) is a reshape, so stages laid out over pp stay where they are.
    in_order = num_phases == 1 and (stage_of_phase[:, 0] == np.arange(num_ranks)).all()
    local_stages = jax.tree.map(lambda leaf: leaf[:, None] if in_order else leaf[stage_of_phase], params.stages)

    def zeros(struct, lead=()):
        return jax.tree.map(lambda s: jnp.zeros(lead + s.shape, s.dtype), struct)

    def per_rank(local_stages, pre_params, post_params, batch):
        local_stages = jax.tree.map(lambda leaf: leaf[0], local_stages)  # [phases, ...]
        rank = jax.lax.axis_index(axis)
        is_first = jnp.asarray(stage_of_phase == 0)[rank]  # [phases]
        is_last = jnp.asarray(stage_of_phase == schedule.num_stages - 1)[rank]
        scale = 1.0 / num_chunks

        def objective(theta, x_in, mb, phase):
            """(y, objective contribution, stage stats, head stats) of one stage of micro-batch ``mb``."""
            stage_params, pre_p, post_p = theta
            data = _micro_batch(batch, mb)
            x = jax.lax.cond(is_first[phase], lambda: fns.pre(pre_p, data).astype(x_in.dtype), lambda: x_in)
            y, extra, stats = fns.stage(stage_params, x)

            def head():
                loss, head_stats = fns.head(post_p, y, data)
                return jnp.asarray(loss, loss_dtype), head_stats
            loss, head_stats = jax.lax.cond(is_last[phase], head,
                                            lambda: (jnp.zeros((), loss_dtype), zeros(head_stats_struct)))
            return y, jnp.asarray(extra, loss_dtype) + loss, stats, head_stats

        def theta_of(phase):
            return jax.tree.map(lambda leaf: leaf[phase], local_stages), pre_params, post_params

        def forward(carry, row, x_in):
            phase, mb = row["f_phase"], row["f_micro_batch"]
            y, value, stats, head_stats = objective(theta_of(phase), x_in, mb, phase)
            carry = dict(carry)
            carry["losses"] = carry["losses"].at[mb].add(value)
            carry["stage_stats"] = jax.tree.map(lambda a, s: a.at[phase].add(s), carry["stage_stats"], stats)
            carry["head_stats"] = jax.tree.map(jnp.add, carry["head_stats"], head_stats)
            if return_outputs:
                carry["outputs"] = jnp.where(is_last[phase], carry["outputs"].at[mb].set(y), carry["outputs"])
            return carry, y

        def backward(carry, row, x_in, dy, *, weights: bool, inputs: bool):
            """The input gradient (``inputs``) and/or the weight gradients (``weights``) of one stage."""
            phase, mb = row["b_phase"], row["b_micro_batch"]
            dy = jnp.where(is_last[phase], jnp.zeros_like(dy), dy)
            leaves, treedef = jax.tree.flatten(theta_of(phase))
            trainable = [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves]  # integer state rides along

            def f(weights_, x):
                it = iter(weights_)
                theta = treedef.unflatten([next(it) if t else leaf for leaf, t in zip(leaves, trainable)])
                return objective(theta, x, mb, phase)[:2]
            own = [leaf for leaf, t in zip(leaves, trainable) if t]
            cotangent = (dy, jnp.asarray(scale, loss_dtype))
            if weights and inputs:
                d_own, dx = jax.vjp(f, own, x_in)[1](cotangent)
            elif inputs:
                (dx,), d_own = jax.vjp(lambda x: f(own, x), x_in)[1](cotangent), None
            else:
                (d_own,), dx = jax.vjp(lambda w: f(w, x_in), own)[1](cotangent), None
            if d_own is not None:
                it = iter(d_own)
                d_theta = treedef.unflatten([next(it) if t else jnp.zeros_like(leaf) for leaf, t in zip(leaves, trainable)])
                carry = dict(carry)
                d_stage, d_pre, d_post = d_theta
                carry["d_stages"] = jax.tree.map(lambda a, g: a.at[phase].add(g), carry["d_stages"], d_stage)
                carry["d_pre"] = jax.tree.map(jnp.add, carry["d_pre"], d_pre)
                carry["d_post"] = jax.tree.map(jnp.add, carry["d_post"], d_post)
            return carry, dx

        blank = jnp.zeros(x_struct.shape, x_struct.dtype)

        def branch(kind):
            def run(carry, row, x_f, x_b, dy):
                y, dx = blank, blank
                if kind in (ticks.FORWARD, ticks.FORWARD_AND_BACKWARD):
                    with jax.named_scope("pipeline_forward"):
                        carry, y = forward(carry, row, x_f)
                if kind in (ticks.BACKWARD, ticks.FULL_BACKWARD, ticks.FORWARD_AND_BACKWARD, ticks.WEIGHT):
                    with jax.named_scope({ticks.WEIGHT: "pipeline_weight_grad"}.get(kind, "pipeline_backward")):
                        carry, got = backward(carry, row, x_b, dy, weights=kind != ticks.BACKWARD,
                                              inputs=kind != ticks.WEIGHT)
                    dx = blank if got is None else got.astype(blank.dtype)
                return carry, y, dx
            return run

        branches = [branch(kind) for kind in present]  # only the slot kinds this schedule uses are compiled

        def deliver(buffer, sent, receive):
            """Files what arrived from (next, previous, self) into ``buffer`` [phases, depth, ...]."""
            for source, value in enumerate(sent):
                valid, phase, slot = receive[source, 0], receive[source, 1], receive[source, 2]
                updated = buffer.at[phase, slot].set(value)
                buffer = jnp.where(valid == 1, updated, buffer)
            return buffer

        forward_pairs = [(i, i + 1) for i in range(num_ranks - 1)]
        backward_pairs = [(i + 1, i) for i in range(num_ranks - 1)]

        def tick(carry, table_row):
            row = jax.tree.map(lambda column: column[rank], table_row)
            f_phase, f_slot = jnp.maximum(row["f_phase"], 0), jnp.maximum(row["f_slot"], 0)
            b_phase, b_slot = jnp.maximum(row["b_phase"], 0), jnp.maximum(row["b_slot"], 0)
            row = {**row, "f_phase": f_phase, "b_phase": b_phase, "f_micro_batch": jnp.maximum(row["f_micro_batch"], 0),
                   "b_micro_batch": jnp.maximum(row["b_micro_batch"], 0)}
            x_f = carry["inputs"][f_phase, f_slot]
            x_b = carry["inputs"][b_phase, b_slot]
            dy = carry["grads"][b_phase, b_slot]
            kind = jnp.asarray(branch_of_kind)[row["kind"]]
            state = {k: v for k, v in carry.items() if k not in ("inputs", "grads")}
            state, y, dx = jax.lax.switch(kind, branches, state, row, x_f, x_b, dy)

            def routed(value, route):
                return [jnp.where(route == r, value, blank) for r in ticks.SOURCES]
            y_next, y_prev, y_self = routed(y, row["send_activation"])
            dx_next, dx_prev, dx_self = routed(dx, row["send_gradient"])
            with jax.named_scope("pipeline_ppermute"):
                # what I send to my next rank arrives there from its previous one, and vice versa
                from_prev = jax.lax.ppermute((y_next, dx_next), axis, forward_pairs)
                from_next = jax.lax.ppermute((y_prev, dx_prev), axis, backward_pairs)
            arrived_y = (from_next[0], from_prev[0], y_self)  # ordered as ticks.SOURCES
            arrived_dx = (from_next[1], from_prev[1], dx_self)
            inputs = deliver(carry["inputs"], arrived_y, row["receive_activation"])
            grads = deliver(carry["grads"], arrived_dx, row["receive_gradient"])
            return {**state, "inputs": inputs, "grads": grads}, None

        carry = {
            "inputs": zeros(x_struct, (num_phases, tables.depth)),
            "grads": zeros(x_struct, (num_phases, tables.depth)),
            "losses": jnp.zeros((num_chunks,), loss_dtype),
            "stage_stats": zeros(stage_stats_struct, (num_phases,)),
            "head_stats": zeros(head_stats_struct),
            "d_stages": jax.tree.map(jnp.zeros_like, local_stages),
            "d_pre": jax.tree.map(jnp.zeros_like, pre_params),
            "d_post": jax.tree.map(jnp.zeros_like, post_params),
        }
        if return_outputs:
            carry["outputs"] = zeros(x_struct, (num_chunks,))
        table_rows = {name: jnp.asarray(getattr(tables, name)) for name in (
            "kind", "f_phase", "f_micro_batch", "f_slot", "b_phase", "b_micro_batch", "b_slot",
            "send_activation", "send_gradient", "receive_activation", "receive_gradient")}
        carry, _ = jax.lax.scan(tick, carry, table_rows)
        psum = functools.partial(jax.lax.psum, axis_name=axis)
        out = {
            "losses": psum(carry["losses"]),
            "head_stats": jax.tree.map(psum, carry["head_stats"]),
            "stage_stats": jax.tree.map(lambda a: a[None], carry["stage_stats"]),
            "d_stages": jax.tree.map(lambda a: a[None], carry["d_stages"]),
            "d_pre": jax.tree.map(psum, carry["d_pre"]),
            "d_post": jax.tree.map(psum, carry["d_post"]),
        }
        if return_outputs:
            out["outputs"] = psum(carry["outputs"])
        return out

    out_specs = {"losses": P(), "head_stats": P(), "stage_stats": P(axis), "d_stages": P(axis), "d_pre": P(),
                 "d_post": P()}
    if return_outputs:
        out_specs["outputs"] = P()
    mapped = jax.shard_map(per_rank, mesh=mesh, in_specs=(P(axis), P(), P(), P()), out_specs=out_specs,
                           axis_names={axis}, check_vma=False)
    out = mapped(local_stages, params.pre, params.post, batch)
    flat = stage_of_phase.reshape(-1)
    # which [ranks * phases] entries are real copies (a rank with fewer stages pads with its first)
    real = np.array([[p < len(s) for p in range(num_phases)] for s in schedule.placement()]).reshape(-1)

    def to_stages(leaf):  # [ranks, phases, ...] -> [num_stages, ...], copies summed
        if in_order:
            return leaf[:, 0]
        leaf = leaf.reshape((-1,) + leaf.shape[2:])
        mask = jnp.asarray(real).reshape((-1,) + (1,) * (leaf.ndim - 1))
        return jnp.zeros((schedule.num_stages,) + leaf.shape[1:], leaf.dtype).at[flat].add(
            jnp.where(mask, leaf, jnp.zeros_like(leaf)))
    stage_stats = jax.tree.map(to_stages, out["stage_stats"])
    grads = None
    if train:
        grads = PipelineParams(out["d_pre"], jax.tree.map(to_stages, out["d_stages"]), out["d_post"])
    return PipelineResult(out["losses"], grads, stage_stats, out["head_stats"], out.get("outputs"))
