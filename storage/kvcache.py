"""``ThreeFSPrefixStore``: MLA KV-cache pages kept on 3FS (or any storage location), keyed by a hash chain.

A prompt's rows are stored per 64-token block, one object per block holding that block's rows for every
layer. Block i's key is ``H(key of block i-1, tokens of block i)`` from a root seeded by the cache
fingerprint (``jaxseek.generate.cache_fingerprint``: weights + row format), so a key names a block *and
everything before it*, as 3FS's KVCache does: the same 64 tokens after another prefix, or under another
model, are another key. A lookup walks the chain and stops at the first block that is missing, corrupt
or foreign; a corrupt one is removed.

Layout under the location's directory (``blocks/``)::

    KEY.kvb        a block: MAGIC | u32 header length | JSON header | rows | u32 CRC32C of all before it
    KEY.use        an empty file: the block's last use is its mtime; replaced (by rename) on every hit
    .KEY.UUID.tmp  a block being written; published by an atomic rename to KEY.kvb

The header records the format version, the fingerprint, the block's key and depth, and the rows' dtype
and shape ``[num_layers, 64, row_bytes]``; rows are the generator's packed rows (FP8 pages as their
656-byte FlashMLA rows: e4m3 values, float32 scales, bf16 RoPE), stored and returned bit for bit.

Capacity and LRU: the store keeps the total size of ``*.kvb`` under ``capacity_bytes``. Each process
tracks an estimate (a scan of ``blocks/`` on its first store, plus what it wrote); when a store takes it
over capacity, the process scans the directory again and removes the least recently used blocks (last use
= the newer of the block's and its ``.use`` file's mtime) until the total is at most ``low_water *
capacity_bytes``. A chain is touched deepest block first, so within a chain the deepest block is the
oldest and is evicted first: a prefix is never dropped before its extensions. Several processes may share
one location with no lock: writes are atomic renames, and a block evicted (or being removed) while
another process reads it reads as a miss (missing file, short read or CRC mismatch), never as rows. With
several writers the bound is kept at each writer's scans: between them it can be exceeded by what the
others wrote since.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid
from typing import NamedTuple

import numpy as np

from storage.location import Location, open_location
from storage.threefs.storage.crc32c import crc32c

BLOCK_TOKENS = 64  # FlashMLA's page size: one block object per page of tokens
FORMAT_VERSION = 1
MAGIC = b"JXKVBLK1"
STALE_TEMP_SECONDS = 600.0  # a temporary file this old was left by a crashed writer


def chain_keys(fingerprint: str, tokens, block_tokens: int = BLOCK_TOKENS) -> list[str]:
    """The sha256 hex keys of ``tokens``' whole blocks: key[i] = H(key[i-1], tokens of block i), key[-1] =
    H(format version, fingerprint)."""
    tokens = np.asarray(tokens, np.int64)
    key = hashlib.sha256(f"jaxseek-kvcache/{FORMAT_VERSION}/{fingerprint}".encode()).digest()
    keys = []
    for start in range(0, len(tokens) // block_tokens * block_tokens, block_tokens):
        key = hashlib.sha256(key + tokens[start:start + block_tokens].astype("<i8").tobytes()).digest()
        keys.append(key.hex())
    return keys


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16, float8_*: numpy knows them only through ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))


def encode_block(fingerprint: str, key: str, depth: int, rows: np.ndarray) -> bytes:
    """One block object: rows [num_layers, 64, row_width] any dtype, with its header and CRC32C."""
    header = json.dumps({"version": FORMAT_VERSION, "fingerprint": fingerprint, "key": key, "depth": depth,
                         "dtype": rows.dtype.name, "shape": list(rows.shape)}).encode()
    body = MAGIC + struct.pack("<I", len(header)) + header + np.ascontiguousarray(rows).tobytes()
    return body + struct.pack("<I", crc32c(body))


class CorruptBlock(ValueError):
    """A block object that fails its checks (bad magic, header, length or CRC32C)."""


def decode_block(data: bytes, path: str) -> tuple[dict, np.ndarray]:
    """(header, rows) of a block object; raises ``CorruptBlock`` naming ``path`` when any check fails."""
    prefix = len(MAGIC) + 4
    if len(data) < prefix + 4 or data[:len(MAGIC)] != MAGIC:
        raise CorruptBlock(f"{path}: not a KV-cache block ({len(data)} bytes, no {MAGIC!r} magic)")
    if crc32c(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise CorruptBlock(f"{path}: CRC32C mismatch (a torn, truncated or damaged block)")
    (header_len,) = struct.unpack("<I", data[len(MAGIC):prefix])
    try:
        header = json.loads(data[prefix:prefix + header_len])
        dtype, shape = _dtype(header["dtype"]), tuple(header["shape"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptBlock(f"{path}: unreadable header ({error})") from None
    payload = memoryview(data)[prefix + header_len:-4]
    if len(shape) != 3 or int(np.prod(shape)) * dtype.itemsize != len(payload):
        raise CorruptBlock(f"{path}: header shape {shape} {dtype} does not match the {len(payload)} payload bytes")
    return header, np.frombuffer(payload, dtype).reshape(shape)


class BlockEntry(NamedTuple):
    """One stored block as a scan sees it."""

    key: str
    size: int  # bytes of its object
    last_use: float  # seconds since the epoch: the newer of the block's and its .use file's mtime


class ThreeFSPrefixStore:
    """A ``jaxseek.kv_cache.PrefixStore`` on a storage location (see the module docstring).

    Args:
      location: a ``storage.location.Location`` (the store uses ``blocks/`` under it and does not close it)
        or a URL for ``open_location`` (opened with ``create=True``; closed by ``close``).
      capacity_bytes: the bound on the blocks' total size.
      fingerprint: the cache fingerprint of the model and row format whose rows this store keeps
        (``jaxseek.generate.cache_fingerprint``); blocks of other fingerprints never match.
      low_water: an eviction frees space down to ``low_water * capacity_bytes`` (in (0, 1]).
      block_tokens: tokens per block (64, the page size; tests may use others).
    """

    def __init__(self, location: Location | str, *, capacity_bytes: int, fingerprint: str,
                 low_water: float = 0.9, block_tokens: int = BLOCK_TOKENS):
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes: expected a positive int, got {capacity_bytes!r}")
        if not 0 < low_water <= 1:
            raise ValueError(f"low_water: expected a fraction in (0, 1], got {low_water!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint: expected a non-empty str, got {fingerprint!r}")
        self._owned = not isinstance(location, Location)
        self.location = open_location(location, create=True) if self._owned else location
        self.capacity_bytes, self.fingerprint, self.low_water = capacity_bytes, fingerprint, low_water
        self.block_tokens = block_tokens
        self.directory = self.location.join("blocks")
        try:
            self.location.client.makedirs(self.directory, exist_ok=True)
        except BaseException:
            self.close()
            raise
        self._usage: int | None = None  # this process's estimate of the blocks' total size; None: not scanned

    @property
    def client(self):
        return self.location.client

    def block_path(self, key: str) -> str:
        return f"{self.directory}/{key}.kvb"

    def _use_path(self, key: str) -> str:
        return f"{self.directory}/{key}.use"

    # -- lookup ---------------------------------------------------------------------------------------

    def lookup(self, tokens) -> tuple[int, np.ndarray | None]:
        """(n, rows [num_layers, n, row_width]) for the longest stored whole-block prefix of ``tokens``."""
        keys = chain_keys(self.fingerprint, tokens, self.block_tokens)
        blocks: list[np.ndarray] = []
        for depth, key in enumerate(keys):
            rows = self._read_block(key, depth, blocks[0] if blocks else None)
            if rows is None:
                break
            blocks.append(rows)
        if not blocks:
            return 0, None
        self._touch(keys[:len(blocks)])
        return len(blocks) * self.block_tokens, np.concatenate(blocks, axis=1)

    def _read_block(self, key: str, depth: int, first: np.ndarray | None) -> np.ndarray | None:
        """The rows of block ``key``, or None if it is missing, corrupt (then removed) or not this chain's."""
        path = self.block_path(key)
        try:
            inode = self.client.stat(path).inode_id
            with self.client.open(path, "rb") as file:
                data = file.read()
        except OSError:  # missing, or removed under us (eviction by another process): a miss
            return None
        try:
            header, rows = decode_block(data, path)
        except CorruptBlock:
            self._remove_if_same(path, inode)
            return None
        expected_shape = (rows.shape[0], self.block_tokens, rows.shape[2]) if first is None else first.shape
        if (header.get("version") != FORMAT_VERSION or header.get("fingerprint") != self.fingerprint
                or header.get("key") != key or header.get("depth") != depth or rows.shape != expected_shape
                or (first is not None and rows.dtype != first.dtype)):
            return None  # foreign: another model's or format's block (left for its owner)
        return rows

    def _remove_if_same(self, path: str, inode: int) -> None:
        """Removes ``path`` if it is still the file that was read (not a good block renamed over it since)."""
        try:
            if self.client.stat(path).inode_id == inode:
                self.client.remove(path)
        except OSError:
            pass

    def _touch(self, keys: list[str]) -> None:
        """Marks a chain's blocks used now, deepest first (so a prefix is always newer than its extensions)."""
        for key in reversed(keys):  # a new empty file renamed over the old: metadata only, no chunks to free
            temp = f"{self.directory}/.{key}.{uuid.uuid4().hex}.tmp"
            try:
                self.client.open(temp, "wb").close()
                self.client.rename(temp, self._use_path(key), replace=True)
            except FileNotFoundError:  # the store's directory was removed: there is no use left to record
                return

    # -- store ----------------------------------------------------------------------------------------

    def store(self, tokens, rows: np.ndarray) -> None:
        """Keeps rows [num_layers, >= whole blocks of tokens, row_width] for ``tokens``' whole blocks: writes
        the blocks not stored yet (each atomically), marks the others used, then evicts if over capacity."""
        keys = chain_keys(self.fingerprint, tokens, self.block_tokens)
        if rows.ndim != 3 or rows.shape[1] < len(keys) * self.block_tokens:
            raise ValueError(f"rows: expected [num_layers, >= {len(keys) * self.block_tokens}, row_width] for "
                             f"{len(tokens)} tokens, got {rows.shape}")
        if self._usage is None:
            self._usage = sum(entry.size for entry in self.scan())
        written = 0
        for depth in reversed(range(len(keys))):  # deepest first: a prefix's blocks end up the newest
            key = keys[depth]
            if self.client.exists(self.block_path(key)):
                self._touch([key])
                continue
            block = rows[:, depth * self.block_tokens:(depth + 1) * self.block_tokens]
            written += self._publish(key, encode_block(self.fingerprint, key, depth, block))
        self._usage += written
        if self._usage > self.capacity_bytes:
            self.evict(int(self.low_water * self.capacity_bytes))

    def _publish(self, key: str, data: bytes) -> int:
        """Writes a block under a temporary name and renames it into place; returns its size."""
        temp = f"{self.directory}/.{key}.{uuid.uuid4().hex}.tmp"
        try:
            with self.client.open(temp, "wb") as file:
                file.write(data)
            self.client.rename(temp, self.block_path(key), replace=True)
        except BaseException:
            try:
                self.client.remove(temp)
            except OSError:
                pass
            raise
        return len(data)  # a leftover .use of an earlier copy is older than this block: no effect on its age

    # -- capacity -------------------------------------------------------------------------------------

    def scan(self) -> list[BlockEntry]:
        """Every stored block, least recently used first; removes stale temporary files and orphan .use files."""
        names = self.client.listdir(self.directory)
        blocks = {name[:-4] for name in names if name.endswith(".kvb")}
        entries, now = [], time.time()
        for name in names:
            path = f"{self.directory}/{name}"
            try:
                if name.endswith(".tmp"):
                    if now - self.client.stat(path).mtime > STALE_TEMP_SECONDS:
                        self.client.remove(path)
                elif name.endswith(".use") and name[:-4] not in blocks:
                    self.client.remove(path)
                elif name.endswith(".kvb"):
                    stat = self.client.stat(path)
                    last_use = stat.mtime
                    if f"{name[:-4]}.use" in names:
                        last_use = max(last_use, self.client.stat(self._use_path(name[:-4])).mtime)
                    entries.append(BlockEntry(name[:-4], stat.size, last_use))
            except OSError:
                continue  # removed by another process while we looked
        return sorted(entries, key=lambda entry: entry.last_use)

    def evict(self, target_bytes: int) -> list[str]:
        """Removes least recently used blocks until the total is at most ``target_bytes``; returns their keys."""
        entries = self.scan()
        usage = sum(entry.size for entry in entries)
        evicted = []
        for entry in entries:
            if usage <= target_bytes:
                break
            for path in (self.block_path(entry.key), self._use_path(entry.key)):
                try:
                    self.client.remove(path)
                except OSError:
                    pass
            usage -= entry.size
            evicted.append(entry.key)
        self._usage = usage
        return evicted

    def usage_bytes(self) -> int:
        """The blocks' total size now (a scan)."""
        return sum(entry.size for entry in self.scan())

    def close(self) -> None:
        """Closes the location if the store opened it from a URL."""
        if self._owned:
            self.location.close()

    def __enter__(self) -> "ThreeFSPrefixStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
