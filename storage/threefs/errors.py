"""Errors that cross service boundaries (and the wire): each names what failed and why.

What a user of ``Client`` / ``ThreeFSFile`` can get is always an ``OSError`` with its errno, built here:

  ENOENT, EEXIST, EISDIR, ENOTDIR       the builtin subclasses (FileNotFoundError, ...) from ``os_error``
  ENOTEMPTY, EINVAL, EBUSY, ELOOP, ...  plain ``OSError`` from ``os_error``
  ESTALE      ``StaleFileHandle``: an open file's inode was removed (and its chunks collected)
  EIO         ``NoIntactReplica``: every replica of a chunk failed its checksum
  ETIMEDOUT   ``TimeoutError`` from ``timed_out``: no replica answered within the client's retry window;
              ``TransactionConflict`` (a ``TimeoutError``): a metadata transaction kept conflicting
  (none)      ``NodeUnavailable`` (a ``ConnectionError``): a metadata or mgmtd server did not answer

The rest are internal retry signals between the services and the client's data path
(``ChainVersionMismatch``, ``TargetNotServing``, ``ChunkDiverged``,
``ChecksumError`` of one replica): the client retries them and, once its retry window is spent, raises
``timed_out`` instead; they never reach a user as such. Argument errors are ``ValueError`` / ``TypeError``
naming the argument, a closed file or client ``ValueError``.
"""

import errno
import os


def os_error(cls: type[OSError], code: int, path: str) -> OSError:
    """An OSError subclass instance with errno `code`, its standard message and `path` as the filename."""
    return cls(code, os.strerror(code), path)


def timed_out(what: str) -> TimeoutError:
    """The client's give-up error (errno ETIMEDOUT): `what` says which request and why."""
    return TimeoutError(errno.ETIMEDOUT, what)


class StaleFileHandle(OSError):
    """ESTALE: an open file's inode no longer exists (removed by another client and its chunks collected).
    Build with ``os_error(StaleFileHandle, errno.ESTALE, path)``."""


class NoIntactReplica(OSError):
    """EIO: every replica of a chunk that could answer failed its checksum; retrying cannot help. Build
    with ``NoIntactReplica(errno.EIO, message)``."""


class TransactionConflict(TimeoutError):
    """A KV transaction kept conflicting with concurrent ones after its retries ran out: to a user of the
    client, a metadata operation that gave up (errno ETIMEDOUT). Built from a message alone."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (errno.ETIMEDOUT, args[0])
        super().__init__(*args)


class ChecksumError(IOError):
    """A chunk's bytes on disk do not match the checksum stored when it was written."""


class ChainVersionMismatch(RuntimeError):
    """A request carried a chain version other than the one this target knows: refresh routing and retry."""


class TargetNotServing(RuntimeError):
    """The target cannot serve this request in its current state (offline, syncing for a read, ...)."""


class NodeUnavailable(ConnectionError):
    """A server did not answer (killed, not started, or unreachable)."""


class ChunkDiverged(RuntimeError):
    """A forwarded CRAQ update does not fit the successor's copy of the chunk, which took nothing.

    `committed_version` is the successor's committed version. At or past the update's version (with other
    content than the update's checksum), the predecessor's copy is stale: the head adopts the tail's copy
    and writes again on top of it. Below it (the successor missed a version, or built on other bytes), the
    predecessor resends the whole chunk.
    """

    def __init__(self, message: str, committed_version: int = 0) -> None:
        super().__init__(message, committed_version)  # both in args: the codec rebuilds it as cls(*args)
        self.committed_version = committed_version

    def __str__(self) -> str:
        return str(self.args[0])


class NotPrimary(RuntimeError):
    """This mgmtd is a standby (or lost its leadership lease): it changes and serves nothing; `leader` is
    the address of the mgmtd that holds the lease ("" when none is known). Nothing was done: resend there."""

    def __init__(self, message: str, leader: str = "") -> None:
        super().__init__(message, leader)  # both in args: the error survives the wire
        self.leader = leader

    def __str__(self) -> str:
        return str(self.args[0])
