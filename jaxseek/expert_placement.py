"""EPLB online: expert loads tracked during training, replicas re-placed every N steps.

The train step keeps an exponential average of tokens per expert in the state (``TrainState
.load_average``, so it is checkpointed and a resumed run rebalances exactly like an uninterrupted one).

The MoE layers hold physical expert slots (``MoEConfig.num_physical_experts``) and the placement maps
(phy2log, log2phy, logcnt). Replicas of one logical expert hold identical weights: their gradients are
summed and given to every replica (``sum_replica_gradients``), so identical optimizer updates keep them
identical. A rebalance computes a new placement from the load average (``sharding.eplb``) and lays out
the physical weights and their Adam moments from the logical experts, so the model computes exactly the
same function before and after.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxseek.config import EPLBConfig, ModelConfig
from jaxseek.model.moe import MoE, replica_table
from sharding.eplb import balancedness, gpu_loads, rebalance_experts

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class RebalanceReport(NamedTuple):
    balancedness_before: float  # mean over layers, current placement under the tracked loads
    balancedness_after: float
    moved_slots: int  # physical expert slots whose weights changed


def _moe_layers(graphdef, params_like, model_state) -> tuple[object, list[MoE]]:
    """A copy of the model (so edits never reach the caller's state) and its stacked MoE layers
    (arrays with a leading layer axis, in ``expert_load`` row order)."""
    model = nnx.merge(graphdef, params_like, model_state, copy=True)
    return model, model.moe_layers()


def _replica_sums(grad: jax.Array, phy2log: jax.Array, logcnt: jax.Array) -> jax.Array:
    """[layers, slots, ...] -> the same with each slot holding the sum over its expert's replicas (one device)."""
    experts = logcnt.shape[-1]
    return jax.vmap(lambda w, p: jax.ops.segment_sum(w, p, experts)[p])(grad, phy2log)


def _replica_sums_over_ep(grad: jax.Array, phy2log: jax.Array, logcnt: jax.Array, mesh: Mesh) -> jax.Array:
    """``_replica_sums`` with the slots split over the mesh's ``ep`` axis (slot s on rank s // slots_per_rank).

    Only replicated experts are exchanged: each rank adds its slots of replicated experts into a
    [layers, redundant, ...] buffer (row = the expert's index among the replicated ones), one psum over ep
    sums the replicas wherever they live, and each replica reads its row back. The psum carries
    ``slots - experts`` rows, not every expert.
    """
    layers, slots = phy2log.shape
    redundant = slots - logcnt.shape[-1]  # at most this many experts have more than one replica

    def per_rank(grad, phy2log, logcnt):  # grad [layers, local_slots, ...]
        local = grad.shape[1]
        mine = jax.lax.axis_index("ep") * local + jnp.arange(local)
        expert = phy2log[:, mine]  # [layers, local]
        replicated = jnp.take_along_axis(logcnt > 1, expert, axis=1)
        row = jnp.take_along_axis(jnp.cumsum(logcnt > 1, axis=1) - 1, expert, axis=1)
        row = jnp.where(replicated, row, redundant)  # [layers, local]; redundant = not exchanged
        buffer = jnp.zeros((layers, redundant + 1) + grad.shape[2:], grad.dtype)
        buffer = jax.vmap(lambda b, r, g: b.at[r].add(g))(buffer, row, grad)
        summed = jax.lax.psum(buffer[:, :redundant], "ep")
        shared = jax.vmap(lambda s, r: jnp.take(s, r, axis=0, mode="fill", fill_value=0))(summed, row)
        mask = replicated.reshape(replicated.shape + (1,) * (grad.ndim - 2))
        return jnp.where(mask, shared, grad)

    spec = P(None, "ep")
    return jax.shard_map(per_rank, mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec,
                         check_vma=False)(grad, phy2log, logcnt)


def sum_replica_gradients(graphdef: nnx.GraphDef, grads, model_state, mesh: Mesh | None = None):
    """Gives every replica the sum of its expert's replica gradients (inside the jitted step); with a mesh
    whose ``ep`` axis is > 1, among the ranks that hold the replicas (``_replica_sums_over_ep``)."""
    model, layers = _moe_layers(graphdef, grads, model_state)
    for layer in layers:
        slots = layer.phy2log.shape[-1]
        over_ep = mesh is not None and mesh.shape["ep"] > 1 and slots % mesh.shape["ep"] == 0
        for name in EXPERT_WEIGHTS:
            weight = getattr(layer, name)
            if over_ep:
                weight[...] = _replica_sums_over_ep(weight[...], layer.phy2log[...], layer.logcnt[...], mesh)
            else:
                weight[...] = _replica_sums(weight[...], layer.phy2log[...], layer.logcnt[...])
    return nnx.split(model, nnx.Param, ...)[1]


def logical_gradient_norm(graphdef: nnx.GraphDef, grads, model_state) -> jax.Array:
    """The global gradient norm with each logical expert counted once: after ``sum_replica_gradients`` every
    replica holds its expert's whole gradient, so a slot's squared norm is divided by its replica count."""
    model, layers = _moe_layers(graphdef, grads, model_state)
    for layer in layers:
        if not layer.config.num_physical_experts:
            continue
        share = jax.vmap(lambda count, p: count[p])(layer.logcnt[...], layer.phy2log[...])  # [layers, slots]
        for name in EXPERT_WEIGHTS:
            weight = getattr(layer, name)
            weight[...] = weight[...] * jax.lax.rsqrt(share.astype(weight.dtype))[:, :, None, None]
    return optax.tree.norm(nnx.split(model, nnx.Param, ...)[1])


def current_placements(graphdef, params, model_state) -> np.ndarray:
    """[moe_layers, slots] phy2log of every MoE layer."""
    _, layers = _moe_layers(graphdef, params, model_state)
    return np.concatenate([np.asarray(layer.phy2log[...]) for layer in layers])


def _split_rows(rows, layers: list[MoE]) -> list:
    """[moe_layers, ...] rows -> one [layers_of_stack, ...] block per stacked MoE layer."""
    bounds = np.cumsum([0] + [layer.phy2log.shape[0] for layer in layers])
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def placement_balancedness(loads: np.ndarray, phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """[L] mean / max GPU load of a placement under [L, E] loads."""
    logcnt = np.stack([np.bincount(p, minlength=num_experts) for p in phy2log])
    return balancedness(gpu_loads(np.asarray(loads, np.float64), phy2log, np.maximum(logcnt, 1), num_gpus))


def _relayout(graphdef, params_like, model_state, gathers: np.ndarray):
    """Permutes the expert slots of a params-shaped state: slot s of MoE layer l takes old slot gathers[l, s]."""
    model, layers = _moe_layers(graphdef, params_like, model_state)
    for layer, gather in zip(layers, _split_rows(jnp.asarray(gathers), layers)):
        for name in EXPERT_WEIGHTS:
            weight = getattr(layer, name)
            weight[...] = jnp.take_along_axis(weight[...], gather[:, :, None, None], axis=1)
    return nnx.split(model, nnx.Param, ...)[1]


def rebalance(state, graphdef: nnx.GraphDef, mc: ModelConfig, loads: np.ndarray, eplb: EPLBConfig):
    """(TrainState, [moe_layers, E] loads) -> (TrainState with new placements, RebalanceReport)."""
    experts, gpus = mc.moe.num_routed_experts, mc.moe.eplb_gpus
    previous = current_placements(graphdef, state.params, state.model_state)
    placement = rebalance_experts(loads, mc.moe.num_physical_experts, mc.moe.n_group, eplb.nodes, gpus,
                                  previous=previous, min_improvement=eplb.min_improvement)
    # New slot s holds logical expert phy2log[s]: copy it from that expert's first old replica.
    first_old_slot = [np.array([np.flatnonzero(p == e)[0] for e in range(experts)]) for p in previous]
    gathers = np.stack([first[new] for first, new in zip(first_old_slot, placement.phy2log)])  # [moe_layers, slots]

    def relayout_params_like(tree):
        return jax.tree.map(lambda x: _relayout(graphdef, x, state.model_state, gathers)
                            if isinstance(x, nnx.State) else x, tree, is_leaf=lambda x: isinstance(x, nnx.State))

    params = _relayout(graphdef, state.params, state.model_state, gathers)
    opt_state = relayout_params_like(state.opt_state)  # Adam's moments mirror the params
    model, layers = _moe_layers(graphdef, params, state.model_state)
    for layer, phy2log in zip(layers, _split_rows(np.asarray(placement.phy2log), layers)):
        layer.phy2log[...] = jnp.asarray(phy2log, jnp.int32)
        layer.log2phy[...] = jnp.asarray(np.stack([replica_table(p, experts) for p in phy2log]))
        layer.logcnt[...] = jnp.asarray(np.stack([np.bincount(p, minlength=experts) for p in phy2log]), jnp.int32)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    report = RebalanceReport(float(placement_balancedness(loads, previous, experts, gpus).mean()),
                             float(placement.balancedness.mean()), placement.moved_slots)
    return state._replace(params=params, model_state=model_state, opt_state=opt_state), report
