"""storage.threefs.kv: the transactional KV store under 3FS's metadata (MemoryKV, SqliteKV, FoundationDB).

Both stores must give serializable transactions with reruns on conflict: exact counters under thread and
process contention, no write skew, nothing written by a failed transaction.
"""

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from storage.threefs.errors import TransactionConflict
from storage.threefs.kv import MemoryKV, SqliteKV, open_kv, prefix_end

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    kv = MemoryKV(seed=0) if request.param == "memory" else SqliteKV(str(tmp_path / "kv.db"))
    yield kv
    kv.close()


def _put(kv, items):
    def fn(txn):
        for k, v in items.items():
            txn.set(k, v)

    kv.transact(fn)


def _all(kv):
    return kv.transact(lambda txn: txn.get_range(b"", b"\xff\xff\xff"), read_only=True)


def test_prefix_end():
    assert prefix_end(b"ab") == b"ac"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"DENT\x00") == b"DENT\x01"
    for bad in (b"", b"\xff\xff"):
        with pytest.raises(ValueError, match="prefix"):
            prefix_end(bad)


def test_get_set_clear(store):
    assert store.transact(lambda txn: txn.get(b"missing"), read_only=True) is None
    _put(store, {b"k": b"v1", b"\x00bin\xff": b"\x00\x01"})
    assert store.transact(lambda txn: txn.get(b"k"), read_only=True) == b"v1"
    _put(store, {b"k": b"v2"})
    got = store.transact(lambda txn: (txn.get(b"k"), txn.get(b"\x00bin\xff")), read_only=True)
    assert got == (b"v2", b"\x00\x01") and all(type(v) is bytes for v in got)
    store.transact(lambda txn: txn.clear(b"k"))
    store.transact(lambda txn: txn.clear(b"never-there"))
    assert _all(store) == [(b"\x00bin\xff", b"\x00\x01")]
    with pytest.raises(TypeError, match="key"):
        store.transact(lambda txn: txn.get("text"), read_only=True)


def test_range_limit_and_clear_range(store):
    keys = [b"a", b"a\x00", b"ab", b"a\xff", b"b", b"b\x00", b"c"]   # byte order
    _put(store, {k: k.hex().encode() for k in reversed(keys)})
    scan = lambda b, e, limit=0: store.transact(lambda t: t.get_range(b, e, limit), read_only=True)  # noqa: E731
    assert [k for k, _ in scan(b"", b"\xff")] == keys
    assert [k for k, _ in scan(b"a", b"b")] == [b"a", b"a\x00", b"ab", b"a\xff"]      # end excluded
    assert [k for k, _ in scan(b"a\x00", prefix_end(b"a"))] == [b"a\x00", b"ab", b"a\xff"]
    assert [k for k, _ in scan(b"a", b"c", 2)] == [b"a", b"a\x00"]
    assert scan(b"b", b"a") == [] and scan(b"b", b"b") == []
    assert scan(b"ab", b"b\x00") == [(b"ab", b"6162"), (b"a\xff", b"61ff"), (b"b", b"62")]
    with pytest.raises(ValueError, match="limit"):
        scan(b"a", b"b", -1)
    store.transact(lambda txn: txn.clear_range(b"a\x00", b"b\x00"))
    assert [k for k, _ in _all(store)] == [b"a", b"b\x00", b"c"]


def test_read_your_writes(store):
    _put(store, {b"k1": b"1", b"k2": b"2", b"k3": b"3", b"z": b"z"})

    def fn(txn):
        txn.set(b"k4", b"4")
        txn.clear(b"k1")
        assert txn.get(b"k4") == b"4" and txn.get(b"k1") is None
        assert txn.get_range(b"k", b"l") == [(b"k2", b"2"), (b"k3", b"3"), (b"k4", b"4")]
        txn.clear_range(b"k", b"l")
        assert txn.get_range(b"k", b"l") == [] and txn.get(b"k3") is None
        txn.set(b"k9", b"9")                       # a write after the clear_range survives it
        assert txn.get_range(b"", b"\xff", limit=1) == [(b"k9", b"9")]
        return "done"

    assert store.transact(fn) == "done"
    assert _all(store) == [(b"k9", b"9"), (b"z", b"z")]


