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
