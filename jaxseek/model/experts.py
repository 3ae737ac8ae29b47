"""The MoE region and its two choices: the strategy that runs the routed experts, and their grouped matmul.

A strategy is one function,

    moe_apply(x, expert_ids, gate_weights, experts, grouped_matmul) -> MoEOutput(y, tokens_per_slot, num_dropped),

that moves each token's copies to its experts, runs the SwiGLU experts as grouped matmuls and sums the
copies back with their gating weights. How rows are laid out in between is the strategy's own business:

- ``"local"``: every expert on this device (sort by expert, grouped matmuls, unsort).
- ``"ep"``: expert parallelism. Under a mesh whose ``ep`` axis is > 1 (the ambient
  ``sharding.rules.activation_sharding``), one ``shard_map`` runs dispatch -> the rank's local experts ->
  combine, tokens split over (``dp``, ``ep``), expert slots over ``ep`` (slot s on rank s // slots_per_rank):
  DeepEP's normal mode for training and prefill, its low-latency mode when decoding one token per
  sequence. Anywhere else it is the local strategy. The default.

``get_moe_strategy`` and ``get_grouped_matmul`` are the only places that turn a config name into code.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxseek.model import grouped_matmul as gmm
from pallas_kernels.fp8_gemm.vjp import FP8Recipe, fp8_grouped_linear
from pallas_kernels.quant import FP8Array, dequantize_per_token
from sharding.ep import combine, dispatch, low_latency_combine, low_latency_dispatch
from sharding.rules import activation_layout

GroupedMatmul = gmm.GroupedMatmul

MOE_STRATEGIES = ("ep", "local")
GROUPED_MATMULS = ("auto",) + tuple(gmm.GROUPED_MATMULS) + ("fp8",)


class ExpertWeights(NamedTuple):
    """One layer's routed experts, one slot per physical expert (replicas included)."""

    w_gate: jax.Array  # [slots, hidden, inter]
    w_up: jax.Array  # [slots, hidden, inter]
    w_down: jax.Array  # [slots, inter, hidden]


class MoEOutput(NamedTuple):
    y: jax.Array  # [tokens, hidden] sum_k weight_k * expert_k(x)
    tokens_per_slot: jax.Array  # [slots] int32 copies each physical expert slot computed
    num_dropped: jax.Array  # [] int32 (token, expert) copies that did not fit a capacity (0 when dropless)


MoEStrategy = Callable[[jax.Array, jax.Array, jax.Array, ExpertWeights, GroupedMatmul], MoEOutput]


def swiglu_experts(rows: jax.Array, experts: ExpertWeights, group_sizes: jax.Array,
                   grouped_matmul: GroupedMatmul) -> jax.Array:
    """[rows, hidden] grouped by expert -> [rows, hidden]: down(silu(gate(x)) * up(x)) per group."""
    gate = grouped_matmul(rows, experts.w_gate, group_sizes)  # [rows, inter]
    up = grouped_matmul(rows, experts.w_up, group_sizes)
    return grouped_matmul(jax.nn.silu(gate) * up, experts.w_down, group_sizes)


def local_moe_apply(x: jax.Array, expert_ids: jax.Array, gate_weights: jax.Array, experts: ExpertWeights,
                    grouped_matmul: GroupedMatmul) -> MoEOutput:
    """All experts on this device: sort the (token, slot) copies by expert, run them, unsort and combine.

    Args:
      x: [tokens, hidden] activations in the compute dtype.
      expert_ids: [tokens, top_k] int32 expert slot of each copy.
      gate_weights: [tokens, top_k] float32 gating weights.
      experts: the layer's expert weights ([slots, ...]).
    Returns:
      MoEOutput: y [tokens, hidden] in x's dtype, tokens per slot [slots] int32, no drops.
    """
    tokens, top_k = expert_ids.shape
    slots = experts.w_gate.shape[0]
    with jax.named_scope("dispatch"):  # on one device: a sort of the copies by expert
        flat_ids = expert_ids.reshape(-1)  # [tokens * top_k]
        order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)  # copy index of each expert-sorted row
        group_sizes = jnp.zeros((slots,), jnp.int32).at[flat_ids].add(1)
        rows = x[order // top_k]
    with jax.named_scope("experts"):
        out = swiglu_experts(rows, experts, group_sizes, grouped_matmul)  # [tokens * top_k, hidden]
    with jax.named_scope("combine"):
        rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))  # sorted row of each copy
        per_copy = out[rank].reshape(tokens, top_k, -1)  # back in (token, slot) order: a gather, not a row scatter
        y = jnp.einsum("tkd,tk->td", per_copy, gate_weights.astype(out.dtype))
    return MoEOutput(y.astype(x.dtype), group_sizes, jnp.zeros((), jnp.int32))


