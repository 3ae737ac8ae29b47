"""Per-(target, chunk) mutexes of a storage node: writes, resync transfers, repairs and removals of one
chunk on one target take its lock, so they never interleave (CRAQ serializes writes to a chunk at the
head). A lock exists only while somebody holds or waits for it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from storage.threefs.storage.chunk_id import ChunkId


class ChunkLocks:
    """Per-(target, chunk) mutexes, created on first use and dropped when nobody holds or waits."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[tuple[int, ChunkId], list[Any]] = {}  # key -> [lock, holders + waiters]

    @contextlib.contextmanager
    def hold(self, target_id: int, chunk_id: ChunkId) -> Iterator[None]:
        key = (target_id, chunk_id)
        with self._mutex:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._mutex:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]
