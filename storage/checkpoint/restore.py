"""Restoring: the manifest and shard indexes, then only the saved byte ranges each target shard overlaps.

For every leaf the target asks for, each distinct addressable shard of the target's sharding (a *region*
of the global array) is filled from the saved shards it overlaps. Saved shards are C order, so the
overlap's rows along the saved shard's first axis are one contiguous byte range; that range, widened to
whole checksum blocks, is read with one positional read and every block in it is verified before its
bytes are used. A region that is exactly one saved shard (restoring onto the sharding it was saved with)
is read straight into its buffer, 64-byte aligned, which XLA:CPU adopts as the device buffer without a
copy (a replicated region is copied for its second and later devices, so no two devices share memory).
Reads run on a thread pool (each fans out over chunks in the client).
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from typing import Any, NamedTuple

import jax
import numpy as np

from storage.checkpoint.manifest import (MANIFEST, Box, CheckpointCorruptionError, LeafEntry, Manifest,
                                         ShardEntry, box_of, box_shape, decode_json, manifest_from_body,
                                         overlap, shards_from_body)
from storage.checkpoint.tree import SCALAR_TYPES, nested
from storage.threefs.client.file_api import File, FileClient
from storage.threefs.storage.crc32c import crc32c


def _read_file(client: FileClient, path: str) -> bytes:
    with client.open(path, "rb") as file:
        return file.read()


def read_manifest(client: FileClient, directory: str) -> tuple[Manifest, list[ShardEntry]]:
    """The manifest and every process's shard entries, each index checked against the manifest's CRC."""
    path = f"{directory}/{MANIFEST}"
    manifest = manifest_from_body(decode_json(_read_file(client, path), path), path)
    shards = []
    for name, expected in sorted(manifest.shard_indexes.items()):
        index_path = f"{directory}/{name}"
        data = _read_file(client, index_path)
        if crc32c(data) != expected:
            raise CheckpointCorruptionError(index_path, "CRC32C differs from the one in the manifest")
        shards += shards_from_body(decode_json(data, index_path), index_path)
    return manifest, shards


ALIGN = 64  # XLA:CPU adopts a host buffer this aligned without a copy


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting at a multiple of ``ALIGN`` bytes."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _Region(NamedTuple):
    leaf: int
    box: Box
    buffer: np.ndarray  # [box shape] saved dtype


class _OpenFiles:
    """Data files opened on first use and shared by the reading threads."""

    def __init__(self, client: FileClient, directory: str):
        self._client, self._directory = client, directory
        self._files: dict[str, File] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> File:
        with self._lock:
            if name not in self._files:
                self._files[name] = self._client.open(f"{self._directory}/{name}", "rb")
            return self._files[name]

    def close(self) -> None:
        for file in self._files.values():
            file.close()


def _fill(files: _OpenFiles, directory: str, region: _Region, shard: ShardEntry, part: Box, dtype: np.dtype,
          block_size: int) -> None:
    """Copies ``part`` (a box inside both ``region`` and ``shard``) from the shard's bytes into the region."""
    saved_shape = box_shape(shard.box)
    local = [(a - s, b - s) for (a, b), (s, _) in zip(part, shard.box)]
    row_bytes = int(np.prod(saved_shape[1:], dtype=np.int64)) * dtype.itemsize
    low, high = (local[0][0] * row_bytes, local[0][1] * row_bytes) if local else (0, dtype.itemsize)
    read_low, read_high = low // block_size * block_size, min(-(-high // block_size) * block_size, shard.nbytes)
    direct = part == shard.box == region.box and region.buffer.flags.c_contiguous
    buffer = region.buffer.reshape(-1).view(np.uint8) if direct else np.empty(read_high - read_low, np.uint8)
    path = f"{directory}/{shard.file}"
    got = files.get(shard.file).pread_into(memoryview(buffer), shard.offset + read_low)
    if got != read_high - read_low:
        raise CheckpointCorruptionError(path, f"cut short: {got} of {read_high - read_low} bytes at "
                                              f"{shard.offset + read_low}")
    view = memoryview(buffer)
    for start in range(read_low, read_high, block_size):
        block, end = start // block_size, min(start + block_size, read_high)
        if crc32c(view[start - read_low:end - read_low]) != shard.crc32c[block]:
            raise CheckpointCorruptionError(path, f"CRC32C mismatch in block {block} (bytes [{shard.offset + start}, "
                                                  f"{shard.offset + end})) of a shard of leaf {shard.leaf} at "
                                                  f"{list(shard.box)}")
    if direct:
        return
    rows = buffer[low - read_low:high - read_low].view(dtype).reshape((local[0][1] - local[0][0],) + saved_shape[1:]
                                                                       if local else ())
    source = rows[(slice(None),) + tuple(slice(a, b) for a, b in local[1:])] if local else rows
    region.buffer[tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(part, region.box))] = source


