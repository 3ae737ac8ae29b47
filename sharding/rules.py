"""Logical axis names -> mesh axes: the one table that decides how parameters, optimizer moments and
activations are laid out over the ``(pp, dp, ep)`` mesh.

Parameters name their dimensions (``logical_axes`` metadata, e.g. ("layers", "experts", "embed",
"expert_mlp") for a stack of expert weights); activations are named where they matter (``constrain``).
A rule set maps names to mesh axes, separately for parameters, for the optimizer's moments and for
activations:

| rule set   | parameters            | optimizer moments                      | activations        |
| ---------- | --------------------- | -------------------------------------- | ------------------ |
| dp         | replicated            | replicated                             | batch over dp x ep |
| zero1      | replicated            | first divisible named dim over dp      | batch over dp x ep |
| ep         | experts over ep       | experts over ep                        | batch over dp x ep |
| ep+zero1   | experts over ep       | experts over ep, the rest as zero1     | batch over dp x ep |

ZeRO-1 is DeepSeek-V3's choice: each data-parallel rank keeps 1/dp of the moments and the partitioner
all-gathers the updated parameters. A dimension is sharded only when its size divides evenly and its
mesh axis is still free in that array; otherwise it stays replicated (so a rule set fits any model).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import types
from typing import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...]

ZERO1_MOMENTS = types.MappingProxyType({name: "dp" for name in (
    "vocab", "embed", "mlp", "expert_mlp", "heads", "q_lora", "kv_lora", "kv_latent", "mtp_concat", "router",
    "norm")})
BATCH_OVER_DATA = types.MappingProxyType({"batch": ("dp", "ep")})
EXPERTS_OVER_EP = types.MappingProxyType({"experts": "ep"})
# Stacked layers over pipeline ranks: each pp rank keeps the slice of a layer stack its stages compute (a
# stack whose layer count pp does not divide, e.g. one dense block, stays whole).
LAYERS_OVER_PP = types.MappingProxyType({"layers": "pp"})


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How each logical axis maps to mesh axes, for parameters, optimizer moments and activations."""

    name: str
    params: Mapping[str, MeshAxes]
    moments: Mapping[str, MeshAxes]
    activations: Mapping[str, MeshAxes]


RULE_SETS = types.MappingProxyType({
    "dp": ShardingRules("dp", LAYERS_OVER_PP, LAYERS_OVER_PP, BATCH_OVER_DATA),
    "zero1": ShardingRules("zero1", LAYERS_OVER_PP, {**LAYERS_OVER_PP, **ZERO1_MOMENTS}, BATCH_OVER_DATA),
    "ep": ShardingRules("ep", {**LAYERS_OVER_PP, **EXPERTS_OVER_EP}, {**LAYERS_OVER_PP, **EXPERTS_OVER_EP},
                        {**BATCH_OVER_DATA, **EXPERTS_OVER_EP}),
    "ep+zero1": ShardingRules("ep+zero1", {**LAYERS_OVER_PP, **EXPERTS_OVER_EP},
                              {**LAYERS_OVER_PP, **EXPERTS_OVER_EP, **ZERO1_MOMENTS},
                              {**BATCH_OVER_DATA, **EXPERTS_OVER_EP}),
})


def get_rules(name: str) -> ShardingRules:
    if name not in RULE_SETS:
        raise ValueError(f"rules: expected one of {sorted(RULE_SETS)}, got {name!r}")
    return RULE_SETS[name]


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def partition_spec(logical_axes: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, MeshAxes],
                   mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """The mesh layout of one array.

    Args:
      logical_axes: a name (or None) per dimension.
      shape: the array's shape (a dimension is split only if the mesh axes' size divides it).
      rules: logical name -> mesh axis or axes.
      mesh_shape: mesh axis name -> size.
    Returns:
      a PartitionSpec; each mesh axis is used at most once, by the first dimension that can take it.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical_axes: {tuple(logical_axes)} names {len(logical_axes)} dimensions, the array has "
                         f"shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        axes = tuple(a for a in _as_tuple(rules.get(name, ())) if mesh_shape.get(a, 1) > 1) if name else ()
        ways = math.prod(mesh_shape[a] for a in axes)
        if axes and not used & set(axes) and size % ways == 0:
            used |= set(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def shard_count(spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> int:
    """How many pieces an array with this spec is split into (each device holds 1/count of it)."""
    return math.prod(mesh_shape[a] for entry in spec if entry is not None for a in _as_tuple(entry))


# The ambient activation layout: set by ``activation_sharding`` around the code a jit traces, read by
# ``constrain``. Outside such a block ``constrain`` does nothing, so the model runs unchanged anywhere.
_ACTIVATION_LAYOUT: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar(
    "jaxseek_activation_layout", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: ShardingRules) -> Iterator[None]:
    """Within this block, ``constrain`` pins named activations to ``mesh`` by ``rules.activations``."""
    token = _ACTIVATION_LAYOUT.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def activation_layout() -> tuple[Mesh, str] | None:
    """The ambient (mesh, rule-set name), or None outside ``activation_sharding``. jax caches the trace of a
    function by its identity, so code that caches traced functions (``jaxseek.model.stack``) must key them
    on this too, or a trace made under one layout would be reused under another."""
    layout = _ACTIVATION_LAYOUT.get()
    return None if layout is None else (layout[0], layout[1].name)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint from its logical axis names (a no-op outside ``activation_sharding``)."""
    layout = _ACTIVATION_LAYOUT.get()
    if layout is None:
        return x
    mesh, rules = layout
    spec = partition_spec(logical_axes, x.shape, rules.activations, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
