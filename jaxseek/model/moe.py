"""DeepSeekMoE layer: shared experts + routed SwiGLU experts behind a group-limited sigmoid router.

gate -> dispatch -> grouped expert matmul -> combine. The dispatch and matmul strategies come from
``experts.get_dispatcher`` / ``experts.get_grouped_matmul``; the router is ``router.route``. Router
statistics leave the layer as data (``MoEStats``) for the balancing bias, EPLB and the metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseek.config import MoEConfig
from jaxseek.model.experts import get_dispatcher, get_grouped_matmul
from jaxseek.model.layers import SwiGLU
from jaxseek.model.router import route, sequence_balance_loss, tokens_per_expert, updated_bias


class ExpertBias(nnx.Variable):
    """The auxiliary-loss-free balancing bias: steers expert selection, receives no gradient."""


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
        self.w_gate = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32))  # [experts, hidden, inter]
        self.w_up = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32))  # [experts, hidden, inter]
        self.w_down = nnx.Param(init(rngs.params(), (e, f, d), jnp.float32))  # [experts, inter, hidden]
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
        rows, layout = dispatcher.dispatch(tokens.astype(self.dtype), routing.expert_ids,
                                                 c.num_routed_experts)  # [T * k, d]
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

    def update_bias(self, load: jax.Array) -> None:
        """Applies the auxiliary-loss-free update for [experts] token counts observed in the last step."""
        self.expert_bias[...] = updated_bias(self.expert_bias[...], load, self.config.bias_update_rate)
