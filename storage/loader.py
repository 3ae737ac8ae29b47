"""Training records on storage: fixed-size records in shard files, a Grain data source with batched reads.

3FS's case for training data is random access: with any record readable at any moment, a global shuffle
needs no shuffle buffer and no pre-shuffled copy. This module keeps ``[n, record_len]`` integer records
(token windows) as a *record set* directory at a ``Location``::

    NAME/index.json          record_len, dtype, per-shard counts, a fingerprint, caller metadata
    NAME/shard-00000.rec     [count, record_len] records, row-major: record r is at r * record_bytes
    NAME/shard-00000.crc     [count] uint32 CRC32C (little-endian) of each record

``write_records`` builds the set in a hidden staging directory and publishes it with one rename
(``storage.publish``): a crash leaves nothing that opens. ``RecordSource`` is a Grain
``RandomAccessDataSource`` (``__len__``, ``__getitem__``, and ``_getitems`` / ``read_many`` for a batch:
the records are grouped per shard, adjacent ones merged, and all reads issued together on one USRBIO
``IoRing`` into one shared-memory ``IoVec``); every record's checksum is verified as it is read.
``record_order`` puts Grain's ``IndexSampler`` (a stateless global shuffle, ``ShardOptions`` per host)
behind ``keys(start, count)``: the record keys at one host's sample positions, a pure function of the
position, so a run resumed at position k continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import google_crc32c
import grain.python as grain
import numpy as np

from storage.location import Location
from storage.publish import staged_directory
from storage.threefs.client.usrbio import IoRing, IoVec

INDEX_FILE = "index.json"
FORMAT = "jaxseek.records/1"
_WRITE_PIECE = 8 << 20


class CorruptRecords(ValueError):
    """A record set whose files disagree with its index or their checksums (the message names the file)."""


class RecordsIndex(NamedTuple):
    """What ``index.json`` holds. fingerprint: sha256 of dtype, record_len and every record's bytes."""

    record_len: int
    dtype: str
    shard_counts: tuple[int, ...]
    fingerprint: str
    metadata: dict[str, Any]

    @property
    def record_bytes(self) -> int:
        return self.record_len * np.dtype(self.dtype).itemsize

    @property
    def num_records(self) -> int:
        return sum(self.shard_counts)

    @property
    def shard_starts(self) -> np.ndarray:
        """[num_shards + 1] int64: the first global record of each shard, then the total."""
        return np.concatenate([[0], np.cumsum(self.shard_counts, dtype=np.int64)])


def shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.rec"


def checksum_file(shard: int) -> str:
    return f"shard-{shard:05d}.crc"


