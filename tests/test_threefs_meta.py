"""storage.threefs.meta, layout and meta_schema: 3FS's namespace as KV transactions.

Every operation and POSIX error on MemoryKV and SqliteKV; layouts; file lengths through sessions; deferred
garbage; and namespace consistency (check_consistency() == [], every file reachable exactly once) under
concurrent creates and renames from threads and from real processes sharing one SQLite file.
"""

import dataclasses
import errno
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from storage.threefs import meta as meta_module
from storage.threefs.kv import MemoryKV, SqliteKV
from storage.threefs.layout import ChunkSpan, Layout, LayoutPolicy
from storage.threefs.meta import MetaService
from storage.threefs.meta_schema import (
    ROOT_INODE_ID, DirEntry, FileSession, Inode, InodeType, dentry_key, inode_key, session_key,
)
from storage.threefs.routing import Chain, ChainTable

REPO = Path(__file__).resolve().parents[1]
CHAIN_IDS = (101, 102, 103, 104, 105, 106)
TABLE = ChainTable(table_id=1, version=3, chains={c: Chain(c, 1, (c * 10, c * 10 + 1)) for c in CHAIN_IDS})



def take_garbage(meta, limit=1024):
    """What a collector does: list the garbage, (delete chunks,) release it."""
    items = meta.garbage(limit)
    meta.release_garbage([item.inode_id for item in items])
    return items


@pytest.fixture(params=["memory", "sqlite"])
def kv(request, tmp_path):
    store = MemoryKV(seed=0) if request.param == "memory" else SqliteKV(str(tmp_path / "meta.db"))
    yield store
    store.close()


@pytest.fixture
def meta(kv):
    service = MetaService(kv, lambda: TABLE, LayoutPolicy(chunk_size=4096, stripe_size=4))
    yield service
    assert service.check_consistency() == []


def _raises(cls, code, path, fn, *args, **kwargs):
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code and info.value.filename == path, info.value
    return info.value


def _tree(meta, path="/"):
    """{path: inode_id} of every file and symlink reachable from `path` (directories walked)."""
    found = {}
    for e in meta.listdir(path):
        child = path.rstrip("/") + "/" + e.name
        if e.type is InodeType.DIRECTORY:
            found.update(_tree(meta, child))
        else:
            found[child] = e.inode_id
    return found


# -- layout ---------------------------------------------------------------------------------------------


