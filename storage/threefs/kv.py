"""The transactional key-value store that holds all of 3FS's metadata: the contract and how to open one.

3FS keeps inodes, directory entries and file sessions in FoundationDB and leans on its Serializable
Snapshot Isolation: the meta service is stateless, runs every namespace operation as one transaction, and
simply reruns a transaction that conflicted with a concurrent one. This module states that contract
(`Transaction`, `KVStore`), the key-range helper `prefix_end`, and `open_kv(url)`; the contract has three
homes, one module each:

- `MemoryKV` (`memory_kv.py`): in one process, optimistic concurrency with backward validation of read sets.
- `SqliteKV` (`sqlite_kv.py`): one SQLite file in WAL mode, shareable by threads and processes.
- `FoundationDBKV` (`fdb_kv.py`): the real thing, when `libfdb_c` is installed.

`MemoryKV` and `SqliteKV` are also importable from here (loaded on first use, since their modules import
this one). Keys and values are `bytes`; ranges are `[begin, end)` in byte order.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

if TYPE_CHECKING:
    from storage.threefs.memory_kv import MemoryKV
    from storage.threefs.sqlite_kv import SqliteKV

__all__ = [
    "DEFAULT_MAX_RETRIES", "KVStore", "MemoryKV", "SqliteKV", "Transaction", "open_kv", "prefix_end",
]

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


# -- opening a store ------------------------------------------------------------------------------------


def open_kv(url: str) -> KVStore:
    """Opens a KV store by URL: "memory://", "sqlite:///abs/path.db", "fdb://" (default cluster file) or
    "fdb:///path/to/fdb.cluster"."""
    expected = "expected memory://, sqlite:///abs/path.db, fdb:// or fdb:///path/to/fdb.cluster"
    if not isinstance(url, str):
        raise ValueError(f"kv url {url!r}: {expected}")
    if url == "memory://":
        from storage.threefs.memory_kv import MemoryKV

        return MemoryKV()
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/") or path.endswith("/") or path == "/":
            raise ValueError(f"kv url {url!r}: the sqlite path must be absolute (sqlite:///abs/path.db)")
        from storage.threefs.sqlite_kv import SqliteKV

        return SqliteKV(path)
    if url.startswith("fdb://"):
        cluster = url[len("fdb://"):]
        if cluster and not cluster.startswith("/"):
            raise ValueError(f"kv url {url!r}: the cluster file must be absolute (fdb:///path/to/fdb.cluster)")
        from storage.threefs.fdb_kv import FoundationDBKV

        return FoundationDBKV(cluster or None)
    raise ValueError(f"kv url {url!r}: {expected}")


_LAZY = {"MemoryKV": "storage.threefs.memory_kv", "SqliteKV": "storage.threefs.sqlite_kv"}


def __getattr__(name: str) -> Any:
    """Re-exports MemoryKV and SqliteKV, importing their modules on first use (they import this module, so
    importing them here eagerly would be a cycle)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