def _expert_mesh():
    """The ambient mesh when its ``ep`` axis is > 1, else None (expert parallelism needs one)."""
    layout = activation_layout()
    return layout[0] if layout is not None and layout[0].shape.get("ep", 1) > 1 else None


def _on_token_shards(per_rank, mesh, x, expert_ids, gate_weights, experts: ExpertWeights) -> MoEOutput:
    """Runs ``per_rank(x, ids, weights, w_gate, w_up, w_down) -> (y, [local] loads, [] drops)`` in one shard_map:
    tokens over (dp, ep), padded to a multiple of the shards with rows that select nothing; slots over ep."""
    tokens = x.shape[0]
    pad = -tokens % (mesh.shape["dp"] * mesh.shape["ep"])
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        expert_ids = jnp.pad(expert_ids, ((0, pad), (0, 0)), constant_values=-1)
        gate_weights = jnp.pad(gate_weights, ((0, pad), (0, 0)))
    split = P(("dp", "ep"))
    mapped = jax.shard_map(per_rank, mesh=mesh, in_specs=(split, split, split, P("ep"), P("ep"), P("ep")),
                           out_specs=(split, P("ep"), P()), check_vma=False)
    y, load, dropped = mapped(x, expert_ids, gate_weights, *experts)
    return MoEOutput(y[:tokens], load, dropped)


def ep_moe_apply(x: jax.Array, expert_ids: jax.Array, gate_weights: jax.Array, experts: ExpertWeights,
                 grouped_matmul: GroupedMatmul, *, capacity_factor: float | None = None,
                 fp8_dispatch: bool = False) -> MoEOutput:
    """Expert parallelism, DeepEP's normal mode, over the ambient mesh's ``ep`` axis (local without one).

    Args/Returns as ``local_moe_apply``; x, expert_ids and gate_weights are the global [tokens, ...] arrays
    of the traced program, split over (dp, ep) inside; the experts' slot axis is split over ep.
    capacity_factor: None = dropless; fp8_dispatch: tokens travel as 1x128 FP8.
    """
    mesh = _expert_mesh()
    if mesh is None:
        return local_moe_apply(x, expert_ids, gate_weights, experts, grouped_matmul)
    slots = experts.w_gate.shape[0]

    def per_rank(x, expert_ids, gate_weights, w_gate, w_up, w_down):
        with jax.named_scope("dispatch"):
            received = dispatch(x, expert_ids, gate_weights, num_experts=slots, axis_name="ep",
                                capacity_factor=capacity_factor, use_fp8=fp8_dispatch)
        with jax.named_scope("experts"):
            out = swiglu_experts(received.x, ExpertWeights(w_gate, w_up, w_down), received.tokens_per_expert,
                                 grouped_matmul)  # [rows, hidden], padding rows 0
        with jax.named_scope("combine"):
            y = combine(out, received.handle, received.weights)
        return (y, jax.lax.psum(received.tokens_per_expert, "dp"),
                jax.lax.psum(received.num_dropped, ("dp", "ep")))

    return _on_token_shards(per_rank, mesh, x, expert_ids, gate_weights, experts)


