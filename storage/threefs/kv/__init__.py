"""kv: the transactional key-value store under the metadata (3FS: FoundationDB).

Contract (`store.py`): `KVStore.transact(fn)` runs `fn(txn)` as one serializable transaction and reruns it
on conflict (bounded, then `TransactionConflict`); `fn` must have no effects outside the transaction.
Backends, one module each: `MemoryKV` (`memory.py`, one process), `SqliteKV` (`sqlite.py`, WAL, many
processes), `FoundationDBKV` (`fdb.py`, when `libfdb_c` loads). `open_kv(url)` (`open.py`) picks one.
"""

from storage.threefs.kv.memory import MemoryKV
from storage.threefs.kv.open import open_kv
from storage.threefs.kv.sqlite import SqliteKV
from storage.threefs.kv.store import DEFAULT_MAX_RETRIES, KVStore, Transaction, prefix_end

__all__ = ["DEFAULT_MAX_RETRIES", "KVStore", "MemoryKV", "SqliteKV", "Transaction", "open_kv", "prefix_end"]
