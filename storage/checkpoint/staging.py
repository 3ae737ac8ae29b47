"""Saving, in two halves: ``stage`` copies this process's shards to host memory (synchronously, so the
caller may change or donate its arrays as soon as it returns), ``write_staged`` writes them (any thread).

A process saves the shards it owns: of every ``jax.Array`` leaf, the addressable shards whose
``replica_id`` is 0 (each element of a replicated array is written once, by the process holding its
replica 0); numpy leaves are written by process 0; Python scalars live in the manifest. The staged bytes
sit in one host buffer, each shard at a 64-byte aligned offset, and the process's data file mirrors that
buffer byte for byte, so it is written in large positional writes (``piece_size`` each, aligned to the
start, several in flight on a thread pool; each one fans out over the file's chunks and chains in the 3FS
client) while the CRC32Cs of the shards' blocks are computed on the same pool.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, NamedTuple

import jax
import numpy as np

from storage.checkpoint.manifest import (Box, LeafEntry, ShardEntry, block_crcs, box_of, box_shape, encode_json,
                                         shard_file, shards_body)
from storage.threefs.client.file_api import FileClient

ALIGN = 64
PIECE_SIZE = 8 << 20  # bytes per positional write


class StagedShard(NamedTuple):
    """A shard in the staging buffer: leaf index, box, and ``[offset, offset + nbytes)`` of the buffer."""

    leaf: int
    box: Box
    offset: int
    nbytes: int


class Staged(NamedTuple):
    """One process's part of a save, in host memory.

    entries: every leaf of the tree (the same on every process). shards: what this process writes.
    buffer: ``[>= size] uint8``, the shards' bytes (C order). process: this process's index.
    """

    entries: tuple[LeafEntry, ...]
    shards: tuple[StagedShard, ...]
    buffer: np.ndarray
    size: int
    process: int


def _owned_pieces(entries: list[LeafEntry], leaves: list[Any], process: int) -> list[tuple[int, Box, Any]]:
    pieces = []
    for i, (entry, leaf) in enumerate(zip(entries, leaves)):
        if entry.kind == "jax":
            pieces += [(i, box_of(shard.index, entry.shape), shard.data)
                       for shard in leaf.addressable_shards if shard.replica_id == 0]
        elif entry.kind == "numpy" and process == 0:
            pieces.append((i, tuple((0, n) for n in entry.shape), leaf))
    return pieces


def stage(entries: list[LeafEntry], leaves: list[Any], *, process: int = 0,
          buffer: np.ndarray | None = None) -> Staged:
    """Copies the shards ``process`` owns into host memory (``buffer`` if it is large enough, else a new
    one) and returns them; the arrays are not referenced afterwards."""
    pieces = _owned_pieces(entries, leaves, process)
    for _, _, data in pieces:
        if isinstance(data, jax.Array):
            data.copy_to_host_async()  # every transfer in flight before the first wait
    layout, size = [], 0
    for leaf, box, _ in pieces:
        nbytes = int(np.prod(box_shape(box), dtype=np.int64)) * np.dtype(entries[leaf].dtype).itemsize
        layout.append(StagedShard(leaf, box, size, nbytes))
        size += -(-nbytes // ALIGN) * ALIGN
    if buffer is None or buffer.size < size:
        buffer = np.empty(max(size, 1), np.uint8)
    for shard, (_, _, data) in zip(layout, pieces):
        dtype = np.dtype(entries[shard.leaf].dtype)
        destination = buffer[shard.offset:shard.offset + shard.nbytes].view(dtype).reshape(box_shape(shard.box))
        np.copyto(destination, np.asarray(data), casting="no")
    return Staged(tuple(entries), tuple(layout), buffer, size, process)


def write_staged(client: FileClient, directory: str, staged: Staged, *, block_size: int, pool: Executor,
                 piece_size: int = PIECE_SIZE) -> list[ShardEntry]:
    """Writes ``data-P.bin`` and then ``shards-P.json`` (P = ``staged.process``) into ``directory`` (a
    client path that exists), each fsynced before the next starts; returns the shard entries written."""
    data_name = shard_file("data", staged.process)
    view = memoryview(staged.buffer)
    crc_futures = [pool.submit(block_crcs, view[s.offset:s.offset + s.nbytes], block_size) for s in staged.shards]
    path = f"{directory}/{data_name}"
    with client.open(path, "wb") as file:
        writes = [(start, pool.submit(file.pwrite, view[start:min(start + piece_size, staged.size)], start))
                  for start in range(0, staged.size, piece_size)]
        for start, future in writes:
            written = future.result()
            expected = min(start + piece_size, staged.size) - start
            if written != expected:
                raise OSError(f"checkpoint: short write to {path}: {written} of {expected} bytes at {start}")
        file.fsync()
    entries = [ShardEntry(s.leaf, s.box, data_name, s.offset, s.nbytes, future.result())
               for s, future in zip(staged.shards, crc_futures)]
    with client.open(f"{directory}/{shard_file('shards', staged.process)}", "wb") as file:
        file.write(encode_json(shards_body(entries)))
        file.fsync()
    return entries