def records_fingerprint(records: np.ndarray) -> str:
    """sha256 hex of a ``[n, record_len]`` array's dtype, record length and bytes."""
    digest = hashlib.sha256(f"{records.dtype.str}:{records.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(records).data)
    return digest.hexdigest()


def _record_checksums(data: np.ndarray) -> np.ndarray:
    """[n] uint32 CRC32C of each row of a [n, record_len] array."""
    return np.fromiter((google_crc32c.value(row.tobytes()) for row in data), dtype="<u4", count=len(data))


def write_records(location: Location, name: str, records: np.ndarray, *, records_per_shard: int,
                  metadata: dict[str, Any] | None = None, replace: bool = False) -> RecordsIndex:
    """Writes ``records`` ([n, record_len] integer array) as the record set ``location/name``.

    records_per_shard: records per shard file (the last shard holds the rest). metadata: JSON-able
    values kept in the index (``RecordSource.index.metadata``). Published atomically; an existing set
    is a ``FileExistsError`` unless ``replace``.
    """
    records = np.asarray(records)
    if records.ndim != 2 or records.shape[0] == 0 or records.shape[1] == 0:
        raise ValueError(f"records: expected a non-empty [n, record_len] array, got shape {records.shape}")
    if not np.issubdtype(records.dtype, np.integer):
        raise TypeError(f"records: expected an integer dtype, got {records.dtype}")
    if not isinstance(records_per_shard, int) or records_per_shard <= 0:
        raise ValueError(f"records_per_shard={records_per_shard!r}: expected a positive count")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name={name!r}: expected one visible path component")
    records = np.ascontiguousarray(records, dtype=records.dtype.newbyteorder("<"))
    client, target = location.client, location.join(name)
    counts = []
    with staged_directory(client, target, replace=replace) as staging:
        for shard, start in enumerate(range(0, len(records), records_per_shard)):
            part = records[start:start + records_per_shard]
            counts.append(len(part))
            for file_name, payload in ((shard_file(shard), part), (checksum_file(shard), _record_checksums(part))):
                with client.open(posixpath.join(staging, file_name), "wb") as file:
                    view = memoryview(payload).cast("B")
                    for offset in range(0, len(view), _WRITE_PIECE):
                        file.write(view[offset:offset + _WRITE_PIECE])
                    file.fsync()
        index = RecordsIndex(records.shape[1], records.dtype.str, tuple(counts), records_fingerprint(records),
                             dict(metadata or {}))
        with client.open(posixpath.join(staging, INDEX_FILE), "wb") as file:
            file.write(json.dumps({"format": FORMAT, **index._asdict()}, indent=1).encode())
            file.fsync()
    return index


def read_index(location: Location, name: str) -> RecordsIndex:
    """The index of ``location/name``: ``FileNotFoundError`` / ``CorruptRecords`` naming the path."""
    path = location.join(name, INDEX_FILE)
    where = f"{location.url}/{name}/{INDEX_FILE}"
    if not location.client.exists(path):
        raise FileNotFoundError(f"{where}: no record set index ({path} is missing)")
    with location.client.open(path, "rb") as file:
        raw = file.read()
    try:
        fields = json.loads(raw)
        if fields.pop("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        index = RecordsIndex(int(fields["record_len"]), str(fields["dtype"]), tuple(int(c) for c in fields["shard_counts"]),
                             str(fields["fingerprint"]), dict(fields["metadata"]))
        np.dtype(index.dtype)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptRecords(f"{where}: not a record set index ({error})") from error
    return index


class RecordSource:
    """The record set ``location/name`` as a Grain random-access data source of ``[record_len]`` arrays.

    Thread-safe: single reads are positional reads on shared open files; batched reads take a lock
    around the source's one IoRing and IoVec. verify: check every record's CRC32C (a mismatch raises
    ``CorruptRecords`` naming the shard file and record). io_workers: the IoRing's threads (more
    overlap more round trips to remote storage servers); 0: no ring, the grouped positional reads run
    in the calling thread; None: ``usrbio.default_workers()`` where reads wait on other processes (3FS
    servers over TCP, a 3FS FUSE mount), else 0 (an embedded 3FS or a plain directory: in-process
    reads, where threads only add hand-offs; benchmarks/adapters_data.py measures both). On open,
    every shard's size is checked against the index. ``close()`` closes the files (not the location's
    client).
    """

    def __init__(self, location: Location, name: str, *, verify: bool = True, io_workers: int | None = None):
        self.location, self.name, self.verify, self.io_workers = location, name, verify, io_workers
        if io_workers is None:  # threads pay off only where a read waits on another process
            io_workers = None if location.url.startswith(("3fs+tcp:", "3fs:")) else 0
        self._inline = io_workers == 0
        self.io_workers = io_workers
        self.index = read_index(location, name)
        self._starts = self.index.shard_starts
        self._lock = threading.Lock()
        self._batch_lock = threading.Lock()
        self._files: dict[int, Any] = {}
        self._checksums: dict[int, np.ndarray] = {}
        self._ring: IoRing | None = None
        self._iov: IoVec | None = None
        for shard, count in enumerate(self.index.shard_counts):
            for file_name, size in ((shard_file(shard), count * self.index.record_bytes), (checksum_file(shard), 4 * count)):
                path = location.join(name, file_name)
                if not location.client.exists(path):
                    raise FileNotFoundError(f"{self._where(file_name)}: shard file missing ({path})")
                found = location.client.stat(path).size
                if found != size:
                    raise CorruptRecords(f"{self._where(file_name)}: {found} bytes, the index says {size} "
                                         f"({count} records); the file is truncated or overwritten")

    def _where(self, file_name: str) -> str:
        return f"{self.location.url}/{self.name}/{file_name}"

    def __len__(self) -> int:
        return self.index.num_records

    def __repr__(self) -> str:
        return (f"RecordSource({self.location.url!r}, {self.name!r}, records={len(self)}, "
                f"record_len={self.index.record_len}, dtype={self.index.dtype})")

    def _file(self, shard: int):
        with self._lock:
            if shard not in self._files:
                self._files[shard] = self.location.client.open(self.location.join(self.name, shard_file(shard)), "rb")
            return self._files[shard]

    def _shard_checksums(self, shard: int) -> np.ndarray:
        with self._lock:
            if shard not in self._checksums:
                with self.location.client.open(self.location.join(self.name, checksum_file(shard)), "rb") as file:
                    self._checksums[shard] = np.frombuffer(file.read(), dtype="<u4")
            return self._checksums[shard]

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, record within shard) for [k] int64 global keys; IndexError outside [0, len)."""
        if keys.size and (keys.min() < 0 or keys.max() >= len(self)):
            bad = keys[(keys < 0) | (keys >= len(self))][0]
            raise IndexError(f"record {bad} out of range for {self!r}")
        shards = np.searchsorted(self._starts, keys, side="right") - 1
        return shards, keys - self._starts[shards]

    def _check(self, data: np.ndarray, shards: np.ndarray, rows: np.ndarray) -> None:
        """Verifies [k, record_len] records read from (shards, rows) against their checksums."""
        if not self.verify:
            return
        found = _record_checksums(data)
        for i in range(len(data)):
            if found[i] != self._shard_checksums(int(shards[i]))[rows[i]]:
                raise CorruptRecords(f"{self._where(shard_file(int(shards[i])))}: record {int(rows[i])} fails its "
                                     "CRC32C checksum (the shard is corrupt)")

    def __getitem__(self, key: int) -> np.ndarray:
        """[record_len] dtype: record ``key``."""
        shards, rows = self._locate(np.asarray([int(key)], dtype=np.int64))
        record_bytes = self.index.record_bytes
        buffer = bytearray(record_bytes)
        count = self._file(int(shards[0])).pread_into(memoryview(buffer), int(rows[0]) * record_bytes)
        if count != record_bytes:
            raise CorruptRecords(f"{self._where(shard_file(int(shards[0])))}: short read of record {int(rows[0])}")
        record = np.frombuffer(buffer, dtype=self.index.dtype)
        self._check(record[None], shards, rows)
        return record

    def read_many(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """[k, record_len] dtype: the records ``keys`` in that order (repeats allowed), read as one batch."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        record_bytes, record_len = self.index.record_bytes, self.index.record_len
        if keys.size == 0:
            return np.empty((0, record_len), self.index.dtype)
        unique, inverse = np.unique(keys, return_inverse=True)  # [u] sorted, [k] positions in it
        shards, rows = self._locate(unique)
        # A run: consecutive records of one shard, read with one IO. [u] bool: does a new run start here?
        starts = np.ones(len(unique), bool)
        starts[1:] = (shards[1:] != shards[:-1]) | (rows[1:] != rows[:-1] + 1)
        run_first = np.flatnonzero(starts)  # [runs] index into unique
        run_length = np.diff(np.append(run_first, len(unique)))  # [runs] records
        if self._inline:
            data = np.empty((len(unique), record_len), self.index.dtype)
            with memoryview(data).cast("B") as view:
                for first, length in zip(run_first.tolist(), run_length.tolist()):
                    target = view[first * record_bytes:(first + length) * record_bytes]
                    count = self._file(int(shards[first])).pread_into(target, int(rows[first]) * record_bytes)
                    self._check_count(count, len(target), int(shards[first]), int(rows[first]))
        else:
            with self._batch_lock:
                ring, iov = self._io(len(unique) * record_bytes, len(run_first))
                try:
                    self._read_runs(ring, iov, shards, rows, run_first, run_length)
                except BaseException:
                    ring.close()  # never leave prepared or unreaped IOs for the next batch
                    self._ring = None
                    raise
                with memoryview(iov) as whole:
                    data = np.frombuffer(whole, dtype=self.index.dtype, count=len(unique) * record_len)
                    data = data.reshape(len(unique), record_len).copy()
        self._check(data, shards, rows)
        return data[inverse]

    def _read_runs(self, ring: IoRing, iov: IoVec, shards: np.ndarray, rows: np.ndarray, run_first: np.ndarray,
                   run_length: np.ndarray) -> None:
        """Reads each run of records into the IoVec (run i at its first record's place) with one ring batch."""
        record_bytes = self.index.record_bytes
        for run, (first, length) in enumerate(zip(run_first.tolist(), run_length.tolist())):
            ring.prepare(iov[first * record_bytes:(first + length) * record_bytes], True,
                         self._file(int(shards[first])), int(rows[first]) * record_bytes, userdata=run)
        for done in ring.submit().wait(min_results=len(run_first)):
            first = int(run_first[done.userdata])
            self._check_count(done.result, int(run_length[done.userdata]) * record_bytes, int(shards[first]),
                              int(rows[first]))

    def _check_count(self, count: int, expected: int, shard: int, row: int) -> None:
        """A read of the records of ``shard`` from ``row`` on returned ``count`` bytes (or -errno)."""
        if count != expected:
            raise CorruptRecords(f"{self._where(shard_file(shard))}: read of records from {row} returned "
                                 f"{count} of {expected} bytes")

    def _getitems(self, keys: Sequence[int]) -> list[np.ndarray]:
        """Grain's batched-read hook (``SupportsBatchedReadRandomAccessDataSource``)."""
        return list(self.read_many(keys))

    def _io(self, size: int, entries: int) -> tuple[IoRing, IoVec]:
        """The source's ring (at least ``entries``) and buffer (at least ``size`` bytes), grown as needed."""
        if self._iov is None or self._iov.size < size:
            if self._iov is not None:
                self._iov.close()
            self._iov = IoVec(max(size, 1 << 20))
        if self._ring is None or self._ring.entries < entries:
            if self._ring is not None:
                self._ring.close()
            self._ring = IoRing(max(entries, 256), for_read=True, workers=self.io_workers)
        return self._ring, self._iov

    def close(self) -> None:
        with self._batch_lock, self._lock:
            for file in self._files.values():
                file.close()
            self._files.clear()
            if self._ring is not None:
                self._ring.close()
            if self._iov is not None:
                self._iov.close()
            self._ring = self._iov = None

    def __enter__(self) -> RecordSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class RecordOrder(NamedTuple):
    """One host's sample order over a record set: Grain's ``IndexSampler`` and this host's shard.

    Position p of this host is the sampler's global index ``p * shard_count + shard_index`` (how Grain's
    DataLoader walks a sharded sampler), so hosts' positions advance in lockstep and never overlap.
    """

    sampler: grain.IndexSampler
    shard_index: int
    shard_count: int

    def keys(self, start: int, count: int) -> np.ndarray:
        """[count] int64: the record keys at this host's positions ``start .. start + count``."""
        positions = np.arange(start, start + count, dtype=np.int64) * self.shard_count + self.shard_index
        return np.fromiter((self.sampler[int(p)].record_key for p in positions), dtype=np.int64, count=count)

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """[batch_size] int64: the keys of this host's batch ``step`` (positions step*batch_size onward)."""
        return self.keys(step * batch_size, batch_size)


def record_order(num_records: int, *, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                 seed: int = 0, num_epochs: int | None = None) -> RecordOrder:
    """A ``RecordOrder`` over ``num_records`` records: Grain's ``IndexSampler`` with
    ``ShardOptions(shard_index, shard_count, drop_remainder=True)`` (every host gets the same number of
    records per epoch), a global shuffle seeded by ``seed`` (a new permutation each epoch), and
    ``num_epochs`` (None: forever)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index}: expected 0 <= shard_index < shard_count={shard_count}")
    options = grain.ShardOptions(shard_index, shard_count, drop_remainder=True)
    sampler = grain.IndexSampler(num_records, shard_options=options, shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    return RecordOrder(sampler, shard_index, shard_count)
