"""Parameter and FLOP accounting computed abstractly (``nnx.eval_shape``): nothing is materialised,
so the 671B DeepSeek-V3 preset is counted on a laptop.

Conventions (DeepSeek's): ``total`` counts the main model, embedding and output head included, without
the MTP modules (the published "671B main model weights + 14B MTP module"); ``activated`` counts the
parameters one token's forward pass multiplies with, so the routed experts count ``top_k / experts`` of
their weights and the embedding table, a lookup, not at all.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from jaxseek.config import ModelConfig
from jaxseek.model.transformer import Transformer

ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class ParameterCount(NamedTuple):
    total: int  # main model, embedding and head included, MTP excluded
    activated: int  # per token, main model, embedding table excluded
    embedding: int
    mtp_total: int
    mtp_activated: int


class FlopsPerToken(NamedTuple):
    forward: float  # matmul FLOPs of one token's forward pass at the given context length
    training: float  # forward + backward (3x forward)


def _abstract_shapes(build) -> dict[str, tuple[int, ...]]:
    """Flat ``'attn.wo.kernel' -> shape`` map of the parameters of the module ``build()`` returns."""
    state = nnx.state(nnx.eval_shape(build), nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat ``'moe_blocks.layers.ffn.w_gate' -> shape`` map of every parameter of ``Transformer(config)``.

    Stacked blocks carry their leading layer axis (``[num_moe_layers, experts, hidden, inter]`` above); each
    stack is traced once, so even the 61-layer preset is counted in about a second.
    """
    return _abstract_shapes(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def count_parameters(config: ModelConfig) -> ParameterCount:
    routed_fraction = config.moe.num_experts_per_token / config.moe.num_routed_experts
    total = activated = embedding = mtp_total = mtp_activated = 0
    for name, shape in parameter_shapes(config).items():
        size = 1
        for dim in shape:
            size *= dim
        parts = name.split(".")
        used = size * routed_fraction if parts[-1] in ROUTED_EXPERT_WEIGHTS else size
        if parts[0] == "mtp":
            mtp_total += size
            mtp_activated += used
        elif parts[0] == "embed":
            total += size
            embedding += size
        else:
            total += size
            activated += used
    return ParameterCount(total, round(activated), embedding, mtp_total, round(mtp_activated))


def flops_per_token(config: ModelConfig, context_len: int) -> FlopsPerToken:
    """Matmul FLOPs per token: 2 per activated weight, plus causal attention over ``context_len / 2``
    tokens on average (scores over qk_head_dim, values over v_head_dim, per head and layer)."""
    counts = count_parameters(config)
    mla = config.mla
    attention = 2 * config.num_layers * mla.num_heads * (mla.qk_head_dim + mla.v_head_dim) * context_len / 2
    forward = 2 * counts.activated + attention
    return FlopsPerToken(forward, 3 * forward)
