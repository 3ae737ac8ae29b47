"""The transactional key-value store that holds all of 3FS's metadata: the contract every backend meets.

3FS keeps inodes, directory entries and file sessions in FoundationDB and leans on its Serializable
Snapshot Isolation: the meta service is stateless, runs every namespace operation as one transaction, and
simply reruns a transaction that conflicted with a concurrent one. This module states that contract
(`Transaction`, `KVStore`) and the key-range helper `prefix_end`; the backends (`memory.py`,
`sqlite.py`, `fdb.py`) import it, never the other way round. Keys and values are `bytes`; ranges are
`[begin, end)` in byte order.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Protocol, TypeVar

__all__ = ["DEFAULT_MAX_RETRIES", "KVStore", "Transaction", "prefix_end"]

T = TypeVar("T")

DEFAULT_MAX_RETRIES = 200


class Transaction(Protocol):
    """One serializable transaction: reads see the transaction's own writes."""

    def get(self, key: bytes) -> bytes | None: ...
    def set(self, key: bytes, value: bytes) -> None: ...
    def clear(self, key: bytes) -> None: ...
    def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]: ...
    def clear_range(self, begin: bytes, end: bytes) -> None: ...


class KVStore(Protocol):
    """A store that runs functions as serializable transactions, retrying them on conflict."""

    def transact(self, fn: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        """Runs fn in a transaction and commits; on conflict rolls back and reruns fn (bounded retries, then
        TransactionConflict). fn must have no effects outside the transaction."""
        ...

    def close(self) -> None: ...


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (so `[prefix, prefix_end(prefix))` is the
    prefix's range): trailing 0xff bytes are dropped and the last remaining byte is incremented."""
    prefix = _as_key(prefix, "prefix")
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError(f"prefix {prefix!r}: expected at least one byte other than 0xff")
    return stripped[:-1] + bytes([stripped[-1] + 1])


# -- helpers shared by the implementations --------------------------------------------------------------


def _as_key(value: object, name: str) -> bytes:
    """`value` as bytes, or a TypeError naming the argument."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, got {type(value).__name__}")


def _check_limit(limit: int) -> int:
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an int >= 0 (0 = no limit), got {limit!r}")
    return limit


def _backoff(rng: random.Random, attempt: int, base: float = 0.0005, cap: float = 0.05) -> None:
    """Sleeps a random time in [0, min(cap, base * 2**attempt)] so that conflicting retries spread out."""
    time.sleep(rng.uniform(0, min(cap, base * (2 ** min(attempt, 16)))))
