"""`open_kv(url)`: a KV store by URL (memory://, sqlite:///abs/path.db, fdb://)."""

from __future__ import annotations

from storage.threefs.kv.memory import MemoryKV
from storage.threefs.kv.sqlite import SqliteKV
from storage.threefs.kv.store import KVStore


def open_kv(url: str) -> KVStore:
    """Opens a KV store by URL: "memory://", "sqlite:///abs/path.db", "fdb://" (default cluster file) or
    "fdb:///path/to/fdb.cluster"."""
    expected = "expected memory://, sqlite:///abs/path.db, fdb:// or fdb:///path/to/fdb.cluster"
    if not isinstance(url, str):
        raise ValueError(f"kv url {url!r}: {expected}")
    if url == "memory://":
        return MemoryKV()
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/") or path.endswith("/") or path == "/":
            raise ValueError(f"kv url {url!r}: the sqlite path must be absolute (sqlite:///abs/path.db)")
        return SqliteKV(path)
    if url.startswith("fdb://"):
        cluster = url[len("fdb://"):]
        if cluster and not cluster.startswith("/"):
            raise ValueError(f"kv url {url!r}: the cluster file must be absolute (fdb:///path/to/fdb.cluster)")
        from storage.threefs.kv.fdb import FoundationDBKV  # needs the fdb bindings: imported on demand

        return FoundationDBKV(cluster or None)
    raise ValueError(f"kv url {url!r}: {expected}")
