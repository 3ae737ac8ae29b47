"""DeepSeekMoE layer: shared experts + routed SwiGLU experts behind a group-limited sigmoid router.

gate -> one MoE region (``experts.get_moe_strategy``: dispatch -> grouped expert matmuls -> combine) ->
+ shared experts. The router is ``router.route``. Router statistics leave the layer as data
(``MoEStats``) for the balancing bias, EPLB and the metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.fp8_gemm.vjp import FP8Recipe
from jaxseek.config import MoEConfig
from jaxseek.model.experts import ExpertWeights, get_grouped_matmul, get_moe_strategy
from jaxseek.model.layers import SwiGLU
from jaxseek.model.router import route, sequence_balance_loss, updated_bias
from sharding.rules import constrain


def initial_placement(config: MoEConfig) -> np.ndarray:
    """[slots] logical expert of each physical slot at initialisation: the identity without replicas,
    else EPLB's placement for uniform loads."""
    experts = config.num_routed_experts
    if not config.num_physical_experts:
        return np.arange(experts, dtype=np.int32)
    from sharding.eplb import rebalance_experts

    placement = rebalance_experts(np.ones((1, experts)), config.num_physical_experts, config.n_group, 1,
                                  config.eplb_gpus)
    return placement.phy2log[0].astype(np.int32)


def replica_table(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """[slots] -> [experts, slots - experts + 1] int32 slots of each expert, -1 padded."""
    slots = np.asarray(phy2log)
    width = len(slots) - num_experts + 1
    table = np.full((num_experts, width), -1, np.int32)
    for expert in range(num_experts):
        held = np.flatnonzero(slots == expert)
        table[expert, :len(held)] = held
    return table


def placement_maps(config: MoEConfig) -> dict[str, np.ndarray]:
    """The initial EPLB maps of a layer: phy2log [slots], log2phy [experts, max_replicas] (-1 padded) and
    logcnt [experts] (replicas per expert); the identity without replicas."""
    phy2log = initial_placement(config)
    experts = config.num_routed_experts
    return {"phy2log": phy2log, "log2phy": replica_table(phy2log, experts),
            "logcnt": np.bincount(phy2log, minlength=experts).astype(np.int32)}


class ExpertBias(nnx.Variable):
    """The auxiliary-loss-free balancing bias [experts]: steers expert selection, receives no gradient."""


class ExpertPlacement(nnx.Variable):
    """Where the logical experts' replicas live (EPLB): integer maps, never trained."""


EXPERT_WEIGHT_AXES = {"w_gate": ("experts", "embed", "expert_mlp"), "w_up": ("experts", "embed", "expert_mlp"),
                      "w_down": ("experts", "expert_mlp", "embed")}


class MoEStats(NamedTuple):
    tokens_per_expert: jax.Array  # [experts] int32, routed copies this layer received
    balance_loss: jax.Array  # [] float32, sequence-wise balance loss (unweighted)
    dropped_tokens: jax.Array  # [] int32, (token, expert) copies over an expert-parallel capacity


class MoE(nnx.Module):
    def __init__(self, hidden_size: int, config: MoEConfig, *, dtype, init_std: float, rngs: nnx.Rngs,
                 fp8: FP8Recipe | None = None):
        self.config = config
        self.dtype = dtype
        self.fp8 = fp8
        e, d, f = config.num_routed_experts, hidden_size, config.intermediate_size
        init = nnx.initializers.normal(init_std)
        self.router = nnx.Param(init(rngs.params(), (e, d), jnp.float32), logical_axes=("router", "embed"))  # [E, d]
        self.expert_bias = ExpertBias(jnp.zeros((e,), jnp.float32), logical_axes=("router",))
        # Expert weights are physical: one slot per replica when EPLB replicates experts
        # (num_physical_experts > 0), else one per logical expert. Replicas start identical.
        maps = placement_maps(config)
        phy2log = maps["phy2log"]  # [slots]
        self.phy2log = ExpertPlacement(jnp.asarray(phy2log), logical_axes=("expert_slots",))
        self.log2phy = ExpertPlacement(jnp.asarray(maps["log2phy"]), logical_axes=("router", "replicas"))
        self.logcnt = ExpertPlacement(jnp.asarray(maps["logcnt"]), logical_axes=("router",))
        shapes = {"w_gate": (e, d, f), "w_up": (e, d, f), "w_down": (e, f, d)}  # [slots, in, out] once placed
        for name, shape in shapes.items():
            weight = init(rngs.params(), shape, jnp.float32)
            if config.num_physical_experts:  # replicas copy their expert (a gather; skipped for the identity)
                weight = weight[phy2log]
            setattr(self, name, nnx.Param(weight, logical_axes=EXPERT_WEIGHT_AXES[name]))
        self.shared = (SwiGLU(d, config.num_shared_experts * f, dtype=dtype, init_std=init_std, rngs=rngs, fp8=fp8)
                       if config.num_shared_experts else None)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, MoEStats]:
        """[batch, seq, hidden] -> ([batch, seq, hidden], MoEStats)."""
        c = self.config
        batch, seq, hidden = x.shape
        tokens = constrain(x.reshape(batch * seq, hidden), ("batch", "embed"))  # [T, d], tokens split like the batch
        with jax.named_scope("gate"):
            logits = tokens.astype(jnp.float32) @ self.router[...].T  # [T, E] float32
            routing = route(logits, self.expert_bias[...], top_k=c.num_experts_per_token, n_group=c.n_group,
                            topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor)
            slots = self.physical_slots(routing.expert_ids)  # [T, k] the replica each copy goes to
        strategy = get_moe_strategy(c.strategy, capacity_factor=c.capacity_factor or None, fp8_dispatch=c.fp8_dispatch,
                                    decoding=seq == 1)
        y, slot_load, dropped = strategy(tokens.astype(self.dtype), slots, routing.weights, self.expert_weights(),
                                         get_grouped_matmul(c.grouped_matmul, fp8_recipe=self.fp8))
        y = y.reshape(batch, seq, hidden)
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x)
        stats = MoEStats(
            # the region counts copies per physical slot; an expert's load is the sum over its replicas
            tokens_per_expert=jax.ops.segment_sum(slot_load, self.phy2log[...], c.num_routed_experts),
            balance_loss=sequence_balance_loss(routing.affinities.reshape(batch, seq, -1),
                                               routing.expert_ids.reshape(batch, seq, -1), c.num_routed_experts),
            dropped_tokens=dropped,
        )
        return y.astype(x.dtype), stats

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w_gate[...], self.w_up[...], self.w_down[...])

    def physical_slots(self, expert_ids: jax.Array) -> jax.Array:
        """[T, k] logical experts -> [T, k] physical slots, spreading each expert's tokens over its replicas
        round-robin by token and slot (any replica gives the same result: replicas hold equal weights)."""
        tokens, top_k = expert_ids.shape
        turn = jnp.arange(tokens, dtype=jnp.int32)[:, None] + jnp.arange(top_k, dtype=jnp.int32)[None]
        replica = turn % self.logcnt[...][expert_ids]
        return self.log2phy[...][expert_ids, replica]

    def update_bias(self, load: jax.Array) -> None:
        """Applies the auxiliary-loss-free update for [experts] token counts observed in the last step."""
        self.expert_bias[...] = updated_bias(self.expert_bias[...], load, self.config.bias_update_rate)
