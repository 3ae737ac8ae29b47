"""The training state, its optimizer, and its layout over a device mesh.

``init_train_state`` builds the model and the optimizer state inside ``jit`` with the output shardings
the rule set gives (``sharding.rules``), so no device ever holds more than its shard: expert weights and
their moments split over ``ep`` under "ep", moments split over ``dp`` under "zero1". The layout is
computed from abstract shapes (``nnx.eval_shape``), so it costs nothing for the 671B preset, and
``bytes_per_device`` reports what each device would hold.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxseek.config import ModelConfig, TrainConfig
from jaxseek.model.transformer import Transformer
from sharding.rules import ShardingRules, get_rules, partition_spec, shard_count


class TrainState(NamedTuple):
    step: jax.Array  # [] int32, optimizer steps taken
    params: Any  # nnx.State of nnx.Param (fp32 master weights)
    model_state: Any  # nnx.State of everything else (the experts' load-balancing bias, EPLB placements)
    opt_state: Any  # optax state (AdamW moments mirror params)
    load_average: jax.Array  # [moe_layers, experts] float32, exponential average of tokens per expert


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Learning rate of optimizer step ``count`` (0-based): linear warmup reaching ``learning_rate`` at
    step ``warmup_steps - 1`` (step 0 already moves by lr / warmup_steps), then cosine decay to
    ``final_lr_fraction`` of it at the last step."""
    warmup = max(tc.warmup_steps, 1)
    base = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, tc.steps,
                                              end_value=tc.learning_rate * tc.final_lr_fraction)
    return lambda count: base(count + 1)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the schedule; weight decay skips vectors (norm scales). Gradient clipping happens in the
    step, where replicas of an expert count once (``train_step``)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.adamw(learning_rate_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay,
                       mask=decay_mask)


def state_from_model(model: Transformer, tc: TrainConfig) -> TrainState:
    """A step-0 training state around ``model``'s parameters (fresh optimizer moments, no load history)."""
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    moe_layers = sum(layer.expert_bias.shape[0] for layer in model.moe_layers())
    load_average = jnp.zeros((moe_layers, model.config.moe.num_routed_experts), jnp.float32)
    return TrainState(jnp.zeros((), jnp.int32), params, model_state, make_optimizer(tc).init(params), load_average)


def _build(mc: ModelConfig, tc: TrainConfig) -> TrainState:
    return state_from_model(Transformer(mc, rngs=nnx.Rngs(tc.seed)), tc)


@functools.lru_cache(maxsize=8)  # init, the step, restore targets and reports all ask for the same configs
def abstract_train_state(mc: ModelConfig, tc: TrainConfig) -> tuple[nnx.GraphDef, TrainState]:
    """(graph definition, TrainState of ShapeDtypeStructs with the parameters' logical-axes metadata);
    traced once per (frozen, hashable) pair of configs."""
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(tc.seed))), nnx.Param, ...)[0]
    return graphdef, jax.eval_shape(lambda: _build(mc, tc))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _specs(tree, rules: Mapping, mesh_shape: Mapping[str, int]):
    """A PartitionSpec for every Variable (by its logical axes) and replicated for every other array."""
    def spec(leaf):
        axes = leaf.get_metadata("logical_axes") if _is_variable(leaf) and leaf.has_metadata("logical_axes") else None
        return partition_spec(axes, leaf.shape, rules, mesh_shape) if axes is not None else PartitionSpec()
    return jax.tree.map(spec, tree, is_leaf=_is_variable)


def state_partition_specs(abstract: TrainState, rules: ShardingRules, mesh_shape: Mapping[str, int]) -> TrainState:
    """A PartitionSpec tree (a prefix of the state's tree) laying the state out by ``rules``."""
    replicated = lambda tree: jax.tree.map(lambda _: PartitionSpec(), tree, is_leaf=_is_variable)  # noqa: E731
    return TrainState(step=PartitionSpec(), params=_specs(abstract.params, rules.params, mesh_shape),
                      model_state=replicated(abstract.model_state),
                      opt_state=_specs(abstract.opt_state, rules.moments, mesh_shape),
                      load_average=PartitionSpec())


def _named(specs, mesh: Mesh):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(abstract: TrainState, mesh: Mesh, rules: ShardingRules) -> TrainState:
    return _named(state_partition_specs(abstract, rules, dict(mesh.shape)), mesh)


def model_shardings(state, mesh: Mesh, rules: ShardingRules):
    """NamedShardings for a model's ``nnx.State`` (parameters and other variables) by ``rules.params``."""
    return _named(_specs(state, rules.params, dict(mesh.shape)), mesh)


def sharded_abstract_state(mc: ModelConfig, tc: TrainConfig, mesh: Mesh, rules: str = "dp") -> TrainState:
    """The state's ShapeDtypeStructs carrying the rule set's shardings: a restore target that needs no
    initialisation."""
    abstract = abstract_train_state(mc, tc)[1]
    shardings = state_shardings(abstract, mesh, get_rules(rules))
    return jax.tree.map(lambda sharding, subtree: jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), subtree),
        shardings, abstract, is_leaf=lambda x: isinstance(x, NamedSharding))


def init_train_state(mc: ModelConfig, tc: TrainConfig, mesh: Mesh | None = None, rules: str = "dp"
                     ) -> tuple[nnx.GraphDef, TrainState]:
    """Builds the model from ``tc.seed`` and returns (graph definition, initial state).

    With a ``mesh``, the state is created inside ``jit`` directly in the layout of the rule set ``rules``
    ("dp", "zero1", "ep", "ep+zero1"): no device materialises more than its shard. Without one, on the
    default device.
    """
    graphdef, _ = abstract_train_state(mc, tc)
    return graphdef, state_initializer(mc, tc, mesh, rules)()


def state_initializer(mc: ModelConfig, tc: TrainConfig, mesh: Mesh | None = None, rules: str = "dp"):
    """The jitted ``() -> TrainState`` that ``init_train_state`` runs (its outputs in the rule set's layout)."""
    if mesh is None:
        return jax.jit(lambda: _build(mc, tc))
    shardings = state_shardings(abstract_train_state(mc, tc)[1], mesh, get_rules(rules))
    return jax.jit(lambda: _build(mc, tc), out_shardings=shardings)


class DeviceBytes(NamedTuple):
    params: int  # bytes of parameters one device holds
    optimizer: int  # bytes of optimizer state one device holds
    params_total: int
    optimizer_total: int


def bytes_per_device(abstract: TrainState, rules: ShardingRules, mesh_shape: Mapping[str, int]) -> DeviceBytes:
    """What each device of a mesh of ``mesh_shape`` holds of the parameters and the optimizer state."""
    specs = state_partition_specs(abstract, rules, mesh_shape)

    def held(tree, spec_tree) -> tuple[int, int]:
        leaves = jax.tree.leaves(tree)
        spec_leaves = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
        total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
        return sum(leaf.size * leaf.dtype.itemsize // shard_count(spec, mesh_shape)
                   for leaf, spec in zip(leaves, spec_leaves)), total

    params, params_total = held(abstract.params, specs.params)
    optimizer, optimizer_total = held(abstract.opt_state, specs.opt_state)
    return DeviceBytes(params, optimizer, params_total, optimizer_total)
