"""The two strategy points of the MoE layer: how tokens reach experts, and how expert matmuls run.

The layer is gate -> dispatch -> grouped expert matmul -> combine. ``get_dispatcher`` and
``get_grouped_matmul`` are the single places that turn a config name into code, so expert parallelism
(``sharding/ep.py``) and the FP8 grouped GEMMs (``pallas_kernels/fp8_gemm``) plug in by adding a name
here, without touching the layer.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_gemm.vjp import fp8_grouped_linear


DISPATCHERS = ("local",)
GROUPED_MATMULS = ("xla", "fp8")


class DispatchLayout(NamedTuple):
    """How a local dispatch permuted the (token, slot) copies; what combine needs to undo it."""

    order: jax.Array  # [tokens * top_k] int32, flat (token, slot) index of each expert-sorted row
    group_sizes: jax.Array  # [experts] int32, rows per expert in the sorted buffer


class Dispatcher(NamedTuple):
    dispatch: Callable[[jax.Array, jax.Array, int], tuple[jax.Array, DispatchLayout]]
    combine: Callable[[jax.Array, jax.Array, DispatchLayout], jax.Array]


def local_dispatch(x: jax.Array, expert_ids: jax.Array, num_experts: int) -> tuple[jax.Array, DispatchLayout]:
    """Sorts every (token, slot) copy by expert, on this device.

    Args:
      x: [tokens, hidden] activations.
      expert_ids: [tokens, top_k] int32 routed experts.
    Returns:
      ([tokens * top_k, hidden] rows grouped by expert in ascending order, the layout).
    """
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)  # [tokens * top_k]
    order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_ids].add(1)
    return x[order // top_k], DispatchLayout(order, group_sizes)


def local_combine(y: jax.Array, weights: jax.Array, layout: DispatchLayout) -> jax.Array:
    """Undoes ``local_dispatch`` and sums each token's expert outputs with its gating weights.

    Args:
      y: [tokens * top_k, hidden] expert outputs in dispatch order.
      weights: [tokens, top_k] float32 gating weights.
    Returns:
      [tokens, hidden] in y's dtype.
    """
    tokens, top_k = weights.shape
    inverse = jnp.zeros_like(layout.order).at[layout.order].set(jnp.arange(layout.order.shape[0], dtype=jnp.int32))
    per_slot = y[inverse].reshape(tokens, top_k, -1)  # [tokens, top_k, hidden]
    return jnp.einsum("tkd,tk->td", per_slot, weights.astype(y.dtype))


def xla_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[rows, in] x [groups, in, out] with consecutive row groups -> [rows, out] (``lax.ragged_dot``)."""
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The same contract in FP8 (DeepGEMM's m-grouped contiguous GEMM forward and dgrad, k-grouped wgrad)."""
    return fp8_grouped_linear(x, jnp.swapaxes(w, 1, 2), group_sizes)


def get_dispatcher(name: str) -> Dispatcher:
    if name == "local":
        return Dispatcher(local_dispatch, local_combine)
    raise ValueError(f"moe.dispatch: expected one of {DISPATCHERS}, got {name!r}")


def get_grouped_matmul(name: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    if name == "xla":
        return xla_grouped_matmul
    if name == "fp8":
        return fp8_grouped_matmul
    raise ValueError(f"moe.grouped_matmul: expected one of {GROUPED_MATMULS}, got {name!r}")