def test_rollback_on_exception(store):
    _put(store, {b"keep": b"1", b"r1": b"x", b"r2": b"y"})

    def fn(txn):
        txn.set(b"new", b"1")
        txn.set(b"keep", b"changed")
        txn.clear_range(b"r", b"s")
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        store.transact(fn)
    assert _all(store) == [(b"keep", b"1"), (b"r1", b"x"), (b"r2", b"y")]


def test_read_only_transactions_refuse_writes(store):
    with pytest.raises(PermissionError, match="read_only"):
        store.transact(lambda txn: txn.set(b"k", b"v"), read_only=True)
    assert _all(store) == []


def _increment(key, pause=0.0):
    def fn(txn):
        value = int(txn.get(key) or b"0")
        if pause:
            time.sleep(pause)                     # widen the read-modify-write window
        txn.set(key, str(value + 1).encode())

    return fn


def test_threaded_counter_is_exact(store):
    errors = []

    def worker():
        try:
            for _ in range(50):
                store.transact(_increment(b"counter", pause=0.0001))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.transact(lambda txn: txn.get(b"counter"), read_only=True) == b"400"


def test_write_skew_is_prevented(store):
    """Each withdrawal reads x and y and takes 30 from its own key only if x + y stays >= 0; snapshot
    isolation alone would let concurrent withdrawals on x and y both pass the guard."""
    _put(store, {b"x": b"100", b"y": b"100", b"n": b"0"})
    seen_bad = []

    def withdraw(own):
        def fn(txn):
            x, y = int(txn.get(b"x")), int(txn.get(b"y"))
            if x + y < 0:
                seen_bad.append((x, y))
            time.sleep(0.0002)
            if x + y - 30 >= 0:
                txn.set(own, str(int(txn.get(own)) - 30).encode())
                txn.set(b"n", str(int(txn.get(b"n")) + 1).encode())

        return fn

    def worker(own):
        for _ in range(10):
            store.transact(withdraw(own))

    threads = [threading.Thread(target=worker, args=(k,)) for k in (b"x", b"y", b"x", b"y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    x, y, n = (int(store.transact(lambda txn: txn.get(k), read_only=True)) for k in (b"x", b"y", b"n"))
    assert seen_bad == []
    assert x + y >= 0 and x + y == 200 - 30 * n and n == 6


def test_memory_write_skew_interleaving_reruns_the_loser():
    """Both transactions read x and y before either writes (a barrier); the second to commit must be
    rerun, see the first one's withdrawal and then refuse."""
    kv = MemoryKV(seed=1)
    _put(kv, {b"x": b"50", b"y": b"50"})
    barrier = threading.Barrier(2)
    calls = {b"x": 0, b"y": 0}

    def withdraw(own):
        def fn(txn):
            calls[own] += 1
            total = int(txn.get(b"x")) + int(txn.get(b"y"))
            if calls[own] == 1:
                barrier.wait(timeout=10)
            if total >= 60:
                txn.set(own, str(int(txn.get(own)) - 60).encode())

        kv.transact(fn)

    threads = [threading.Thread(target=withdraw, args=(k,)) for k in (b"x", b"y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    x, y = (int(kv.transact(lambda txn: txn.get(k), read_only=True)) for k in (b"x", b"y"))
    assert sorted((x, y)) == [-10, 50]
    assert sorted(calls.values()) == [1, 2] and kv.conflicts == 1


def test_memory_conflict_retries_then_gives_up():
    kv = MemoryKV(max_retries=3, seed=2)
    attempts = []

    def always_conflicts(txn):
        attempts.append(1)
        txn.get(b"hot")
        kv.transact(_increment(b"hot"))           # a concurrent commit into the read set
        txn.set(b"other", b"1")

    with pytest.raises(TransactionConflict, match="3 retries"):
        kv.transact(always_conflicts)
    assert len(attempts) == 4
    assert kv.transact(lambda txn: (txn.get(b"hot"), txn.get(b"other")), read_only=True) == (b"4", None)


def test_memory_reads_never_mix_versions():
    """A read of a key changed since the transaction started reruns it at once (snapshot-consistent reads)."""
    kv = MemoryKV(seed=3)
    _put(kv, {b"a": b"0", b"b": b"0"})
    seen, attempts = [], []

    def fn(txn):
        attempts.append(1)
        a = txn.get(b"a")
        if len(attempts) == 1:
            _put(kv, {b"a": b"1", b"b": b"1"})
        seen.append((a, txn.get(b"b")))

    kv.transact(fn, read_only=True)
    assert seen == [(b"1", b"1")] and len(attempts) == 2


def test_sqlite_retries_while_another_connection_holds_the_lock(tmp_path):
    path = str(tmp_path / "locked.db")
    kv = SqliteKV(path, busy_timeout_s=0.01)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    start = time.monotonic()
    kv.transact(_increment(b"c"))
    assert time.monotonic() - start >= 0.25
    assert kv.transact(lambda txn: txn.get(b"c"), read_only=True) == b"1"
    impatient = SqliteKV(path, max_retries=0, busy_timeout_s=0.01)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(TransactionConflict, match="locked"):
        impatient.transact(_increment(b"c"))
    holder.execute("ROLLBACK")
    holder.close()
    kv.close()
    impatient.close()


def test_sqlite_persists_across_reopen(tmp_path):
    path = str(tmp_path / "p.db")
    kv = SqliteKV(path)
    _put(kv, {b"k": b"v"})
    kv.close()
    with pytest.raises(RuntimeError, match="closed"):
        kv.transact(lambda txn: txn.get(b"k"))
    again = SqliteKV(path)
    assert _all(again) == [(b"k", b"v")]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


_CHILD = textwrap.dedent("""
    import sys
    from storage.threefs.kv import SqliteKV

    path, me, n = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
    kv = SqliteKV(path)

    def bump(txn):
        txn.set(b"total", str(int(txn.get(b"total") or b"0") + 1).encode())
        txn.set(b"by/" + me, str(int(txn.get(b"by/" + me) or b"0") + 1).encode())

    for _ in range(n):
        kv.transact(bump)
    kv.close()
""")


def test_sqlite_shared_by_processes(tmp_path):
    path = str(tmp_path / "shared.db")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, path, f"p{i}", "50"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    kv = SqliteKV(path)
    assert _all(kv) == [(b"by/p0", b"50"), (b"by/p1", b"50"), (b"by/p2", b"50"), (b"by/p3", b"50"),
                        (b"total", b"200")]
    kv.close()


def test_open_kv_urls(tmp_path):
    mem = open_kv("memory://")
    assert isinstance(mem, MemoryKV)
    path = tmp_path / "url.db"
    sq = open_kv(f"sqlite://{path}")
    assert isinstance(sq, SqliteKV) and sq.path == str(path)
    _put(sq, {b"k": b"v"})
    sq.close()
    assert path.exists()
    bad_urls = ("sqlite://relative.db", "sqlite:///", "sqlite://", "redis://host", "memory", "", "fdb://rel/x.cluster")
    for bad in bad_urls:
        with pytest.raises(ValueError) as info:
            open_kv(bad)
        assert repr(bad) in str(info.value)


def test_foundationdb_is_used_only_when_available():
    from storage.threefs.kv.fdb import FoundationDBKV

    try:
        kv = FoundationDBKV()
    except (ImportError, RuntimeError) as e:
        assert "libfdb_c" in str(e) or "cluster_file" in str(e)
        with pytest.raises((ImportError, RuntimeError)):
            open_kv("fdb://")
        pytest.skip(f"FoundationDB unavailable: {e}")
    prefix = b"jaxseek-test/"
    try:
        try:
            kv.transact(lambda txn: txn.clear_range(prefix, prefix_end(prefix)))
        except Exception as e:  # the client loads but no cluster answers
            pytest.skip(f"FoundationDB cluster unreachable: {e}")
        _put(kv, {prefix + b"a": b"1", prefix + b"b": b"2"})
        got = kv.transact(lambda txn: txn.get_range(prefix, prefix_end(prefix), limit=1), read_only=True)
        assert got == [(prefix + b"a", b"1")]
        kv.transact(lambda txn: txn.clear_range(prefix, prefix_end(prefix)))
    finally:
        kv.close()
