"""FoundationDB as the metadata KV store, as in production 3FS.

3FS stores its whole namespace in FoundationDB and relies on its Serializable Snapshot Isolation plus
client-side retries of conflicting transactions. This adapter maps the `KVStore` contract onto the
official `fdb` Python bindings (API version 710, the FDB 7.1 line 3FS requires). The bindings are a thin
ctypes layer over the native client library `libfdb_c`, which must be installed separately (it ships
with FoundationDB's client packages); without it constructing `FoundationDBKV` fails with an error that
says so, and `SqliteKV` remains the default.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from storage.threefs.errors import TransactionConflict
from storage.threefs.kv.store import DEFAULT_MAX_RETRIES, Transaction, _as_key, _check_limit

T = TypeVar("T")

FDB_API_VERSION = 710


def _load_fdb() -> Any:
    """Imports the bindings and selects API version 710, or raises a clear ImportError/RuntimeError."""
    try:
        import fdb  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(
            "FoundationDBKV needs the FoundationDB Python bindings (`pip install foundationdb`) and the native "
            "client library libfdb_c (FoundationDB client packages); use sqlite:///path.db instead"
        ) from e
    if fdb.is_api_version_selected():
        if fdb.get_api_version() < FDB_API_VERSION:
            raise RuntimeError(f"fdb API version {fdb.get_api_version()} was already selected; need >= 710")
        return fdb
    try:
        fdb.api_version(FDB_API_VERSION)
    except Exception as e:  # the bindings raise OSError/RuntimeError/FDBError when libfdb_c cannot load
        raise RuntimeError(
            f"FoundationDB client library libfdb_c is missing or unusable ({e}); install the FoundationDB "
            "client package (7.1 or later) or use sqlite:///path.db"
        ) from e
    return fdb


class _FdbTransaction:
    """The KV Transaction contract over one `fdb.Transaction`."""

    def __init__(self, tr: Any, read_only: bool):
        self._tr = tr
        self._read_only = read_only

    def _check_writable(self) -> None:
        if self._read_only:
            raise PermissionError("write in a read_only transaction: pass read_only=False to transact")

    def get(self, key: bytes) -> bytes | None:
        value = self._tr.get(_as_key(key, "key"))
        return bytes(value) if value.present() else None

    def set(self, key: bytes, value: bytes) -> None:
        self._check_writable()
        self._tr.set(_as_key(key, "key"), _as_key(value, "value"))

    def clear(self, key: bytes) -> None:
        self._check_writable()
        self._tr.clear(_as_key(key, "key"))

    def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        begin, end, limit = _as_key(begin, "begin"), _as_key(end, "end"), _check_limit(limit)
        if begin >= end:
            return []
        return [(bytes(kv.key), bytes(kv.value)) for kv in self._tr.get_range(begin, end, limit=limit)]

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_writable()
        begin, end = _as_key(begin, "begin"), _as_key(end, "end")
        if begin < end:
            self._tr.clear_range(begin, end)


class FoundationDBKV:
    """A KVStore on a FoundationDB cluster.

    Args:
      cluster_file: path of the fdb.cluster file; None = the client's default
        (FDB_CLUSTER_FILE, ./fdb.cluster, /etc/foundationdb/fdb.cluster).
      max_retries: conflicting (retryable) attempts before TransactionConflict.
      timeout_s: per-transaction timeout (FDB error 1031 when exceeded); None = wait forever.
    """

    def __init__(self, cluster_file: str | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 timeout_s: float | None = 10.0):
        self._fdb = _load_fdb()
        try:
            self._db = self._fdb.open(cluster_file)
            if timeout_s is not None:   # an unreachable cluster fails a transaction instead of hanging
                self._db.options.set_transaction_timeout(int(timeout_s * 1000))
        except Exception as e:
            raise RuntimeError(f"cannot open FoundationDB with cluster_file={cluster_file!r}: {e}") from e
        self.cluster_file = cluster_file
        self._max_retries = max_retries

    def transact(self, fn: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        """Runs fn(txn) and commits, retrying retryable FDB errors (conflicts, too-old reads) via on_error."""
        tr = self._db.create_transaction()
        for _ in range(self._max_retries + 1):
            try:
                result = fn(_FdbTransaction(tr, read_only))
                if not read_only:
                    tr.commit().wait()
                return result
            except self._fdb.FDBError as e:
                tr.on_error(e).wait()  # re-raises errors that are not retryable; resets tr otherwise
        raise TransactionConflict(f"FoundationDB transaction still conflicted after {self._max_retries} retries")

    def close(self) -> None:
        """Drops the database handle (the client's network thread lives for the process)."""
        self._db = None
