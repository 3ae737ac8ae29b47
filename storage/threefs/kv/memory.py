"""`MemoryKV`: the metadata KV store in one process, serializable by optimistic concurrency.

Every transaction buffers its writes and records the keys and ranges it read. At commit (and at every
read, so a transaction never sees a mix of old and new state) it is aborted if a transaction that
committed after it started wrote into that read set, and the store reruns it. Backward validation of read
sets is exactly what makes the history serializable (it forbids write skew). The store keeps a log of
recent commits' write sets, trimmed to those newer than the oldest running transaction.
"""

from __future__ import annotations

import bisect
import random
import threading
from collections import Counter
from typing import Callable, TypeVar

from storage.threefs.errors import TransactionConflict
from storage.threefs.kv.store import DEFAULT_MAX_RETRIES, Transaction, _as_key, _backoff, _check_limit

T = TypeVar("T")


class _Conflict(Exception):
    """Internal: the running transaction must be rolled back and rerun."""


def _ranges_overlap(b1: bytes, e1: bytes, b2: bytes, e2: bytes) -> bool:
    return b1 < e2 and b2 < e1


class _Commit:
    """What one committed MemoryKV transaction wrote (for validating the read sets of concurrent ones)."""

    __slots__ = ("version", "keys", "ranges")

    def __init__(self, version: int, keys: frozenset[bytes], ranges: tuple[tuple[bytes, bytes], ...]):
        self.version = version
        self.keys = keys
        self.ranges = ranges

    def touches_key(self, key: bytes) -> bool:
        return key in self.keys or any(b <= key < e for b, e in self.ranges)

    def touches_range(self, begin: bytes, end: bytes) -> bool:
        if any(_ranges_overlap(begin, end, b, e) for b, e in self.ranges):
            return True
        return any(begin <= k < end for k in self.keys)


class _MemoryTransaction:
    """A MemoryKV transaction: buffered writes over the shared state, with its read set recorded."""

    def __init__(self, store: MemoryKV, start_version: int, read_only: bool):
        self._store = store
        self._start = start_version
        self._read_only = read_only
        self._writes: dict[bytes, bytes | None] = {}       # key -> value, None = cleared
        self._cleared: list[tuple[bytes, bytes]] = []      # clear_range calls, in order
        self.read_keys: set[bytes] = set()
        self.read_ranges: list[tuple[bytes, bytes]] = []

    def _check_writable(self) -> None:
        if self._read_only:
            raise PermissionError("write in a read_only transaction: pass read_only=False to transact")

    def _in_cleared(self, key: bytes) -> bool:
        return any(b <= key < e for b, e in self._cleared)

    def get(self, key: bytes) -> bytes | None:
        key = _as_key(key, "key")
        if key in self._writes:
            return self._writes[key]
        if self._in_cleared(key):
            return None
        self.read_keys.add(key)
        return self._store._read_key(key, self._start)

    def set(self, key: bytes, value: bytes) -> None:
        self._check_writable()
        self._writes[_as_key(key, "key")] = _as_key(value, "value")

    def clear(self, key: bytes) -> None:
        self._check_writable()
        self._writes[_as_key(key, "key")] = None

    def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        begin, end, limit = _as_key(begin, "begin"), _as_key(end, "end"), _check_limit(limit)
        if begin >= end:
            return []
        merged = {k: v for k, v in self._store._read_range(begin, end, self._start) if not self._in_cleared(k)}
        for k, v in self._writes.items():
            if begin <= k < end:
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
        items = sorted(merged.items())
        if limit and len(items) > limit:
            items = items[:limit]
            self.read_ranges.append((begin, items[-1][0] + b"\x00"))
        else:
            self.read_ranges.append((begin, end))
        return items

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_writable()
        begin, end = _as_key(begin, "begin"), _as_key(end, "end")
        if begin >= end:
            return
        for k in [k for k in self._writes if begin <= k < end]:
            del self._writes[k]
        self._cleared.append((begin, end))

    @property
    def has_writes(self) -> bool:
        return bool(self._writes or self._cleared)