def ep_low_latency_moe_apply(x: jax.Array, expert_ids: jax.Array, gate_weights: jax.Array, experts: ExpertWeights,
                             grouped_matmul: GroupedMatmul, *, fp8_dispatch: bool = False) -> MoEOutput:
    """Expert parallelism for decoding, DeepEP's low-latency mode: one row per (token, expert) in the masked
    layout [local_experts, tokens * ranks, hidden], the experts as a masked batched matmul (the layout
    ``m_grouped_fp8_gemm_nt_masked`` takes), a weighted combine. Local without an ``ep`` mesh."""
    del grouped_matmul  # the masked layout is already grouped: a batched matmul over the local experts
    mesh = _expert_mesh()
    if mesh is None:
        return local_moe_apply(x, expert_ids, gate_weights, experts, gmm.GROUPED_MATMULS["ragged_dot"])
    slots = experts.w_gate.shape[0]

    def per_rank(x, expert_ids, gate_weights, w_gate, w_up, w_down):
        with jax.named_scope("dispatch"):
            received = low_latency_dispatch(x, expert_ids, x.shape[0], slots, axis_name="ep", use_fp8=fp8_dispatch)
        rows = received.x  # [local, ranks * tokens, hidden]
        if fp8_dispatch:
            flat = FP8Array(rows.data.reshape(-1, rows.data.shape[-1]), rows.scale.reshape(-1, rows.scale.shape[-1]))
            rows = dequantize_per_token(flat).reshape(rows.data.shape).astype(x.dtype)
        gate = jnp.einsum("lmd,ldf->lmf", rows, w_gate.astype(x.dtype))
        up = jnp.einsum("lmd,ldf->lmf", rows, w_up.astype(x.dtype))
        out = jnp.einsum("lmf,lfd->lmd", jax.nn.silu(gate) * up, w_down.astype(x.dtype))
        with jax.named_scope("combine"):
            y = low_latency_combine(out, expert_ids, gate_weights, received.handle)
        return (y.astype(x.dtype), jax.lax.psum(received.count, "dp"),
                jax.lax.psum(received.num_dropped, ("dp", "ep")))

    return _on_token_shards(per_rank, mesh, x, expert_ids, gate_weights, experts)


def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, recipe: FP8Recipe = FP8Recipe()
                       ) -> jax.Array:
    """The grouped-matmul contract in FP8 (DeepGEMM's m-grouped contiguous GEMM forward and dgrad,
    k-grouped wgrad; those ``recipe`` names); ``w`` is [groups, in, out] as for every grouped matmul."""
    return fp8_grouped_linear(x, jnp.swapaxes(w, 1, 2), group_sizes, None, recipe)


def check_expert_parallel(moe, mesh: Mesh) -> None:
    """``ValueError`` naming the field when a ``MoEConfig``'s expert slots cannot live on the mesh's ``ep``
    ranks (slot s on rank s // slots_per_rank, as ``ep_moe_apply`` splits them)."""
    ep = mesh.shape["ep"]
    if ep == 1 or moe.strategy != "ep":
        return
    slots = moe.num_physical_experts or moe.num_routed_experts
    if slots % ep:
        field = "moe.num_physical_experts" if moe.num_physical_experts else "moe.num_routed_experts"
        raise ValueError(f"{field}: {slots} expert slots cannot be split over ep={ep} ranks")
    if moe.num_physical_experts and moe.eplb_gpus != ep:
        raise ValueError(f"moe.eplb_gpus: EPLB places slots on the ep ranks (slot s on rank s // {slots // ep}), "
                         f"so it must equal ep={ep}, got {moe.eplb_gpus}")


def get_moe_strategy(name: str, *, capacity_factor: float | None = None, fp8_dispatch: bool = False,
                     decoding: bool = False) -> MoEStrategy:
    """The strategy called ``name``; the options apply to expert parallelism, where ``decoding`` (one new token
    per sequence) picks DeepEP's low-latency mode and anything else its normal mode, as SGLang's auto mode."""
    if name == "local":
        return local_moe_apply
    if name == "ep" and decoding:
        return functools.partial(ep_low_latency_moe_apply, fp8_dispatch=fp8_dispatch)
    if name == "ep":
        return functools.partial(ep_moe_apply, capacity_factor=capacity_factor, fp8_dispatch=fp8_dispatch)
    raise ValueError(f"moe.strategy: expected one of {MOE_STRATEGIES}, got {name!r}")


def get_grouped_matmul(name: str, platform: str | None = None, *, fp8_recipe: FP8Recipe | None = None
                       ) -> GroupedMatmul:
    """The grouped matmul called ``name``; "auto" picks the variant for ``platform`` (default: jax's backend);
    "fp8" runs the GEMMs ``fp8_recipe`` names (default all three) in FP8."""
    if name == "fp8":
        return functools.partial(fp8_grouped_matmul, recipe=fp8_recipe or FP8Recipe())
    if name == "auto":
        name = gmm.grouped_matmul_for(platform or jax.default_backend())
    if name in gmm.GROUPED_MATMULS:
        return gmm.GROUPED_MATMULS[name]
    raise ValueError(f"moe.grouped_matmul: expected one of {GROUPED_MATMULS}, got {name!r}")
