"""The on-storage format of one checkpoint: what each file holds, and how a reader checks it.

A committed checkpoint is a directory::

    manifest.json          the tree: every leaf's path, kind, dtype and global shape (written last, by
                           process 0), the block size of the checksums, and each shard index's CRC32C
    shards-PPPPP.json      process P's shards: leaf, index box, data file, byte range, a CRC32C per block
    data-PPPPP.bin         process P's shard bytes, C order, one shard after another

Each JSON file is its canonical JSON body followed by a ``crc32c XXXXXXXX`` line over the body, so a
damaged index is found as surely as a damaged shard. Shard bytes carry one CRC32C per ``block_size``
bytes (counted from the shard's start), so a reader that needs only part of a shard (a restore onto
another sharding) verifies exactly the blocks it reads. Every integrity failure raises
``CheckpointCorruptionError`` (an ``OSError``, errno EIO) whose ``filename`` is the damaged file.

Boxes: a shard's place in its array is a ``Box``, one ``(start, stop)`` pair per dimension (``()`` for a
scalar), the same thing as a ``jax.Array`` shard's ``index`` with the slices resolved.
"""

from __future__ import annotations

import errno
import json
from typing import Any, NamedTuple

import ml_dtypes  # noqa: F401 - registers bfloat16, float8_* with numpy, so np.dtype(name) finds them
import numpy as np

from storage.threefs.storage.crc32c import crc32c

FORMAT = "jaxseek-3fs-checkpoint/1"
MANIFEST = "manifest.json"
DEFAULT_BLOCK_SIZE = 1 << 20  # bytes per CRC32C; 3FS's default chunk size

Box = tuple[tuple[int, int], ...]


class CheckpointCorruptionError(OSError):
    """A checkpoint file's bytes do not match their checksum (or the file is cut short or unreadable as
    the format): errno EIO, ``filename`` = the client path of the file."""

    def __init__(self, path: str, what: str):
        super().__init__(errno.EIO, f"checkpoint corrupted: {what}", path)


def shard_file(kind: str, process: int) -> str:
    """``data-00003.bin`` / ``shards-00003.json``: a process's data file or shard index."""
    return f"{kind}-{process:05d}." + ("bin" if kind == "data" else "json")


class LeafEntry(NamedTuple):
    """One leaf of the saved tree.

    path: ``jax.tree_util.keystr`` of its key path (how a restore target is matched); keys: the key path
    as ``[kind, key]`` pairs (``"key"`` dict key, ``"index"`` sequence index, ``"attr"`` attribute), to
    rebuild nested dicts without a target. kind: ``"jax"`` (a ``jax.Array``), ``"numpy"`` (a numpy array
    or scalar) or ``"scalar"`` (a Python bool/int/float, kept in ``value``). dtype: numpy's name
    (``"bfloat16"``, ``"int32"``; the Python type's name for a scalar). shape: the global shape.
    """

    path: str
    keys: tuple[tuple[str, Any], ...]
    kind: str
    dtype: str
    shape: tuple[int, ...]
    value: Any = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize if self.kind != "scalar" else 0


class ShardEntry(NamedTuple):
    """One saved shard: ``leaf`` (index into the manifest's leaves), ``box`` (its place in the array),
    ``file`` (a data file name in the checkpoint directory), ``offset``/``nbytes`` (its byte range there),
    ``crc32c`` (one CRC32C per block of the shard's bytes, the last block possibly short)."""

    leaf: int
    box: Box
    file: str
    offset: int
    nbytes: int
    crc32c: tuple[int, ...]


class Manifest(NamedTuple):
    """What ``manifest.json`` holds: the leaves, the CRC block size, and ``shard_indexes``: name -> CRC32C
    of every ``shards-*.json`` (one per process that saved)."""

    leaves: tuple[LeafEntry, ...]
    block_size: int
    shard_indexes: dict[str, int]


def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """The box of a ``jax.Array`` shard index (slices with ``None`` ends) in an array of ``shape``."""
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape)) + tuple(
        (0, n) for n in shape[len(index):])


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes of one array, or None when they share no element."""
    both = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return None if any(start >= stop for start, stop in both) else both


def encode_json(body: dict) -> bytes:
    """A JSON body with its CRC32C line (see the module docstring)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return text + b"\ncrc32c %08x\n" % crc32c(text)


def decode_json(data: bytes, path: str) -> dict:
    """The body of an ``encode_json`` file; ``CheckpointCorruptionError`` naming ``path`` if it is damaged."""
    text, _, trailer = data.rstrip(b"\n").rpartition(b"\n")
    if not trailer.startswith(b"crc32c ") or len(trailer) != 15:
        raise CheckpointCorruptionError(path, "no checksum line (cut short or not a checkpoint file)")
    if int(trailer[7:], 16) != crc32c(text):
        raise CheckpointCorruptionError(path, "CRC32C mismatch in the JSON body")
    return json.loads(text)


def manifest_body(manifest: Manifest) -> dict:
    return {"format": FORMAT, "block_size": manifest.block_size, "shard_indexes": manifest.shard_indexes,
            "leaves": [{"path": leaf.path, "keys": [list(k) for k in leaf.keys], "kind": leaf.kind,
                        "dtype": leaf.dtype, "shape": list(leaf.shape), "value": leaf.value}
                       for leaf in manifest.leaves]}


def manifest_from_body(body: dict, path: str) -> Manifest:
    if body.get("format") != FORMAT:
        raise CheckpointCorruptionError(path, f"format {body.get('format')!r}, expected {FORMAT!r}")
    leaves = tuple(LeafEntry(leaf["path"], tuple((kind, key) for kind, key in leaf["keys"]), leaf["kind"],
                             leaf["dtype"], tuple(leaf["shape"]), leaf["value"]) for leaf in body["leaves"])
    return Manifest(leaves, int(body["block_size"]), dict(body["shard_indexes"]))


def shards_body(shards: list[ShardEntry]) -> dict:
    return {"format": FORMAT, "shards": [{"leaf": s.leaf, "box": [list(b) for b in s.box], "file": s.file,
                                          "offset": s.offset, "nbytes": s.nbytes, "crc32c": list(s.crc32c)}
                                         for s in shards]}


def shards_from_body(body: dict, path: str) -> list[ShardEntry]:
    if body.get("format") != FORMAT:
        raise CheckpointCorruptionError(path, f"format {body.get('format')!r}, expected {FORMAT!r}")
    return [ShardEntry(s["leaf"], tuple((int(a), int(b)) for a, b in s["box"]), s["file"], int(s["offset"]),
                       int(s["nbytes"]), tuple(s["crc32c"])) for s in body["shards"]]


def block_crcs(data: memoryview, block_size: int) -> tuple[int, ...]:
    """One CRC32C per ``block_size`` bytes of ``data`` (``[n] uint8``, C-contiguous)."""
    return tuple(crc32c(data[start:start + block_size]) for start in range(0, len(data), block_size))
