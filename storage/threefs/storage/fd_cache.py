"""An LRU of open file descriptors, shared by the reads and writes of one chunk store.

`use(path, create)` yields a descriptor opened O_RDWR (O_CREAT too when `create`) and keeps it open for
the next use of that path; at most `capacity` idle descriptors stay open, the least recently used are
closed first. A descriptor in use is never closed under its user: `forget(path)` (before a file is
unlinked) closes it once its last user is done. Thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator


class _Entry:
    __slots__ = ("fd", "users", "forgotten")

    def __init__(self, fd: int) -> None:
        self.fd, self.users, self.forgotten = fd, 0, False


class FdCache:
    """Open descriptors by path, at most `capacity` idle ones."""

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    @contextlib.contextmanager
    def use(self, path: str, create: bool = False) -> Iterator[int]:
        """A descriptor of `path` for the duration of the block. Raises FileNotFoundError when `path`
        does not exist and not `create`."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:
                self._entries.move_to_end(path)
                entry.users += 1
        if entry is None:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            with self._lock:
                entry = self._entries.get(path)
                if entry is None:
                    entry = self._entries[path] = _Entry(fd)
                    fd = -1
                entry.users += 1
                self._evict()
            if fd >= 0:
                os.close(fd)  # another thread opened it meanwhile
        try:
            yield entry.fd
        finally:
            with self._lock:
                entry.users -= 1
                close = entry.forgotten and entry.users == 0
            if close:
                os.close(entry.fd)

    def forget(self, path: str) -> None:
        """Drops `path`'s descriptor (closed now, or by its last user)."""
        with self._lock:
            entry = self._entries.pop(path, None)
            if entry is None:
                return
            entry.forgotten = True
            close = entry.users == 0
        if close:
            os.close(entry.fd)

    def paths(self) -> list[str]:
        """The paths with an open descriptor, least recently used first."""
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        """Closes every idle descriptor; the ones in use close when their users finish."""
        for path in self.paths():
            self.forget(path)

    def _evict(self) -> None:
        """Under the lock: closes least recently used idle descriptors beyond the capacity."""
        excess = len(self._entries) - self._capacity
        for path in list(self._entries):
            if excess <= 0:
                return
            entry = self._entries[path]
            if entry.users == 0:
                del self._entries[path]
                os.close(entry.fd)
                excess -= 1
