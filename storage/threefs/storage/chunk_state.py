"""What a chunk store keeps in memory per chunk, and the errors its updates raise.

`ChunkState`: a chunk's committed and pending versions (``version_writer.Version``), which blocks of its
spare slot are stale, and an epoch that moves whenever the spare slot is being overwritten. `LocatedVersion`:
where one version of a chunk lives (its slot file) as a read found it. Both are the chunk store's
internals (``chunk_store.py``, which guards them with its lock; `check_nonnegative` checks its
arguments); the errors are part of its interface.
"""

from __future__ import annotations

from typing import NamedTuple

from storage.threefs.storage.version_writer import Version


class PendingVersionExists(RuntimeError):
    """A chunk already holds a pending version (or one is being written); a target holds at most one."""


class ChunkVersionMismatch(RuntimeError):
    """An update carries a version that does not follow this target's committed version of the chunk."""


class ChunkState:
    """A chunk's state in memory (guarded by the store's lock). `stale`: the blocks where the spare slot
    differs from the committed content (None: unknown, all of them); `epoch` grows whenever a write
    starts overwriting the spare slot (a read that raced with it then gives up instead of failing);
    `paths`: the two slot files' paths, built on first use (a read then builds no path)."""

    __slots__ = ("committed", "pending", "stale", "epoch", "paths")

    def __init__(self, committed: Version | None, pending: Version | None = None) -> None:
        self.committed, self.pending, self.stale, self.epoch = committed, pending, None, 0
        self.paths: tuple[str, str] | None = None


def check_nonnegative(name: str, value: object) -> int:
    """`value`, which must be an int >= 0 (ValueError naming `name` otherwise)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class LocatedVersion(NamedTuple):
    """Where one version of a chunk lives, as a read found it (under the store's lock)."""

    path: str
    version: Version
    epoch: int
