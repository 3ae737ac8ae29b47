"""Layers of one kind stored once with a leading layer axis, and scanned over that axis.

A 61-layer model then compiles one block body per kind instead of 61 copies, and a pipeline stage is
simply a slice of a stack (``BlockStack.slice``). Every parameter's ``logical_axes`` gains a leading
"layers" name, so the sharding rules see the stacked shapes.

``scan_layers`` is ``nnx.scan`` spelled out: split the stacked module once, ``jax.lax.scan`` over its
state, merge one layer's view inside the body. The body is built once per (graph, step, remat) and
reused, so eager calls (a notebook, a test) hit jax's compilation cache instead of re-compiling the scan
on every call, and every layer view lives entirely inside the scan's trace.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
from flax import nnx

from sharding.rules import activation_layout

LAYERS_AXIS = "layers"

# step(layer, carry, x, *static) -> (carry, y): a module-level function, so scan bodies can be reused.
LayerStep = Callable[..., tuple[Any, Any]]


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` independently initialised copies of ``make(rngs)``, stored as one module whose
    arrays have a leading [num_layers] axis."""
    if num_layers < 1:
        raise ValueError(f"num_layers: a stack needs at least one layer, got {num_layers}")

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs):
        return make(rngs)

    layers = build(rngs)
    for _, variable in nnx.iter_graph(layers):
        if isinstance(variable, nnx.Variable) and variable.has_metadata("logical_axes"):
            variable.set_metadata(logical_axes=(LAYERS_AXIS,) + tuple(variable.get_metadata("logical_axes")))
    return layers


def layer_count(layers: nnx.Module) -> int:
    """The leading (layer) dimension of a stacked module."""
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def slice_layers(layers: nnx.Module, start: int, stop: int) -> nnx.Module:
    """Layers [start, stop) of a module whose arrays all have a leading layer axis, as a module of its own."""
    if not 0 <= start < stop <= layer_count(layers):
        raise ValueError(f"start, stop: need 0 <= start < stop <= {layer_count(layers)}, got {start}, {stop}")
    graphdef, state = nnx.split(layers)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[start:stop], state))


@functools.lru_cache(maxsize=64)  # a few (graph, step) pairs per model; keeps eager scans compiled once
def _scan_body(graphdef: nnx.GraphDef, step: LayerStep, remat: bool, static: tuple, layout):
    """``layout`` (``sharding.rules.activation_layout()``) only keys the cache: a body traced with activation
    constraints for one mesh must not be reused without them or on another mesh."""

    def body(carry, layer_and_x):
        layer_state, x = layer_and_x
        return step(nnx.merge(graphdef, layer_state), carry, x, *static)
    return jax.checkpoint(body) if remat else body


def scan_layers(layers: nnx.Module, step: LayerStep, carry, xs=None, *, static: tuple = (), remat: bool = False):
    """Runs ``step(layer, carry, x, *static) -> (carry, y)`` over the leading axis of a stacked module (and of
    ``xs``); returns (final carry, ys stacked on a leading layer axis). ``remat`` recomputes each step in
    the backward pass. The layers are read, never written."""
    graphdef, state = nnx.split(layers)
    return jax.lax.scan(_scan_body(graphdef, step, remat, static, activation_layout()), carry, (state, xs))


def _block_step(block, carry, _, form):
    h, positions = carry
    h, stats = block(h, positions, form=form)
    return (h, positions), stats


class BlockStack(nnx.Module):
    """``num_layers`` transformer blocks of one kind (dense or MoE), scanned over the layer axis.

    ``remat``: "none" keeps every activation for the backward pass; "block" keeps each block's input and
    recomputes the block; "attention" is handled inside the block (it recomputes attention only).
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, rngs: nnx.Rngs,
                 remat: Literal["none", "block", "attention"] = "none"):
        self.layers = stacked(make_block, num_layers, rngs)
        self.remat = remat

    @property
    def num_layers(self) -> int:
        return layer_count(self.layers)

    def __call__(self, h: jax.Array, positions: jax.Array, *, form: str = "expanded"):
        """[batch, seq, hidden], [batch, seq] int32 -> ([batch, seq, hidden], per-layer block outputs stacked on a
        leading [num_layers] axis: MoEStats for MoE blocks, None for dense ones)."""
        (h, _), stats = scan_layers(self.layers, _block_step, (h, positions), static=(form,),
                                    remat=self.remat == "block")
        return h, stats

    def slice(self, start: int, stop: int) -> "BlockStack":
        """Layers [start, stop) as a stack of their own (a pipeline stage)."""
        return slice_layers(self, start, stop)

    def layer(self, index: int) -> nnx.Module:
        """Block ``index`` on its own (no layer axis), e.g. for a per-layer loop over a paged cache."""
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))
