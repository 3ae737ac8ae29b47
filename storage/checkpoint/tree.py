"""Pytrees <-> the manifest's leaves: key paths, leaf kinds, and nested dicts rebuilt without a target.

A saved tree is flattened with ``jax.tree_util.tree_flatten_with_path``; each leaf is named by
``keystr`` of its path. A restore with a target matches the target's leaves to the saved ones by that
name (any pytree: NamedTuples, ``nnx.State``, optax states), so the target supplies the structure.
Without a target the tree is rebuilt from the key paths as nested dicts (sequence indices become
lists), as Orbax does for a restore without an item.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from storage.checkpoint.manifest import LeafEntry

SCALAR_TYPES = {"bool": bool, "int": int, "float": float}


def _key(entry: Any) -> tuple[str, Any]:
    tu = jax.tree_util
    if isinstance(entry, tu.DictKey):
        key = entry.key
        if not isinstance(key, (str, int)):
            raise TypeError(f"checkpoint: dict key {key!r} is neither a str nor an int")
        return ("key", key)
    if isinstance(entry, tu.SequenceKey):
        return ("index", entry.idx)
    if isinstance(entry, tu.GetAttrKey):
        return ("attr", entry.name)
    if isinstance(entry, tu.FlattenedIndexKey):
        return ("index", entry.key)
    raise TypeError(f"checkpoint: unsupported key path entry {entry!r}")


def leaf_entry(path: tuple, leaf: Any) -> LeafEntry:
    """The manifest entry of one leaf (``path``: its key path); TypeError for a leaf that cannot be saved."""
    name = jax.tree_util.keystr(path)
    keys = tuple(_key(entry) for entry in path)
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(f"checkpoint: {name} is a PRNG key array; save jax.random.key_data(key) instead")
        return LeafEntry(name, keys, "jax", np.dtype(leaf.dtype).name, tuple(leaf.shape))
    if isinstance(leaf, (np.ndarray, np.generic)):
        if leaf.dtype.hasobject:
            raise TypeError(f"checkpoint: {name} is an object array")
        return LeafEntry(name, keys, "numpy", leaf.dtype.name, tuple(leaf.shape))
    if type(leaf) in (bool, int, float):
        return LeafEntry(name, keys, "scalar", type(leaf).__name__, (), leaf)
    raise TypeError(f"checkpoint: cannot save leaf {name} of type {type(leaf).__name__} "
                    "(expected a jax.Array, a numpy array or a Python bool/int/float)")


def flatten(item: Any) -> tuple[list[LeafEntry], list[Any]]:
    """(manifest entries, leaves) of a pytree, in flattening order; names must be unique."""
    flat, _ = jax.tree_util.tree_flatten_with_path(item)
    entries = [leaf_entry(path, leaf) for path, leaf in flat]
    names = [entry.path for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError("checkpoint: two leaves have the same key path; give them distinct keys")
    return entries, [leaf for _, leaf in flat]


def nested(entries: list[LeafEntry], values: list[Any]) -> Any:
    """Nested dicts (lists where every key is a sequence index 0..n-1) from the leaves' key paths."""
    if not entries:
        return {}
    root: dict = {}
    for entry, value in zip(entries, values):
        if not entry.keys:
            return value  # the tree is a single leaf
        node = root
        for _, key in entry.keys[:-1]:
            node = node.setdefault(key, {})
        node[entry.keys[-1][1]] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {key: _listify(value) for key, value in node.items()}
    if items and all(isinstance(key, int) for key in items) and sorted(items) == list(range(len(items))):
        return [items[i] for i in range(len(items))]
    return items
