"""The MoE region and its two choices: the strategy that runs the routed experts, and their grouped matmul.

A strategy is one function,

    moe_apply(x, expert_ids, gate_weights, experts, grouped_matmul) -> (y, tokens_per_expert),

that moves each token's copies to its experts, runs the SwiGLU experts as grouped matmuls and sums the
copies back with their gating weights. How rows are laid out in between is the strategy's own business,
so expert parallelism is one more strategy (one ``shard_map`` over the local weight shards) rather
than three calls on global weights. ``get_moe_strategy`` and ``get_grouped_matmul`` are the only places
that turn a config name into code.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxseek.model import grouped_matmul as gmm
from pallas_kernels.fp8_gemm.vjp import fp8_grouped_linear

GroupedMatmul = gmm.GroupedMatmul

MOE_STRATEGIES = ("local",)
GROUPED_MATMULS = ("auto",) + tuple(gmm.GROUPED_MATMULS) + ("fp8",)


class ExpertWeights(NamedTuple):
    """One layer's routed experts, one slot per physical expert (replicas included)."""

    w_gate: jax.Array  # [slots, hidden, inter]
    w_up: jax.Array  # [slots, hidden, inter]
    w_down: jax.Array  # [slots, inter, hidden]


MoEStrategy = Callable[[jax.Array, jax.Array, jax.Array, ExpertWeights, GroupedMatmul], tuple[jax.Array, jax.Array]]


def swiglu_experts(rows: jax.Array, experts: ExpertWeights, group_sizes: jax.Array,
                   grouped_matmul: GroupedMatmul) -> jax.Array:
    """[rows, hidden] grouped by expert -> [rows, hidden]: down(silu(gate(x)) * up(x)) per group."""
    gate = grouped_matmul(rows, experts.w_gate, group_sizes)  # [rows, inter]
    up = grouped_matmul(rows, experts.w_up, group_sizes)
    return grouped_matmul(jax.nn.silu(gate) * up, experts.w_down, group_sizes)


def local_moe_apply(x: jax.Array, expert_ids: jax.Array, gate_weights: jax.Array, experts: ExpertWeights,
                    grouped_matmul: GroupedMatmul) -> tuple[jax.Array, jax.Array]:
    """All experts on this device: sort the (token, slot) copies by expert, run them, unsort and combine.

    Args:
      x: [tokens, hidden] activations in the compute dtype.
      expert_ids: [tokens, top_k] int32 expert slot of each copy.
      gate_weights: [tokens, top_k] float32 gating weights.
      experts: the layer's expert weights ([slots, ...]).
    Returns:
      (y [tokens, hidden] in x's dtype: sum_k weight_k * expert_k(x), tokens_per_expert [slots] int32).
    """
    tokens, top_k = expert_ids.shape
    slots = experts.w_gate.shape[0]
    flat_ids = expert_ids.reshape(-1)  # [tokens * top_k]
    order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)  # copy index of each expert-sorted row
    group_sizes = jnp.zeros((slots,), jnp.int32).at[flat_ids].add(1)
    out = swiglu_experts(x[order // top_k], experts, group_sizes, grouped_matmul)  # [tokens * top_k, hidden]
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))  # sorted row of each copy
    per_copy = out[rank].reshape(tokens, top_k, -1)  # back in (token, slot) order: a gather, not a row scatter
    y = jnp.einsum("tkd,tk->td", per_copy, gate_weights.astype(out.dtype))
    return y.astype(x.dtype), group_sizes


def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The grouped-matmul contract in FP8 (DeepGEMM's m-grouped contiguous GEMM forward and dgrad,
    k-grouped wgrad); ``w`` is [groups, in, out] as for every grouped matmul."""
    return fp8_grouped_linear(x, jnp.swapaxes(w, 1, 2), group_sizes)


def get_moe_strategy(name: str) -> MoEStrategy:
    if name == "local":
        return local_moe_apply
    raise ValueError(f"moe.strategy: expected one of {MOE_STRATEGIES}, got {name!r}")


def get_grouped_matmul(name: str, platform: str | None = None) -> GroupedMatmul:
    """The grouped matmul called ``name``; "auto" picks the variant for ``platform`` (default: jax's backend)."""
    if name == "fp8":
        return fp8_grouped_matmul
    if name == "auto":
        name = gmm.grouped_matmul_for(platform or jax.default_backend())
    if name in gmm.GROUPED_MATMULS:
        return gmm.GROUPED_MATMULS[name]
    raise ValueError(f"moe.grouped_matmul: expected one of {GROUPED_MATMULS}, got {name!r}")