def test_layout_policy_validation():
    assert LayoutPolicy() == LayoutPolicy(1 << 20, 4)
    LayoutPolicy(512, 1)
    for bad in (0, 256, 1000, 4097, -4096, 2.0 ** 12, True):
        with pytest.raises(ValueError, match="chunk_size must be a power of two >= 512"):
            LayoutPolicy(chunk_size=bad)
    with pytest.raises(ValueError, match="stripe_size"):
        LayoutPolicy(stripe_size=0)
    with pytest.raises(ValueError, match="stripe_size=3"):
        Layout(1, 1, 4096, 3, (101, 102), seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        Layout(1, 1, 3000, 2, (101, 102), seed=0)


def test_layout_choose_round_robin_shuffled_and_clipped():
    policy = LayoutPolicy(4096, 4)
    layout = Layout.choose(TABLE, policy, base_index=4, seed=7)
    assert sorted(layout.chains) == [101, 102, 105, 106]             # wraps round the table
    assert (layout.table_id, layout.table_version, layout.stripe_size) == (1, 3, 4)
    assert Layout.choose(TABLE, policy, 4, seed=7) == layout          # the seed fixes the shuffle
    orders = {Layout.choose(TABLE, policy, 0, seed=s).chains for s in range(20)}
    assert len(orders) > 1 and all(sorted(o) == [101, 102, 103, 104] for o in orders)
    wide = Layout.choose(TABLE, LayoutPolicy(4096, 10), 2, seed=1)
    assert wide.stripe_size == 6 and sorted(wide.chains) == list(CHAIN_IDS)
    with pytest.raises(ValueError, match="no chains"):
        Layout.choose(ChainTable(2, 1, {}), policy, 0, 0)
    assert Layout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_chunk_spans_cross_chunk_and_stripe_boundaries():
    layout = Layout(1, 1, 512, 3, (105, 101, 103), seed=0)
    assert layout.chunk_spans(100, 0) == [] and layout.chunk_spans(0, 0) == []
    assert [layout.chain_of_chunk(i) for i in range(7)] == [105, 101, 103, 105, 101, 103, 105]
    assert layout.chunk_spans(10, 20) == [ChunkSpan(0, 105, 10, 20, 0)]
    assert layout.chunk_spans(500, 1100) == [
        ChunkSpan(0, 105, 500, 12, 0), ChunkSpan(1, 101, 0, 512, 12),
        ChunkSpan(2, 103, 0, 512, 524), ChunkSpan(3, 105, 0, 64, 1036),   # stripe wraps to the first chain
    ]
    rng = random.Random(0)
    for _ in range(200):
        offset, length = rng.randrange(0, 5000), rng.randrange(0, 3000)
        covered = []
        for span in layout.chunk_spans(offset, length):
            assert 0 < span.length <= 512 and span.offset_in_chunk + span.length <= 512
            assert span.chain_id == layout.chain_of_chunk(span.chunk_index)
            covered += [(span.chunk_index * 512 + span.offset_in_chunk + i, span.buffer_offset + i)
                        for i in range(span.length)]
        assert covered == [(offset + i, i) for i in range(length)]
    with pytest.raises(ValueError, match="length"):
        layout.chunk_spans(0, -1)
    with pytest.raises(ValueError, match="offset"):
        layout.chunk_spans(-1, 5)


# -- schema ---------------------------------------------------------------------------------------------


def test_key_schema():
    assert inode_key(1) == b"INOD" + b"\x01" + b"\x00" * 7                 # little-endian inode ids
    assert dentry_key(1, "a") == b"DENT" + b"\x00" * 7 + b"\x01" + b"a"    # big-endian parent + name
    one_dir = sorted([dentry_key(255, n) for n in ("z", "a", "é", "")])
    assert all(dentry_key(255, "") <= k < dentry_key(256, "") for k in one_dir)
    assert session_key(7, "s1") == b"INOS" + inode_key(7) + b"s1"
    now = 1.5
    for inode in (
        Inode(5, InodeType.FILE, 0o644, now, now, now, length=9, layout=Layout(1, 3, 4096, 2, (101, 102), 9)),
        Inode(6, InodeType.DIRECTORY, 0o755, now, now, now, nlink=2, layout_policy=LayoutPolicy(), parent=3),
        Inode(7, InodeType.SYMLINK, 0o777, now, now, now, length=4, target="/a/b"),
    ):
        assert Inode.from_bytes(inode.to_bytes()) == inode
    entry = DirEntry(9, "név", 12, InodeType.FILE)
    assert DirEntry.from_kv(dentry_key(9, "név"), entry.value_bytes()) == entry
    session = FileSession(3, "abc", "client-1", 2.5)
    assert FileSession.from_bytes(session.to_bytes()) == session


# -- namespace operations -------------------------------------------------------------------------------


def test_root_and_path_normalisation(meta):
    root = meta.stat("/")
    assert root.inode_id == ROOT_INODE_ID and root.is_dir and root.parent == ROOT_INODE_ID
    meta.mkdir("/a/b/c", parents=True)
    c = meta.stat("/a/b/c")
    for same in ("//a///b/c/", "/a/./b/c/.", "/a/b/x/../c", "/../a/b/c", "/a/b/c/d/.."):
        assert meta.stat(same) == c
    for bad in ("a/b", "", "./a"):
        with pytest.raises(ValueError, match="path must be an absolute path"):
            meta.stat(bad)
    with pytest.raises(ValueError, match="dst must be an absolute path"):
        meta.rename("/a", "b")
    with pytest.raises(TypeError, match="path must be a str"):
        meta.stat(b"/a")
    _raises(OSError, errno.ENAMETOOLONG, "/" + "n" * 256, meta.mkdir, "/" + "n" * 256)


def test_mkdir_listdir_and_errors(meta):
    d = meta.mkdir("/d")
    assert d.is_dir and d.parent == ROOT_INODE_ID and meta.stat("/d") == d
    _raises(FileExistsError, errno.EEXIST, "/d", meta.mkdir, "/d")
    assert meta.mkdir("/d", exist_ok=True) == d
    _raises(FileNotFoundError, errno.ENOENT, "/x/y", meta.mkdir, "/x/y")
    deep = meta.mkdir("/x/y/z", parents=True)
    assert meta.stat("/x/y").inode_id == deep.parent
    assert meta.mkdir("/x/y/z", parents=True, exist_ok=True) == deep
    _raises(FileExistsError, errno.EEXIST, "/x/y", meta.mkdir, "/x/y", parents=True)
    for name in ("b", "a", "é", "Z", "a b"):
        meta.mkdir(f"/d/{name}")
    entries = meta.listdir("/d")
    assert [e.name for e in entries] == sorted(["b", "a", "é", "Z", "a b"])
    assert all(e.parent == d.inode_id and e.type is InodeType.DIRECTORY for e in entries)
    meta.create("/d/file", "c1")
    _raises(FileExistsError, errno.EEXIST, "/d/file", meta.mkdir, "/d/file", exist_ok=True)
    _raises(NotADirectoryError, errno.ENOTDIR, "/d/file/sub", meta.mkdir, "/d/file/sub")
    _raises(NotADirectoryError, errno.ENOTDIR, "/d/file/sub", meta.mkdir, "/d/file/sub", parents=True)
    _raises(NotADirectoryError, errno.ENOTDIR, "/d/file", meta.listdir, "/d/file")
    _raises(FileNotFoundError, errno.ENOENT, "/nope", meta.listdir, "/nope")
    _raises(FileExistsError, errno.EEXIST, "/", meta.mkdir, "/")
    assert meta.listdir("/d/a") == []


def test_layout_policies_are_inherited(meta):
    meta.mkdir("/big", layout=LayoutPolicy(1 << 16, 2))
    meta.mkdir("/big/inner/deeper", parents=True)
    assert meta.stat("/big/inner/deeper").layout_policy == LayoutPolicy(1 << 16, 2)
    f, _ = meta.create("/big/inner/deeper/f", "c1")
    assert (f.layout.chunk_size, f.layout.stripe_size) == (1 << 16, 2)
    g, _ = meta.create("/g", "c1")
    assert (g.layout.chunk_size, g.layout.stripe_size) == (4096, 4)
    assert (g.layout.table_id, g.layout.table_version) == (1, 3)


def test_create_places_files_round_robin_on_the_chain_table(meta):
    layouts = [meta.create(f"/f{i}", "c1")[0].layout for i in range(3)]
    assert [sorted(lay.chains) for lay in layouts] == [
        [101, 102, 103, 104], [101, 102, 105, 106], [103, 104, 105, 106]]
    assert all(lay.stripe_size == len(lay.chains) == 4 for lay in layouts)
    inode_ids = [meta.stat(f"/f{i}").inode_id for i in range(3)]
    assert len(set(inode_ids)) == 3 and ROOT_INODE_ID not in inode_ids


def test_create_open_and_sessions(meta, kv):
    f, s1 = meta.create("/f", "client-a")
    assert f.is_file and f.length == 0 and f.nlink == 1 and isinstance(s1, str)
    _raises(FileExistsError, errno.EEXIST, "/f", meta.create, "/f", "client-a", exclusive=True)
    meta.mkdir("/dir")
    _raises(IsADirectoryError, errno.EISDIR, "/dir", meta.create, "/dir", "client-a")
    _raises(IsADirectoryError, errno.EISDIR, "/dir", meta.open, "/dir", "client-a", write=False)
    _raises(FileNotFoundError, errno.ENOENT, "/missing", meta.open, "/missing", "client-a", write=True)
    _raises(FileNotFoundError, errno.ENOENT, "/no/f", meta.create, "/no/f", "client-a")
    read, none = meta.open("/f", "client-b", write=False)
    assert read == f and none is None
    again, s2 = meta.open("/f", "client-b", write=True)
    assert again.inode_id == f.inode_id and s2 != s1
    sessions = kv.transact(lambda t: t.get_range(session_key(f.inode_id, ""), session_key(f.inode_id, "\x7f")),
                           read_only=True)
    assert sorted(FileSession.from_bytes(v).client_id for _, v in sessions) == ["client-a", "client-b"]
    meta.close(f.inode_id, s1, 10)
    meta.close(f.inode_id, s2, None)
    with pytest.raises(ValueError, match="session_id"):
        meta.close(f.inode_id, s2, None)
    with pytest.raises(ValueError, match="client_id"):
        meta.create("/g", "")
    kept, s3 = meta.create("/f", "c", truncate=False)
    assert kept.length == 10
    truncated, s4 = meta.create("/f", "c")
    assert truncated.length == 0 and truncated.inode_id == f.inode_id
    meta.close(f.inode_id, s3, None)
    meta.close(f.inode_id, s4, None)
    assert take_garbage(meta) == []


def test_lengths_exact_after_close_and_sync(meta):
    f, s1 = meta.create("/f", "a")
    _, s2 = meta.open("/f", "b", write=True)
    assert meta.sync(f.inode_id, 100).length == 100
    assert meta.sync(f.inode_id, 40).length == 100          # lengths reported by writers only grow
    assert meta.close(f.inode_id, s2, 50).length == 100
    assert meta.close(f.inode_id, s1, 300).length == 300
    assert meta.stat("/f").length == 300
    assert meta.truncate("/f", 10).length == 10
    assert meta.sync(f.inode_id, 5).length == 10
    assert meta.truncate("/f", 4096 * 3).length == 4096 * 3
    with pytest.raises(ValueError, match="length"):
        meta.truncate("/f", -1)
    with pytest.raises(ValueError, match="length"):
        meta.sync(f.inode_id, -5)
    meta.mkdir("/d")
    _raises(IsADirectoryError, errno.EISDIR, "/d", meta.truncate, "/d", 0)
    _raises(FileNotFoundError, errno.ENOENT, "/nope", meta.truncate, "/nope", 0)


def test_garbage_is_deferred_while_write_sessions_are_open(meta):
    f, s1 = meta.create("/f", "a")
    _, s2 = meta.open("/f", "b", write=True)
    meta.unlink("/f")
    _raises(FileNotFoundError, errno.ENOENT, "/f", meta.stat, "/f")
    assert take_garbage(meta) == []
    assert meta.stat_inode(f.inode_id).nlink == 0
    assert meta.check_consistency() == []
    meta.close(f.inode_id, s1, 64)
    assert take_garbage(meta) == []
    meta.close(f.inode_id, s2, 4096)
    garbage = take_garbage(meta)
    assert [(g.inode_id, g.length, g.layout) for g in garbage] == [(f.inode_id, 4096, f.layout)]
    assert take_garbage(meta) == []
    _raises(FileNotFoundError, errno.ENOENT, f"inode {f.inode_id}", meta.stat_inode, f.inode_id)
    g, s = meta.create("/g", "a")
    meta.close(g.inode_id, s, 1)
    meta.unlink("/g")
    assert [x.inode_id for x in take_garbage(meta, limit=5)] == [g.inode_id]


def test_unlink_rmdir_errors(meta):
    meta.mkdir("/d/sub", parents=True)
    meta.create("/d/f", "a")
    _raises(IsADirectoryError, errno.EISDIR, "/d", meta.unlink, "/d")
    _raises(IsADirectoryError, errno.EISDIR, "/", meta.unlink, "/")
    _raises(FileNotFoundError, errno.ENOENT, "/d/none", meta.unlink, "/d/none")
    _raises(OSError, errno.ENOTEMPTY, "/d", meta.rmdir, "/d")
    _raises(NotADirectoryError, errno.ENOTDIR, "/d/f", meta.rmdir, "/d/f")
    _raises(OSError, errno.EBUSY, "/", meta.rmdir, "/")
    _raises(FileNotFoundError, errno.ENOENT, "/zz", meta.rmdir, "/zz")
    meta.rmdir("/d/sub")
    meta.unlink("/d/f")
    meta.rmdir("/d")
    assert meta.listdir("/") == []


def test_rename_posix_semantics(meta):
    meta.mkdir("/a/b/c", parents=True)
    meta.mkdir("/empty")
    meta.mkdir("/full/x", parents=True)
    f, s = meta.create("/a/f", "c")
    f = meta.close(f.inode_id, s, 7)
    g, s = meta.create("/g", "c")
    g = meta.close(g.inode_id, s, 3)
    meta.rename("/a/f", "/a/f")                                    # onto itself: nothing happens
    meta.rename("/a/f", "/a/b/../f/")
    assert meta.stat("/a/f") == f
    meta.rename("/a/f", "/a/b/moved")
    assert meta.stat("/a/b/moved").inode_id == f.inode_id and [e.name for e in meta.listdir("/a")] == ["b"]
    meta.rename("/g", "/a/b/moved")                                # replaces a file; it becomes garbage
    assert meta.stat("/a/b/moved").inode_id == g.inode_id
    assert [x.inode_id for x in take_garbage(meta)] == [f.inode_id]
    _raises(IsADirectoryError, errno.EISDIR, "/empty", meta.rename, "/a/b/moved", "/empty")
    _raises(NotADirectoryError, errno.ENOTDIR, "/a/b/moved", meta.rename, "/empty", "/a/b/moved")
    _raises(OSError, errno.ENOTEMPTY, "/full", meta.rename, "/a", "/full")
    _raises(OSError, errno.EINVAL, "/a/b/c/a", meta.rename, "/a", "/a/b/c/a")
    _raises(OSError, errno.EINVAL, "/a/b", meta.rename, "/a", "/a/b")
    _raises(OSError, errno.ENOTEMPTY, "/a", meta.rename, "/a/b", "/a")   # onto its own non-empty parent
    _raises(FileNotFoundError, errno.ENOENT, "/nothing", meta.rename, "/nothing", "/x")
    _raises(FileNotFoundError, errno.ENOENT, "/no/dir/x", meta.rename, "/a", "/no/dir/x")
    _raises(OSError, errno.EBUSY, "/", meta.rename, "/", "/r")
    b = meta.stat("/a/b")
    meta.rename("/a/b", "/empty")                                  # replaces an empty directory
    moved = meta.stat("/empty")
    assert moved.inode_id == b.inode_id and moved.parent == ROOT_INODE_ID
    assert meta.stat("/empty/c").parent == b.inode_id
    meta.rename("/empty", "/full/x/y")
    assert meta.stat("/full/x/y").parent == meta.stat("/full/x").inode_id
    assert _tree(meta) == {"/full/x/y/moved": g.inode_id}


def test_symlinks(meta):
    meta.mkdir("/real/sub", parents=True)
    f, _ = meta.create("/real/sub/f", "c")
    link = meta.symlink("/real/sub", "/abs")
    assert link.is_symlink and link.target == "/real/sub" and meta.readlink("/abs") == "/real/sub"
    meta.symlink("../real/sub/f", "/real/rel")                    # relative to the link's directory
    assert meta.stat("/abs/f") == f and meta.stat("/real/rel") == f
    assert meta.stat("/abs").is_dir and meta.stat("/abs", follow_symlinks=False) == link
    assert [e.name for e in meta.listdir("/abs")] == ["f"]
    _raises(OSError, errno.EINVAL, "/real", meta.readlink, "/real")
    _raises(FileExistsError, errno.EEXIST, "/abs", meta.symlink, "/x", "/abs")
    meta.symlink("/loop2", "/loop1")
    meta.symlink("/loop1", "/loop2")
    _raises(OSError, errno.ELOOP, "/loop1", meta.stat, "/loop1")
    _raises(OSError, errno.ELOOP, "/loop1/x", meta.create, "/loop1/x", "c")
    assert meta.stat("/loop1", follow_symlinks=False).target == "/loop2"
    meta.symlink("/real/new", "/dangling")
    _raises(FileNotFoundError, errno.ENOENT, "/dangling", meta.stat, "/dangling")
    made, _ = meta.create("/dangling", "c")                        # creates the link's target, as open(O_CREAT)
    assert meta.stat("/real/new") == made
    _raises(FileExistsError, errno.EEXIST, "/dangling", meta.create, "/dangling", "c", exclusive=True)
    meta.symlink(".", "/real/here")
    assert meta.stat("/real/here/here/sub/f") == f
    meta.unlink("/abs")                                            # removes the link, not its target
    assert meta.stat("/real/sub/f") == f
    meta.rename("/real/rel", "/rel2")
    assert meta.readlink("/rel2") == "../real/sub/f" and meta.stat("/rel2") == f   # '..' of root is root
    with pytest.raises(ValueError, match="target"):
        meta.symlink("", "/empty-link")


def test_remove_tree_in_bounded_transactions(meta, monkeypatch):
    monkeypatch.setattr(meta_module, "PURGE_BATCH", 3)
    files = {}
    for d in ("/t", "/t/a", "/t/a/aa", "/t/b"):
        meta.mkdir(d)
        for i in range(4):
            inode, s = meta.create(f"{d}/f{i}", "c")
            files[inode.inode_id] = s
    open_file = meta.stat("/t/a/aa/f0").inode_id
    meta.symlink("/t/a", "/t/b/link")
    meta.create("/keep", "c")
    meta.remove_tree("/t/a/aa/f1")                                 # a file: just unlinked
    for inode_id, s in files.items():
        if inode_id != open_file:
            meta.close(inode_id, s, 1)
    meta.remove_tree("/t")
    assert [e.name for e in meta.listdir("/")] == ["keep"]
    assert sorted(g.inode_id for g in take_garbage(meta)) == sorted(set(files) - {open_file})
    meta.close(open_file, files[open_file], 5)
    assert [g.inode_id for g in take_garbage(meta)] == [open_file]
    _raises(FileNotFoundError, errno.ENOENT, "/t", meta.remove_tree, "/t")
    _raises(OSError, errno.EBUSY, "/", meta.remove_tree, "/")


class _CrashAfter:
    """Wraps a KVStore and fails every transaction after the first `n` ones (a meta process dying)."""

    def __init__(self, kv, n):
        self.kv, self.n = kv, n

    def transact(self, fn, *, read_only=False):
        if self.n <= 0:
            raise ConnectionError("crashed")
        self.n -= 1
        return self.kv.transact(fn, read_only=read_only)


def test_interrupted_remove_tree_stays_consistent_and_resumes(meta, kv, monkeypatch):
    monkeypatch.setattr(meta_module, "PURGE_BATCH", 2)
    meta.mkdir("/t/x/y", parents=True)
    for i in range(5):
        inode, s = meta.create(f"/t/x/y/f{i}", "c")
        meta.close(inode.inode_id, s, 1)
    crashing = MetaService(_CrashAfter(kv, 3), lambda: TABLE)      # root check + detach + one purge step
    with pytest.raises(ConnectionError):
        crashing.remove_tree("/t")
    assert meta.listdir("/") == [] and meta.check_consistency() == []
    assert meta.purge_detached() == 1 and meta.purge_detached() == 0
    assert len(take_garbage(meta)) == 5 and meta.check_consistency() == []


def test_check_consistency_finds_corruption(meta, kv):
    meta.mkdir("/d/e", parents=True)
    d, e = meta.stat("/d"), meta.stat("/d/e")
    assert meta.check_consistency() == []

    def set_parent(parent):
        kv.transact(lambda t: t.set(inode_key(e.inode_id), dataclasses.replace(e, parent=parent).to_bytes()))

    ghost = DirEntry(ROOT_INODE_ID, "ghost", 999, InodeType.FILE)
    kv.transact(lambda t: t.set(dentry_key(ROOT_INODE_ID, "ghost"), ghost.value_bytes()))
    kv.transact(lambda t: t.set(inode_key(777), Inode(777, InodeType.FILE, 0o644, 0, 0, 0).to_bytes()))
    set_parent(ROOT_INODE_ID)
    problems = meta.check_consistency()
    assert any("missing inode 999" in p for p in problems)
    assert any(f"directory inode {e.inode_id} has parent field 0" in p for p in problems)
    assert any("inode 777" in p and "unreachable" in p for p in problems)
    kv.transact(lambda t: (t.clear(dentry_key(ROOT_INODE_ID, "ghost")), t.clear(inode_key(777))))
    set_parent(d.inode_id)


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
    tree = _tree(meta)
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
    tree = _tree(meta)
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
    from storage.threefs.meta import MetaService
    from storage.threefs.routing import Chain, ChainTable

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
    tree = _tree(meta)
    assert len(tree) == 45 and len(set(tree.values())) == 45
    for i in range(3):
        assert [e.name for e in meta.listdir(f"/p{i}")] == ["moved"]
        assert sorted(e.name for e in meta.listdir(f"/p{i}/moved")) == sorted(
            f"f{j}" for j in range(15) if j % 3)
        assert meta.stat(f"/shared/back-p{i}-12").length == 12
    meta.kv.close()
    setup.kv.close()


def test_garbage_stays_listed_until_released(meta):
    """A collector that dies between listing and releasing leaves the files for the next one."""
    f, s = meta.create("/f", "a")
    meta.close(f.inode_id, s, 10)
    meta.unlink("/f")
    assert [g.inode_id for g in meta.garbage()] == [f.inode_id]
    assert [g.inode_id for g in meta.garbage()] == [f.inode_id]   # listing does not consume
    meta.release_garbage([f.inode_id])
    assert meta.garbage() == [] and meta.check_consistency() == []
