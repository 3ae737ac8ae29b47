"""storage.threefs.meta.service, layout and meta_schema: 3FS's namespace as KV transactions.

Every operation and POSIX error on MemoryKV and SqliteKV; layouts; file lengths through sessions; deferred
garbage; namespace consistency under concurrency is in test_threefs_meta_concurrency.py.
"""

import dataclasses
import errno
import json
import random

import pytest

from storage.threefs.meta import service as meta_module
from storage.threefs.meta.layout import ChunkSpan, Layout, LayoutPolicy
from storage.threefs.meta.service import MetaService
from storage.threefs.meta.schema import (
    ROOT_INODE_ID, DirEntry, FileSession, Inode, InodeType, dentry_key, inode_key, session_key,
)
from storage.threefs.mgmtd.routing import ChainTable

from threefs_meta_fixtures import CHAIN_IDS, TABLE, reachable_files
from threefs_meta_fixtures import kv, meta  # noqa: F401 - pytest fixtures




def take_garbage(meta, limit=1024):
    """What a collector does: list the garbage, (delete chunks,) release it."""
    items = meta.garbage(limit)
    meta.release_garbage([item.inode_id for item in items])
    return items


def _raises(cls, code, path, fn, *args, **kwargs):
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code and info.value.filename == path, info.value
    return info.value


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


def test_remove_takes_whatever_the_path_names_in_one_call(meta):
    meta.mkdir("/d/sub/deep", parents=True)
    node, session = meta.create("/d/f", "a")
    meta.close(node.inode_id, session, 0)
    meta.create("/d/sub/deep/g", "a")
    meta.symlink("/d/sub", "/d/link")
    _raises(OSError, errno.ENOTEMPTY, "/d", meta.remove, "/d")
    _raises(OSError, errno.EBUSY, "/", meta.remove, "/")
    _raises(FileNotFoundError, errno.ENOENT, "/d/none", meta.remove, "/d/none")
    meta.remove("/d/link", recursive=True)  # the symlink itself, not the tree it names
    assert meta.listdir("/d/sub")[0].name == "deep"
    meta.remove("/d/f")
    assert [g.inode_id for g in take_garbage(meta)] == [node.inode_id] and meta.listdir("/d")[0].name == "sub"
    _raises(OSError, errno.ENOTEMPTY, "/d/sub", meta.remove, "/d/sub")
    meta.remove("/d/sub", recursive=True)
    meta.remove("/d")
    assert meta.listdir("/") == [] and meta.check_consistency() == []


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
    assert reachable_files(meta) == {"/full/x/y/moved": g.inode_id}


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


def test_garbage_stays_listed_until_released(meta):
    """A collector that dies between listing and releasing leaves the files for the next one."""
    f, s = meta.create("/f", "a")
    meta.close(f.inode_id, s, 10)
    meta.unlink("/f")
    assert [g.inode_id for g in meta.garbage()] == [f.inode_id]
    assert [g.inode_id for g in meta.garbage()] == [f.inode_id]   # listing does not consume
    meta.release_garbage([f.inode_id])
    assert meta.garbage() == [] and meta.check_consistency() == []
