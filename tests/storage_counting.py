"""Test helper: a FileClient wrapper that counts the bytes read through the files it opens."""

from __future__ import annotations

import threading

from storage.location import Location


class CountingFile:
    """A client ``File`` whose reads add to ``counter.bytes`` (everything else is the file's own)."""

    def __init__(self, file, counter: "CountingClient"):
        self._file, self._counter = file, counter

    def __getattr__(self, name):
        return getattr(self._file, name)

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._counter.add(len(data))
        return data

    def readinto(self, buffer) -> int:
        return self._counter.add(self._file.readinto(buffer))

    def pread(self, length: int, offset: int) -> bytes:
        data = self._file.pread(length, offset)
        self._counter.add(len(data))
        return data

    def pread_into(self, buffer, offset: int) -> int:
        return self._counter.add(self._file.pread_into(buffer, offset))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()


class CountingClient:
    """Wraps a FileClient; ``bytes`` is the total read through files opened since the last ``reset()``,
    ``opens`` the number of files opened."""

    def __init__(self, client):
        self._client = client
        self._lock = threading.Lock()
        self.bytes = 0
        self.opens = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def add(self, count: int) -> int:
        with self._lock:
            self.bytes += count
        return count

    def reset(self) -> None:
        self.bytes = self.opens = 0

    def open(self, path: str, mode: str = "rb"):
        self.opens += 1
        return CountingFile(self._client.open(path, mode), self)


def counting(location: Location) -> tuple[Location, CountingClient]:
    """The same directory through a counting client (closing it closes the real client)."""
    client = CountingClient(location.client)
    return Location(client, location.path, location.url), client
