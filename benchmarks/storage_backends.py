"""The storage benchmark's backends (plain file IO, a 3FS client) and its measuring helpers.

``Plain`` and ``ThreeFS`` offer the same operations, so ``threefs_storage.py`` times each section on both.
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from storage.threefs.client.mount import MountClient

MIB = 1 << 20
SMALL = 4096

# ----------------------------------------------------------------------------- measuring helpers


def dirtied_bytes(pids: list[int]) -> int:
    """Bytes the processes dirtied in the page cache (write_bytes - cancelled_write_bytes)."""
    total = 0
    for pid in pids:
        try:
            fields = dict(line.split(": ") for line in pathlib.Path(f"/proc/{pid}/io").read_text().splitlines())
        except (OSError, ValueError):
            return -1  # not readable here: reported as unknown
        total += int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])
    return total


def timed(fn: Callable[[], Any], pids: list[int] | None = None) -> tuple[float, int | None]:
    """Seconds `fn()` took and, with `pids`, the bytes those processes dirtied meanwhile."""
    before = dirtied_bytes(pids) if pids else None
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if pids:
        after = dirtied_bytes(pids)
        return seconds, (after - before if before >= 0 and after >= 0 else None)
    return seconds, None


def aligned_offsets(rng: random.Random, count: int, file_size: int, size: int) -> list[int]:
    return [rng.randrange(file_size // size) * size for _ in range(count)]


# ----------------------------------------------------------------------------- the backends


class Plain:
    """Plain Python file IO: os.pwrite/os.preadv on files under `root` (fsync once at the end of writes).
    `name` "fuse": the same calls on a 3FS FUSE mount (``FuseMount``)."""

    def __init__(self, root: pathlib.Path, name: str = "plain") -> None:
        self.name = name
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.mount = MountClient(root)  # the same File API as the 3FS client, for IoRing
        self.pids = [os.getpid()]

    def _path(self, path: str) -> str:
        return str(self.root / path.lstrip("/"))

    def write_sequential(self, path: str, data: memoryview, request: int) -> None:
        fd = os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in range(0, len(data), request):
                os.pwrite(fd, data[offset:offset + request], offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_sequential(self, path: str, out: bytearray, request: int) -> None:
        view = memoryview(out)
        fd = os.open(self._path(path), os.O_RDONLY)
        try:
            for offset in range(0, len(out), request):
                os.preadv(fd, [view[offset:offset + request]], offset)
        finally:
            os.close(fd)

    def read_random(self, path: str, out: bytearray, offsets: list[int], size: int) -> None:
        view = memoryview(out)
        fd = os.open(self._path(path), os.O_RDONLY)
        try:
            for i, offset in enumerate(offsets):
                os.preadv(fd, [view[i * size:(i + 1) * size]], offset)
        finally:
            os.close(fd)

    def write_random(self, path: str, payload: memoryview, offsets: list[int], size: int) -> None:
        fd = os.open(self._path(path), os.O_RDWR)
        try:
            for i, offset in enumerate(offsets):
                os.pwrite(fd, payload[i * size:(i + 1) * size], offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def cold_reads(self) -> bool:
        """Whether the benchmark also reads with the page cache dropped (plain files only)."""
        return self.name == "plain"

    def drop_cache(self, path: str) -> None:
        """Asks the kernel to evict the (clean, fsynced) file from the page cache."""
        fd = os.open(self._path(path), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def open_file(self, path: str):
        return self.mount.open(path, "rb")

    def remove(self, path: str) -> None:
        p = pathlib.Path(self._path(path))
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    # metadata
    def makedirs(self, path: str) -> None:
        os.makedirs(self._path(path), exist_ok=True)

    def create_empty(self, paths: list[str]) -> None:
        for path in paths:
            os.close(os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))

    def stat_all(self, paths: list[str]) -> None:
        for path in paths:
            os.stat(self._path(path))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._path(path)))

    def remove_all(self, paths: list[str]) -> None:
        for path in paths:
            os.unlink(self._path(path))


class FuseMount:
    """``python -m storage.threefs mount 3fs+embedded://CLUSTER MOUNTPOINT`` in a child process (a cluster of
    its own: an embedded cluster's directory is locked by the process that opened it); unmounted on exit."""

    def __init__(self, cluster: pathlib.Path, mountpoint: pathlib.Path) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        self.process = subprocess.Popen([sys.executable, "-m", "storage.threefs", "mount", f"3fs+embedded://{cluster}",
                                         str(mountpoint), "--exit-with-parent"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the FUSE mount at {mountpoint} did not come up: {self.process.stderr.read()!r}")
            time.sleep(0.05)

    def __enter__(self) -> FuseMount:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the mount unmounts itself
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


class ThreeFS:
    """A 3FS client (embedded or over processes) with the same benchmark operations."""

    def __init__(self, name: str, client, pids: list[int]) -> None:
        self.name = name
        self.client = client
        self.pids = pids

    def write_sequential(self, path: str, data: memoryview, request: int) -> None:
        with self.client.open(path, "wb") as f:  # acknowledged by all 3 replicas per pwrite; close sets length
            for offset in range(0, len(data), request):
                f.pwrite(data[offset:offset + request], offset)

    def read_sequential(self, path: str, out: bytearray, request: int) -> None:
        view = memoryview(out)
        with self.client.open(path, "rb") as f:
            for offset in range(0, len(out), request):
                f.pread_into(view[offset:offset + request], offset)

    def read_random(self, path: str, out: bytearray, offsets: list[int], size: int) -> None:
        view = memoryview(out)
        with self.client.open(path, "rb") as f:
            for i, offset in enumerate(offsets):
                f.pread_into(view[i * size:(i + 1) * size], offset)

    def write_random(self, path: str, payload: memoryview, offsets: list[int], size: int) -> None:
        with self.client.open(path, "r+b") as f:
            for i, offset in enumerate(offsets):
                f.pwrite(payload[i * size:(i + 1) * size], offset)

    def open_file(self, path: str):
        return self.client.open(path, "rb")

    def remove(self, path: str) -> None:
        if self.client.exists(path):
            self.client.remove(path, recursive=True)

    def makedirs(self, path: str) -> None:
        self.client.makedirs(path)

    def create_empty(self, paths: list[str]) -> None:
        for path in paths:
            self.client.open(path, "wb").close()

    def stat_all(self, paths: list[str]) -> None:
        for path in paths:
            self.client.stat(path)

    def listdir(self, path: str) -> list[str]:
        return self.client.listdir(path)

    def remove_all(self, paths: list[str]) -> None:
        for path in paths:
            self.client.remove(path)
