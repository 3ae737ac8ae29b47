"""Errors that cross service boundaries (and the wire): each names what failed and why.

Namespace errors are the builtin POSIX exceptions (FileNotFoundError, ...); these are the storage-side ones.
"""


class TransactionConflict(RuntimeError):
    """A KV transaction kept conflicting with concurrent ones after its retries ran out."""


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
        super().__init__(message, committed_version)  # both in args: the error survives a pickle round trip
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