class MemoryKV:
    """An in-memory KVStore for one process: thread-safe, optimistic, serializable.

    Args:
      max_retries: how many times a conflicting transaction is rerun before TransactionConflict.
      seed: seeds the retry backoff jitter (None = nondeterministic).
    """

    def __init__(self, max_retries: int = DEFAULT_MAX_RETRIES, seed: int | None = None):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self._max_retries = max_retries
        self._lock = threading.Lock()
        self._data: dict[bytes, bytes] = {}
        self._sorted_keys: list[bytes] = []
        self._version = 0
        self._log: list[_Commit] = []        # commits newer than the oldest running transaction
        self._active: Counter[int] = Counter()  # start version -> running transactions
        self._rng = random.Random(seed)
        self._closed = False
        self.conflicts = 0                   # transactions rerun so far (for tests and stats)

    # -- reads, under the lock, validated against commits after `start` ---------------------------

    def _read_key(self, key: bytes, start: int) -> bytes | None:
        with self._lock:
            if any(c.version > start and c.touches_key(key) for c in self._log):
                raise _Conflict()
            return self._data.get(key)

    def _read_range(self, begin: bytes, end: bytes, start: int) -> list[tuple[bytes, bytes]]:
        with self._lock:
            if any(c.version > start and c.touches_range(begin, end) for c in self._log):
                raise _Conflict()
            lo = bisect.bisect_left(self._sorted_keys, begin)
            hi = bisect.bisect_left(self._sorted_keys, end)
            return [(k, self._data[k]) for k in self._sorted_keys[lo:hi]]

    # -- transaction lifecycle -----------------------------------------------------------------------

    def _begin(self, read_only: bool) -> _MemoryTransaction:
        with self._lock:
            if self._closed:
                raise RuntimeError("MemoryKV is closed")
            self._active[self._version] += 1
            return _MemoryTransaction(self, self._version, read_only)

    def _end(self, txn: _MemoryTransaction) -> None:
        """Forgets a finished transaction and drops log entries no running transaction needs. Lock held."""
        self._active[txn._start] -= 1
        if not self._active[txn._start]:
            del self._active[txn._start]
        oldest = min(self._active) if self._active else self._version
        self._log = [c for c in self._log if c.version > oldest]

    def _commit(self, txn: _MemoryTransaction) -> None:
        """Validates txn's read set against later commits and applies its writes. Lock held."""
        for c in self._log:
            if c.version > txn._start and (
                any(c.touches_key(k) for k in txn.read_keys)
                or any(c.touches_range(b, e) for b, e in txn.read_ranges)
            ):
                raise _Conflict()
        for begin, end in txn._cleared:
            lo = bisect.bisect_left(self._sorted_keys, begin)
            hi = bisect.bisect_left(self._sorted_keys, end)
            for k in self._sorted_keys[lo:hi]:
                del self._data[k]
            del self._sorted_keys[lo:hi]
        for k, v in txn._writes.items():
            if v is None:
                if self._data.pop(k, None) is not None:
                    del self._sorted_keys[bisect.bisect_left(self._sorted_keys, k)]
            else:
                if k not in self._data:
                    bisect.insort(self._sorted_keys, k)
                self._data[k] = v
        self._version += 1
        self._log.append(_Commit(self._version, frozenset(txn._writes), tuple(txn._cleared)))

    def transact(self, fn: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        """Runs fn(txn) serializably and commits; reruns it on conflict (see KVStore.transact)."""
        for attempt in range(self._max_retries + 1):
            txn = self._begin(read_only)
            try:
                result = fn(txn)
                if txn.has_writes:
                    with self._lock:
                        try:
                            self._commit(txn)
                        finally:
                            self._end(txn)
                            txn = None
                return result
            except _Conflict:
                with self._lock:
                    self.conflicts += 1
            finally:
                if txn is not None:
                    with self._lock:
                        self._end(txn)
            _backoff(self._rng, attempt)
        raise TransactionConflict(f"MemoryKV transaction still conflicted after {self._max_retries} retries")

    def close(self) -> None:
        with self._lock:
            self._closed = True
