"""DeepSeekMoE layer: shared experts + routed SwiGLU experts behind a group-limited sigmoid router.

gate -> dispatch -> grouped expert matmul -> combine. The dispatch and matmul strategies come from
``experts.get_dispatcher`` / ``experts.get_grouped_matmul``; the router is ``router.route``. Router
statistics leave the layer as data (``MoEStats``) for the balancing bias, EPLB and the metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseek.config import MoEConfig
from jaxseek.model.experts import get_dispatcher, get_grouped_matmul
from jaxseek.model.layers import SwiGLU
from jaxseek.model.router import route, sequence_balance_loss, tokens_per_expert, updated_bias


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


class ExpertBias(nnx.Variable):
    """The auxiliary-loss-free balancing bias: steers expert selection, receives no gradient."""


class ExpertPlacement(nnx.Variable):
    """Where the logical experts' replicas live (EPLB): integer maps, never trained."""


class MoEStats(NamedTuple):
    tokens_per_expert: jax.Array  # [experts] int32, routed copies this layer received
    balance_loss: jax.Array  # [] float32, sequence-wise balance loss (unweighted)


class MoE(nnx.Module):
    def __init__(self, hidden_size: int, config: MoEConfig, *, dtype, init_std: float, rngs: nnx.Rngs,
                 fp8: bool = False):
        self.config = config
        self.dtype = dtype
        e, d, f = config.num_routed_experts, hidden_size, config.intermediate_size
        init = nnx.initializers.normal(init_std)
        self.router = nnx.Param(init(rngs.params(), (e, d), jnp.float32))  # [experts, hidden]
        self.expert_bias = ExpertBias(jnp.zeros((e,), jnp.float32))
        # Expert weights are physical: one slot per replica when EPLB replicates experts
        # (num_physical_experts > 0), else one per logical expert. Replicas start identical.
        phy2log = initial_placement(config)  # [slots]
        self.phy2log = ExpertPlacement(jnp.asarray(phy2log))
        self.log2phy = ExpertPlacement(jnp.asarray(replica_table(phy2log, e)))  # [experts, max_replicas], -1 padded
        self.logcnt = ExpertPlacement(jnp.asarray(np.bincount(phy2log, minlength=e), jnp.int32))  # [experts]
        self.w_gate = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32)[phy2log])  # [slots, hidden, inter]
        self.w_up = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32)[phy2log])  # [slots, hidden, inter]
        self.w_down = nnx.Param(init(rngs.params(), (e, f, d), jnp.float32)[phy2log])  # [slots, inter, hidden]
        self.shared = (SwiGLU(d, config.num_shared_experts * f, dtype=dtype, init_std=init_std, rngs=rngs, fp8=fp8)
                       if config.num_shared_experts else None)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, MoEStats]:
        """[batch, seq, hidden] -> ([batch, seq, hidden], MoEStats)."""
        c = self.config
        dispatcher, grouped_matmul = get_dispatcher(c.dispatch), get_grouped_matmul(c.grouped_matmul)
        batch, seq, hidden = x.shape
        tokens = x.reshape(batch * seq, hidden)  # [T, d]
        logits = tokens.astype(jnp.float32) @ self.router[...].T  # [T, E] float32
        routing = route(logits, self.expert_bias[...], top_k=c.num_experts_per_token, n_group=c.n_group,
                        topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor)
        slots = self.physical_slots(routing.expert_ids)  # [T, k] the replica each copy goes to
        rows, layout = dispatcher.dispatch(tokens.astype(self.dtype), slots, self.phy2log.shape[0])  # [T * k, d]
        gate = grouped_matmul(rows, self.w_gate[...], layout.group_sizes)  # [T * k, f]
        up = grouped_matmul(rows, self.w_up[...], layout.group_sizes)
        expert_out = grouped_matmul(jax.nn.silu(gate) * up, self.w_down[...], layout.group_sizes)
        y = dispatcher.combine(expert_out, routing.weights, layout).reshape(batch, seq, hidden)
        if self.shared is not None:
            y = y + self.shared(x)
        stats = MoEStats(
            tokens_per_expert=tokens_per_expert(routing.expert_ids, c.num_routed_experts),
            balance_loss=sequence_balance_loss(routing.affinities.reshape(batch, seq, -1),
                                               routing.expert_ids.reshape(batch, seq, -1), c.num_routed_experts),
        )
        return y.astype(x.dtype), stats

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
