"""storage.threefs.meta.service under concurrency: creates and renames from interleaving threads and from real
processes sharing one SQLite file keep the namespace consistent (check_consistency() == [], every file
reachable exactly once), and racing directory moves cannot make a cycle."""

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time

from storage.threefs.kv import MemoryKV, SqliteKV
from storage.threefs.meta.layout import LayoutPolicy
from storage.threefs.meta.service import MetaService

from threefs_meta_fixtures import REPO, TABLE, reachable_files
from threefs_meta_fixtures import kv  # noqa: F401 - a pytest fixture


# -- concurrency ----------------------------------------------------------------------------------------


class _YieldingTxn:
    """A transaction that gives up the CPU before every operation, as a remote KV's latency would."""

    def __init__(self, txn):
        self._txn = txn

    def __getattr__(self, name):
        op = getattr(self._txn, name)

        def call(*args, **kwargs):
            time.sleep(0)
            return op(*args, **kwargs)

        return call


class _Yielding:
    """A KVStore wrapper whose transactions interleave finely between threads."""

    def __init__(self, kv):
        self.kv = kv

    def transact(self, fn, *, read_only=False):
        return self.kv.transact(lambda txn: fn(_YieldingTxn(txn)), read_only=read_only)


def _run_threads(target, n):
    """Runs target(i) on n threads that start together and switch often (so transactions interleave)."""
    errors, start = [], threading.Barrier(n)

    def wrapped(i):
        try:
            start.wait(timeout=30)
            target(i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [], errors


def test_concurrent_creates_keep_the_namespace_consistent(kv):
    meta = MetaService(_Yielding(kv), lambda: TABLE, LayoutPolicy(4096, 4))
    meta.mkdir("/shared")

    def worker(i):
        for j in range(25):
            inode, s = meta.create(f"/shared/t{i}-{j}", f"client{i}")
            meta.close(inode.inode_id, s, j)
            if j % 8 == 0:
                meta.mkdir(f"/nest/t{i}/d{j}", parents=True)
                meta.create(f"/nest/t{i}/d{j}/f", f"client{i}")

    _run_threads(worker, 8)
    assert meta.check_consistency() == []
    tree = reachable_files(meta)
    assert len(tree) == 8 * 25 + 8 * 4 and len(set(tree.values())) == len(tree)
    assert len(meta.listdir("/shared")) == 200 and meta.stat("/shared/t3-7").length == 7


def test_concurrent_renames_keep_every_file_reachable_once(kv):
    meta = MetaService(_Yielding(kv), lambda: TABLE)
    for d in ("/A", "/B", "/D1", "/D2"):
        meta.mkdir(d)
    originals = {meta.create(f"/A/f{i}", "c")[0].inode_id for i in range(12)}
    originals |= {meta.create(p, "c")[0].inode_id for p in ("/D1/inside", "/D2/inside", "/A/hot")}
    outcomes = []

    def mover(i):                   # threads 0-3 move their own files between /A and /B, and fight over /hot
        for r in range(8):
            src, dst = ("/A", "/B") if r % 2 == 0 else ("/B", "/A")
            for j in (i, i + 4):
                meta.rename(f"{src}/f{j}", f"{dst}/f{j}")
            try:
                meta.rename(f"{dst if i % 2 else src}/hot", f"{src if i % 2 else dst}/hot")
                outcomes.append("hot moved")
            except FileNotFoundError:
                outcomes.append("hot elsewhere")

    def swapper(i):                 # threads 4-5 swap the names of two files through a temporary name
        a, b = f"/A/f{8 + 2 * (i - 4)}", f"/A/f{9 + 2 * (i - 4)}"
        for _ in range(6):
            meta.rename(a, f"/A/tmp{i}")
            meta.rename(b, a)
            meta.rename(f"/A/tmp{i}", b)

    def nester(i):                  # threads 6-7 race to move D1 into D2 and D2 into D1 (and back)
        me, other = ("/D1", "/D2") if i == 6 else ("/D2", "/D1")
        for _ in range(10):
            for src, dst in ((me, f"{other}{me}"), (f"{other}{me}", me)):
                try:
                    meta.rename(src, dst)
                    outcomes.append("nested")
                except OSError as e:
                    assert e.errno in (errno.ENOENT, errno.EINVAL), e
                    outcomes.append(errno.errorcode[e.errno])

    _run_threads(lambda i: (mover if i < 4 else swapper if i < 6 else nester)(i), 8)
    assert meta.check_consistency() == []
    tree = reachable_files(meta)
    assert sorted(tree.values()) == sorted(originals)
    assert {p.rsplit("/", 1)[0] for p in tree if "/f" in p} == {"/A"}
    assert "hot moved" in outcomes and "nested" in outcomes


def test_racing_directory_moves_cannot_make_a_cycle():
    """mv /D1 /D2/D1 and mv /D2 /D1/D2 both check their destination's ancestors before either commits; the
    second to commit must be rerun (and then fail), or the two directories would orphan each other."""
    kv = MemoryKV(seed=4)
    meta = MetaService(kv, lambda: TABLE)
    meta.mkdir("/D1")
    meta.mkdir("/D2")
    barrier = threading.Barrier(2)
    first_attempt = threading.local()

    class Paused:
        def transact(self, fn, *, read_only=False):
            def paused(txn):
                result = fn(txn)
                if not getattr(first_attempt, "done", False):
                    first_attempt.done = True
                    barrier.wait(timeout=10)         # both have checked ancestors and written, neither committed
                return result

            return kv.transact(paused, read_only=read_only)

    first_attempt.done = True                        # the main thread (racer's root check) does not pause
    racer = MetaService(Paused(), lambda: TABLE)
    results = []

    def move(src, dst):
        try:
            racer.rename(src, dst)
            results.append("moved")
        except OSError as e:
            results.append(errno.errorcode[e.errno])

    threads = [threading.Thread(target=move, args=a) for a in (("/D1", "/D2/D1"), ("/D2", "/D1/D2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ENOENT", "moved"] and kv.conflicts >= 1
    assert meta.check_consistency() == []
    assert [e.name for e in meta.listdir("/")] in (["D1"], ["D2"])


_CHILD = textwrap.dedent("""
    import sys
    from storage.threefs.kv import SqliteKV
    from storage.threefs.meta.service import MetaService
    from storage.threefs.mgmtd.routing import Chain, ChainTable

    path, me = sys.argv[1], int(sys.argv[2])
    table = ChainTable(1, 3, {c: Chain(c, 1, (c,)) for c in (101, 102, 103)})
    meta = MetaService(SqliteKV(path), lambda: table)
    meta.mkdir(f"/p{me}/sub", parents=True)
    for j in range(15):
        inode, s = meta.create(f"/shared/p{me}-{j}", f"proc{me}")
        meta.close(inode.inode_id, s, j)
    for j in range(15):
        meta.rename(f"/shared/p{me}-{j}", f"/p{me}/sub/f{j}")
        if j % 3 == 0:
            meta.rename(f"/p{me}/sub/f{j}", f"/shared/back-p{me}-{j}")
    meta.rename(f"/p{me}/sub", f"/p{me}/moved")
""")


def test_processes_share_one_sqlite_namespace(tmp_path):
    path = str(tmp_path / "shared-meta.db")
    setup = MetaService(SqliteKV(path), lambda: TABLE)
    setup.mkdir("/shared")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, path, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    meta = MetaService(SqliteKV(path), lambda: TABLE)
    assert meta.check_consistency() == []
    tree = reachable_files(meta)
    assert len(tree) == 45 and len(set(tree.values())) == 45
    for i in range(3):
        assert [e.name for e in meta.listdir(f"/p{i}")] == ["moved"]
        assert sorted(e.name for e in meta.listdir(f"/p{i}/moved")) == sorted(
            f"f{j}" for j in range(15) if j % 3)
        assert meta.stat(f"/shared/back-p{i}-12").length == 12
    meta.kv.close()
    setup.kv.close()
