"""`SqliteKV`: the metadata KV store in one SQLite file, shareable by threads and processes.

The file is in WAL mode and every thread gets its own connection. Write transactions take the database's
single write lock up front (`BEGIN IMMEDIATE`) and read-only ones read a WAL snapshot, so the history is
serializable; a transaction that finds the database locked ("database is locked" / busy) is rolled back
and rerun with backoff.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import weakref
from typing import Callable, TypeVar

from storage.threefs.errors import TransactionConflict
from storage.threefs.kv.store import DEFAULT_MAX_RETRIES, Transaction, _as_key, _backoff, _check_limit

T = TypeVar("T")


def _is_busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    text = str(error).lower()
    return "locked" in text or "busy" in text


class _SqliteTransaction:
    """A transaction on one SQLite connection (already inside BEGIN / BEGIN IMMEDIATE)."""

    def __init__(self, conn: sqlite3.Connection, read_only: bool):
        self._conn = conn
        self._read_only = read_only

    def _check_writable(self) -> None:
        if self._read_only:
            raise PermissionError("write in a read_only transaction: pass read_only=False to transact")

    def get(self, key: bytes) -> bytes | None:
        row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (_as_key(key, "key"),)).fetchone()
        return None if row is None else bytes(row[0])

    def set(self, key: bytes, value: bytes) -> None:
        self._check_writable()
        self._conn.execute(
            "INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (_as_key(key, "key"), _as_key(value, "value")),
        )

    def clear(self, key: bytes) -> None:
        self._check_writable()
        self._conn.execute("DELETE FROM kv WHERE key = ?", (_as_key(key, "key"),))

    def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        begin, end, limit = _as_key(begin, "begin"), _as_key(end, "end"), _check_limit(limit)
        rows = self._conn.execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key LIMIT ?",
            (begin, end, limit if limit else -1),
        ).fetchall()
        return [(bytes(k), bytes(v)) for k, v in rows]

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_writable()
        self._conn.execute(
            "DELETE FROM kv WHERE key >= ? AND key < ?", (_as_key(begin, "begin"), _as_key(end, "end"))
        )


class _ThreadConnection:
    """One thread's connection; closed when the thread's locals are dropped (a server thread per client
    connection would otherwise leak a connection and two file descriptors per client)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        self.conn.close()


class SqliteKV:
    """A KVStore in one SQLite file (WAL mode), safe across threads and processes.

    Args:
      path: the database file (created if missing).
      max_retries: how many times a transaction that found the database locked is rerun.
      busy_timeout_s: how long SQLite itself waits for a lock before reporting it busy.
    """

    def __init__(self, path: str, max_retries: int = DEFAULT_MAX_RETRIES, busy_timeout_s: float = 2.0):
        if not isinstance(path, str) or not path:
            raise ValueError(f"path must be a non-empty file path, got {path!r}")
        self.path = path
        self._max_retries = max_retries
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._rng = random.Random()
        self._closed = False
        self._run_with_retries(self._init_schema)

    def _connection(self) -> sqlite3.Connection:
        holder = getattr(self._local, "holder", None)
        if holder is None:
            if self._closed:
                raise RuntimeError(f"SqliteKV({self.path!r}) is closed")
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            # per connection: WAL commits survive a killed process without an fsync per transaction
            conn.execute("PRAGMA synchronous=NORMAL")
            holder = _ThreadConnection(conn)
            with self._lock:
                self._connections.add(holder)
            self._local.holder = holder  # dropped (and the connection closed) when the thread ends
        return holder.conn

    def _init_schema(self) -> None:
        conn = self._connection()
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS kv(key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID")

    def _run_with_retries(self, step: Callable[[], T]) -> T:
        for attempt in range(self._max_retries + 1):
            try:
                return step()
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
            _backoff(self._rng, attempt, cap=0.1)
        raise TransactionConflict(f"SqliteKV({self.path!r}) stayed locked after {self._max_retries} retries")

    def transact(self, fn: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        """Runs fn(txn) serializably and commits; reruns it while the database is locked (see KVStore)."""
        if self._closed:
            raise RuntimeError(f"SqliteKV({self.path!r}) is closed")

        def attempt() -> T:
            conn = self._connection()
            conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
            try:
                result = fn(_SqliteTransaction(conn, read_only))
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return self._run_with_retries(attempt)

    def close(self) -> None:
        """Closes every thread's connection."""
        with self._lock:
            self._closed = True
            for holder in list(self._connections):
                holder.conn.close()
            self._connections.clear()
        self._local = threading.local()