def read_regions(client: FileClient, directory: str, manifest: Manifest, shards: list[ShardEntry],
                 wanted: list[tuple[int, Box]], pool: Executor) -> dict[tuple[int, Box], np.ndarray]:
    """{(leaf, box): [box shape] saved dtype} for every wanted region, read and verified."""
    by_leaf: dict[int, list[ShardEntry]] = {}
    for shard in shards:
        by_leaf.setdefault(shard.leaf, []).append(shard)
    regions, tasks = {}, []
    for leaf, box in dict.fromkeys(wanted):
        entry = manifest.leaves[leaf]
        region = _Region(leaf, box, aligned_empty(box_shape(box), np.dtype(entry.dtype)))
        covered = 0
        for shard in by_leaf.get(leaf, ()):
            part = overlap(region.box, shard.box) if box else ()
            if part is not None:
                tasks.append((region, shard, part))
                covered += int(np.prod(box_shape(part), dtype=np.int64))
        if covered != region.buffer.size:
            raise CheckpointCorruptionError(f"{directory}/{MANIFEST}", f"the saved shards of {entry.path} cover "
                                            f"{covered} of {region.buffer.size} elements of {list(box)}")
        regions[(leaf, box)] = region.buffer
    files = _OpenFiles(client, directory)
    try:
        futures = [pool.submit(_fill, files, directory, region, shard, part,
                               np.dtype(manifest.leaves[region.leaf].dtype), manifest.block_size)
                   for region, shard, part in tasks]
        for future in futures:
            future.result()
    finally:
        files.close()
    return regions


def _full(entry: LeafEntry) -> Box:
    return tuple((0, n) for n in entry.shape)


def restore_tree(client: FileClient, directory: str, target: Any, pool: Executor) -> Any:
    """The tree saved in ``directory``: with ``target`` None as nested dicts of numpy arrays (scalars as
    saved); else in the target's structure, each leaf like the target's (a ``jax.ShapeDtypeStruct`` or
    ``jax.Array``: a ``jax.Array`` with its sharding (one device if it has none) and dtype; a numpy
    array: numpy; a Python scalar: that type). ValueError names leaves missing on either side or
    restored to another shape."""
    manifest, shards = read_manifest(client, directory)
    index = {entry.path: i for i, entry in enumerate(manifest.leaves)}
    if target is None:
        wanted = [(i, _full(e)) for i, e in enumerate(manifest.leaves) if e.kind != "scalar"]
        regions = read_regions(client, directory, manifest, shards, wanted, pool)
        return nested(list(manifest.leaves), [e.value if e.kind == "scalar" else regions[(i, _full(e))]
                                              for i, e in enumerate(manifest.leaves)])
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    missing, unexpected = sorted(set(names) - set(index)), sorted(set(index) - set(names))
    if missing or unexpected:
        listed = lambda names: ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") or "-"  # noqa: E731
        raise ValueError(f"checkpoint: the target does not match the tree saved in {directory}: "
                         f"not saved: {listed(missing)}; not in the target: {listed(unexpected)}")
    plans, wanted = [], []
    for name, (_, like) in zip(names, flat):
        entry = manifest.leaves[index[name]]
        shape = tuple(getattr(like, "shape", entry.shape))
        if entry.kind != "scalar" and shape != entry.shape:
            raise ValueError(f"checkpoint: {name} was saved with shape {entry.shape}, the target has {shape}")
        sharding = None
        if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(like, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            boxes = list(dict.fromkeys(box_of(idx, shape)
                                       for idx in sharding.addressable_devices_indices_map(shape).values()))
        else:
            boxes = [_full(entry)]
        if entry.kind != "scalar":
            wanted += [(index[name], box) for box in boxes]
        plans.append((entry, index[name], like, sharding))
    regions = read_regions(client, directory, manifest, shards, wanted, pool)
    return jax.tree_util.tree_unflatten(treedef, [_leaf(regions, *plan) for plan in plans])


def _leaf(regions: dict, entry: LeafEntry, leaf: int, like: Any, sharding: Any) -> Any:
    if sharding is not None:
        dtype = like.dtype
        if entry.kind == "scalar":
            return jax.device_put(np.asarray(entry.value, dtype), sharding)
        shape, handed_out = tuple(like.shape), set()

        def region(index) -> np.ndarray:  # a device adopts the aligned buffer; a second device gets a copy
            box = box_of(index, shape)
            array = regions[(leaf, box)].astype(dtype, copy=False)
            first = box not in handed_out
            handed_out.add(box)
            return array if first else array.copy()
        return jax.make_array_from_callback(shape, sharding, region)
    if entry.kind == "scalar":
        return type(like)(entry.value) if type(like) in SCALAR_TYPES.values() else entry.value
    array = regions[(leaf, _full(entry))]
    if isinstance(like, (np.ndarray, np.generic)):
        return array.astype(like.dtype, copy=False)
    return array
