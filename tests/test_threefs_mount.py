"""storage.threefs.client.mount / usrbio / fsspec_fs over a real directory (tmp_path stands in for a 3FS mount)."""

from __future__ import annotations

import errno
import io
import os
import sys
import types

import fsspec
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.threefs.client.file_api import File, FileClient, OpenMode, parse_mode
from storage.threefs.client.fsspec_fs import ThreeFSFileSystem
from storage.threefs.client.mount import MountClient, native_usrbio
from storage.threefs.client.usrbio import IoCompletion, IoRing, IoVec, deregister_fd, register_fd


@pytest.fixture
def client(tmp_path) -> MountClient:
    root = tmp_path / "mnt"
    root.mkdir()
    return MountClient(root)


@pytest.fixture
def fs(client) -> ThreeFSFileSystem:
    return fsspec.filesystem("3fs", client=client)


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


# -- file API ---------------------------------------------------------------------------------------------

def test_parse_mode():
    assert parse_mode("rb") == OpenMode(True, False, False, False, False, False)
    assert parse_mode("wb") == OpenMode(False, True, False, True, False, True)
    assert parse_mode("ab") == OpenMode(False, True, True, True, False, False)
    assert parse_mode("xb") == OpenMode(False, True, False, True, True, False)
    assert parse_mode("r+b") == parse_mode("rb+") == OpenMode(True, True, False, False, False, False)
    assert parse_mode("w+b") == OpenMode(True, True, False, True, False, True)
    assert parse_mode("a+b") == OpenMode(True, True, True, True, False, False)
    for bad in ("r", "w", "rt", "wbt", "rwb", "bb", "b", "qb", ""):
        with pytest.raises(ValueError, match="mode"):
            parse_mode(bad)


def test_random_round_trips_match_a_byte_model(client):
    rng = np.random.default_rng(1234)
    model = bytearray()
    client.makedirs("/data")
    with client.open("/data/blob.bin", "w+b") as f:
        assert isinstance(f, File) and isinstance(client, FileClient)
        for step in range(120):
            op = rng.integers(0, 6)
            if op == 0:  # pwrite anywhere, including past the end (a zero-filled hole)
                offset, data = int(rng.integers(0, 3 * 4096)), random_bytes(rng, int(rng.integers(0, 5000)))
                assert f.pwrite(data, offset) == len(data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + len(data)] = data
            elif op == 1:  # pread: short only at the end
                offset, length = int(rng.integers(0, len(model) + 100)), int(rng.integers(0, 6000))
                assert f.pread(length, offset) == bytes(model[offset:offset + length])
            elif op == 2:  # seek + write moves the position
                offset, data = int(rng.integers(0, len(model) + 1)), random_bytes(rng, int(rng.integers(1, 3000)))
                assert f.seek(offset) == offset
                f.write(data)
                model[offset:offset + len(data)] = data
                assert f.tell() == offset + len(data)
            elif op == 3:  # seek from the end / current position, then read
                back = int(rng.integers(0, len(model) + 1))
                assert f.seek(-back, os.SEEK_END) == len(model) - back
                assert f.seek(0, os.SEEK_CUR) == len(model) - back
                assert f.read() == bytes(model[len(model) - back:])
            elif op == 4:  # pread_into a memoryview slice of a larger buffer
                offset, length = int(rng.integers(0, len(model) + 10)), int(rng.integers(0, 4000))
                buffer = bytearray(length + 8)
                got = f.pread_into(memoryview(buffer)[4:4 + length], offset)
                assert bytes(buffer[4:4 + got]) == bytes(model[offset:offset + length]) and got == len(
                    model[offset:offset + length])
            else:  # truncate shorter or longer
                size = int(rng.integers(0, len(model) + 2000))
                assert f.truncate(size) == size
                model = model[:size] + bytearray(max(0, size - len(model)))
        f.fsync()
        assert client.stat("/data/blob.bin").size == len(model)
    with client.open("data/./blob.bin") as f:  # rb by default; the same path spelled differently
        assert f.read() == bytes(model)
        f.seek(0)
        buffer = bytearray(len(model) + 10)
        assert f.readinto(buffer) == len(model)


def test_append_modes(client):
    with client.open("/log", "ab") as f:
        f.write(b"one,")
        f.pwrite(b"ONE", 0)  # pwrite keeps its offset even in append mode
        f.seek(0)
        f.write(b"two,")  # writes go to the end regardless of the position
    with client.open("/log", "a+b") as f:
        f.write(b"three")
        f.seek(0)
        assert f.read() == b"ONE,two,three"
    with client.open("/log", "r+b") as f:
        f.write(b"X")
        assert f.read(3) == b"NE,"
    with client.open("/log", "w+b") as f:
        assert f.read() == b""


def test_mode_errors_name_the_path(client):
    with client.open("/a", "xb") as f:
        f.write(b"1")
    with pytest.raises(FileExistsError) as info:
        client.open("/a", "xb")
    assert info.value.filename == "/a"
    with pytest.raises(FileNotFoundError) as info:
        client.open("/missing/b", "rb")
    assert info.value.filename == "/missing/b"
    with pytest.raises(ValueError, match="mode"):
        client.open("/a", "r")
    with pytest.raises(ValueError, match="mode"):
        client.open("/a", "wt")
    client.makedirs("/d")
    with pytest.raises(IsADirectoryError):
        client.open("/d", "rb")
    with client.open("/a", "rb") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
    with client.open("/a", "wb") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.read()
    with pytest.raises(ValueError, match="closed"):
        f.pread(1, 0)


def test_paths_cannot_escape_the_mount(client, tmp_path):
    (tmp_path / "outside").write_bytes(b"secret")
    for bad in ("/../outside", "../outside", "a/../../outside", "/x/y/../../../outside"):
        with pytest.raises(ValueError, match="escapes"):
            client.open(bad, "rb")
        with pytest.raises(ValueError, match="escapes"):
            client.stat(bad)
    assert client.normpath("a/b/../c//./d/") == "/a/c/d"
    assert client.normpath("/") == client.normpath("") == "/"
    with pytest.raises(ValueError, match="mount root"):
        client.remove("/", recursive=True)


def test_namespace_operations(client):
    client.makedirs("/x/y/z")
    client.makedirs("/x/y", exist_ok=True)
    with pytest.raises(FileExistsError):
        client.makedirs("/x/y", exist_ok=False)
    for name in ("b", "a", "c"):
        with client.open(f"/x/y/{name}", "wb") as f:
            f.write(name.encode() * 3)
    assert client.listdir("/x/y") == ["a", "b", "c", "z"]
    st = client.stat("/x/y/a")
    assert (st.path, st.size, st.type) == ("/x/y/a", 3, "file") and st.inode_id > 0 and st.mtime > 0
    assert client.stat("/x/y").type == "directory"
    client.rename("/x/y/a", "/x/y/b")  # replaces atomically
    assert client.listdir("/x/y") == ["b", "c", "z"]
    with client.open("/x/y/b") as f:
        assert f.read() == b"aaa"
    with pytest.raises(FileNotFoundError) as info:
        client.rename("/x/nope", "/x/other")
    assert info.value.filename == "/x/nope"
    with pytest.raises(OSError) as info:
        client.remove("/x/y")
    assert info.value.errno == errno.ENOTEMPTY
    client.remove("/x/y/c")
    client.remove("/x/y", recursive=True)
    assert not client.exists("/x/y") and client.exists("/x")
    with pytest.raises(FileNotFoundError):
        client.stat("/x/y")


def test_native_usrbio_is_selected_only_on_3fs(tmp_path, monkeypatch):
    assert native_usrbio(str(tmp_path)) is None  # no hf3fs_fuse here
    synced: list[int] = []
    fake_io = types.ModuleType("hf3fs_fuse.io")
    fake_io.extract_mount_point = lambda path: str(tmp_path) if path.startswith(str(tmp_path)) else None
    fake_io.force_fsync = synced.append
    fake_package = types.ModuleType("hf3fs_fuse")
    fake_package.io = fake_io
    monkeypatch.setitem(sys.modules, "hf3fs_fuse", fake_package)
    monkeypatch.setitem(sys.modules, "hf3fs_fuse.io", fake_io)
    assert native_usrbio(str(tmp_path)) is fake_io
    assert native_usrbio("/proc") is None
    (tmp_path / "3fs-virt").mkdir()
    mounted = MountClient(tmp_path)
    assert mounted.usrbio is fake_io and "3fs-virt" not in mounted.listdir("/")
    with mounted.open("/f", "wb") as f:
        f.write(b"data")
        f.fsync()
        assert synced == [f.fileno()]


# -- USRBIO ---------------------------------------------------------------------------------------------

def test_iovec_shared_memory_slicing_and_close():
    with IoVec(4096, block_size=1024) as iov:
        view = memoryview(iov)
        assert view.nbytes == 4096 and not view.readonly
        view[10:14] = b"3FS!"
        with open(f"/dev/shm/{iov.name}", "rb") as shm_file:  # the bytes are in the shm segment itself
            assert shm_file.read()[10:14] == b"3FS!"
        piece = iov[8:16]
        assert (piece.offset, piece.length, len(piece)) == (8, 8, 8)
        assert bytes(piece[2:6]) == b"3FS!" and piece[2:6].offset == 10
        with pytest.raises(BufferError):
            iov.close()  # a memoryview still points into it
        view.release()
    assert iov.closed and not os.path.exists(f"/dev/shm/{iov.name}")
    with pytest.raises(ValueError, match="size"):
        IoVec(0)


def test_batched_reads_match_one_at_a_time_reads(client):
    rng = np.random.default_rng(7)
    content = random_bytes(rng, 300_000)
    with client.open("/big", "wb") as f:
        f.write(content)
    sizes = rng.integers(0, 9000, size=40)
    offsets = rng.integers(0, len(content), size=40)
    offsets[0] = len(content) - 100  # runs past the end: a short read
    with client.open("/big", "rb") as f, IoVec(int(sizes.sum()) + 1) as iov, \
            IoRing(entries=64, for_read=True, workers=4) as ring:
        register_fd(f)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        tags = [object() for _ in sizes]
        indices = [ring.prepare(iov[int(s):int(s + n)], True, f, int(o), userdata=tag)
                   for s, n, o, tag in zip(starts, sizes, offsets, tags)]
        done = ring.submit().wait()
        assert sorted(c.index for c in done) == sorted(indices) and len(done) == 40
        for c in done:
            i = indices.index(c.index)
            expected = f.pread(int(sizes[i]), int(offsets[i]))  # the one-at-a-time answer
            assert c.userdata is tags[i] and c.result == len(expected)
            assert bytes(iov[int(starts[i]):int(starts[i]) + c.result]) == expected
        assert next(c for c in done if c.index == indices[0]).result == min(int(sizes[0]), 100)
        deregister_fd(f)


def test_batched_writes_match_one_at_a_time_writes(client):
    rng = np.random.default_rng(8)
    pieces = [random_bytes(rng, int(n)) for n in rng.integers(1, 5000, size=25)]
    offsets = rng.integers(0, 100_000, size=25)
    order = np.argsort(offsets)  # non-overlapping file ranges, so completion order cannot matter
    offsets[order] = np.cumsum([0] + [len(pieces[i]) + 17 for i in order[:-1]])
    with client.open("/batched", "wb") as f, IoVec(sum(map(len, pieces))) as iov, \
            IoRing(entries=25, for_read=False, io_depth=-6) as ring:
        position = 0
        for i, piece in enumerate(pieces):
            memoryview(iov)[position:position + len(piece)] = piece
            ring.prepare(iov[position:position + len(piece)], False, f, int(offsets[i]), userdata=i)
            position += len(piece)
        done = ring.submit().wait()
        assert ring.issued_batches == [6, 6, 6, 6, 1]
        assert sorted(c.userdata for c in done) == list(range(25))
        assert all(c.result == len(pieces[c.userdata]) for c in done)
    with client.open("/sequential", "wb") as f:
        for i, piece in enumerate(pieces):
            f.pwrite(piece, int(offsets[i]))
    with client.open("/batched") as a, client.open("/sequential") as b:
        assert a.read() == b.read()


def test_io_depth_issues_exact_batches(client):
    with client.open("/f", "wb") as f:
        f.write(bytes(range(256)) * 4)
    with client.open("/f") as f, IoVec(1024) as iov, IoRing(entries=16, io_depth=4) as ring:
        for k in range(6):
            ring.prepare(iov[k * 10:(k + 1) * 10], True, f, k * 100)
        ring.submit()
        assert ring.issued_batches == [4]  # two IOs wait for a full batch
        assert len(ring.wait(min_results=4)) == 4
        assert ring.wait(timeout=0.05) == []
        with pytest.raises(ValueError, match="never finish"):
            ring.wait(min_results=1)
        for k in range(6, 8):
            ring.prepare(iov[k * 10:(k + 1) * 10], True, f, k * 100)
        ring.submit()
        assert ring.issued_batches == [4, 4]
        first = ring.wait(max_results=1, min_results=1)
        rest = ring.wait()
        assert len(first) == 1 and len(rest) == 3
        assert bytes(iov[70:80]) == bytes(range(256))[700 % 256:700 % 256 + 10]


class _Failing:
    """A File whose positional IO fails with a given exception."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def pread_into(self, buffer, offset):
        raise self.exc

    pwrite = pread_into


def test_failures_are_negative_errno_with_userdata(client):
    with client.open("/f", "wb") as f:
        f.write(b"x" * 100)
    closed = client.open("/f")
    closed.close()
    write_only = client.open("/g", "wb")
    cases = [(closed, -errno.EBADF), (write_only, -errno.EBADF),
             (_Failing(FileNotFoundError(errno.ENOENT, "gone", "/f")), -errno.ENOENT),
             (_Failing(OSError(errno.EIO, "chunk lost")), -errno.EIO), (_Failing(RuntimeError("bug")), -errno.EIO)]
    with IoVec(64) as iov, IoRing(entries=8) as ring:
        for k, (file, _) in enumerate(cases):
            ring.prepare(iov[k * 8:(k + 1) * 8], True, file, 0, userdata=("case", k))
        results = {c.userdata: c.result for c in ring.submit().wait()}
    assert results == {("case", k): code for k, (_, code) in enumerate(cases)}
    write_only.close()
    assert isinstance(IoCompletion(0, -errno.EIO, None).result, int)


def test_reads_land_zero_copy_in_shared_memory(client):
    with client.open("/f", "wb") as f:
        f.write(bytes(range(200)))
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def pread_into(self, buffer, offset):
            seen.append((buffer.obj, buffer.nbytes))  # the view is released after the IO
            return self.inner.pread_into(buffer, offset)

    with client.open("/f") as f, IoVec(1000) as iov, IoRing(entries=2) as ring:
        ring.prepare(iov[300:400], True, Spy(f), 50)
        (completion,) = ring.submit().wait()
        assert completion.result == 100
        assert seen[0][0] is iov and seen[0][1] == 100  # the File wrote straight into the IoVec's mapping
        with open(f"/dev/shm/{iov.name}", "rb") as shm_file:
            assert shm_file.read()[300:400] == bytes(range(50, 150))
        assert bytes(iov.shm.buf[300:400]) == bytes(range(50, 150))


def test_ring_direction_capacity_and_blocks(client):
    with client.open("/f", "wb") as f:
        f.write(b"z" * 10)
    with client.open("/f") as f, IoVec(8192, block_size=4096) as iov, IoRing(entries=2, for_read=True) as ring:
        with pytest.raises(ValueError, match="read=False"):
            ring.prepare(iov[0:10], False, f, 0)
        with pytest.raises(ValueError, match="block"):
            ring.prepare(iov[4000:4200], True, f, 0)
        ring.prepare(iov[0:5], True, f, 0)
        ring.prepare(iov[4096:8192], True, f, 0)  # a whole block
        with pytest.raises(BlockingIOError, match="full"):
            ring.prepare(iov[0:5], True, f, 0)
        assert sorted(c.result for c in ring.submit().wait()) == [5, 10]
    with pytest.raises(ValueError, match="closed"):
        ring.submit()
    with pytest.raises(ValueError, match="entries"):
        IoRing(entries=0)


# -- fsspec ---------------------------------------------------------------------------------------------

def test_fsspec_listing_info_and_ranges(fs, client):
    assert isinstance(fs, ThreeFSFileSystem) and fs is not fsspec.filesystem("3fs", client=client)
    data = bytes(range(256)) * 4
    fs.pipe_file("3fs:///d/sub/blob", data)
    fs.pipe_file("/d/a.txt", b"hello")
    fs.makedirs("/d/empty", exist_ok=True)
    names = fs.ls("/d", detail=False)
    assert names == ["/d/a.txt", "/d/empty", "/d/sub"]
    entries = {e["name"]: e for e in fs.ls("d")}
    assert entries["/d/a.txt"]["size"] == 5 and entries["/d/sub"]["type"] == "directory"
    assert fs.ls("/d/a.txt", detail=False) == ["/d/a.txt"]
    assert fs.info("3fs:///d/sub/blob")["size"] == 1024 and fs.info("/")["type"] == "directory"
    assert fs.exists("/d/a.txt") and not fs.exists("/d/nope") and fs.isdir("/d/empty")
    assert fs.cat_file("/d/sub/blob") == data
    assert fs.cat_file("/d/sub/blob", 10, 20) == data[10:20]
    assert fs.cat_file("/d/sub/blob", -10) == data[-10:]
    assert fs.cat_file("/d/sub/blob", None, 5) == data[:5]
    assert fs.cat_file("/d/sub/blob", 1000, 5000) == data[1000:]
    assert fs.cat_file("/d/sub/blob", 2, -2) == data[2:-2]
    assert fs.cat_file("/d/sub/blob", 50, 40) == b""
    assert fs.modified("/d/a.txt") == fs.created("/d/a.txt")
    assert sorted(fs.find("/d")) == ["/d/a.txt", "/d/sub/blob"]
    with pytest.raises(FileNotFoundError):
        fs.info("/d/nope")


def test_fsspec_mv_rm_mkdir(fs):
    fs.pipe_file("/a/x", b"new")
    fs.pipe_file("/a/y", b"old")
    fs.mv("/a/x", "/a/y")  # an atomic rename replacing the target
    assert fs.cat_file("/a/y") == b"new" and not fs.exists("/a/x")
    fs.mv("/a", "/b/moved")
    assert fs.cat_file("/b/moved/y") == b"new"
    fs.cp_file("/b/moved/y", "/b/copy")
    assert fs.cat_file("/b/copy") == b"new"
    with pytest.raises(FileExistsError):
        fs.mkdir("/b")
    fs.mkdir("/b/c/d")
    with pytest.raises(FileNotFoundError):
        fs.mkdir("/q/r", create_parents=False)
    with pytest.raises(OSError):
        fs.rm("/b")  # not empty, not recursive
    fs.rm_file("/b/copy")
    fs.rm("/b", recursive=True)
    assert fs.ls("/", detail=False) == []


def test_fsspec_writes_are_atomic(fs, client):
    fs.pipe_file("/t/data", b"old version")
    with fs.open("/t/data", "wb") as f:
        f.write(b"new ")
        f.flush()
        assert fs.cat_file("/t/data") == b"old version"  # readers still see the old file
        f.write(memoryview(np.arange(3, dtype=np.int32)))
        assert f.tell() == 16
    assert fs.cat_file("/t/data") == b"new " + np.arange(3, dtype=np.int32).tobytes()
    with pytest.raises(RuntimeError, match="crash"):
        with fs.open("/t/data", "wb") as f:
            f.write(b"half")
            raise RuntimeError("crash while writing")
    assert fs.cat_file("/t/data") == b"new " + np.arange(3, dtype=np.int32).tobytes()
    assert client.listdir("/t") == ["data"]  # no temporary left behind
    with pytest.raises(FileExistsError):
        fs.open("/t/data", "xb")
    with fs.open("/t/data", "ab") as f:
        f.write(b"!")
    assert fs.cat_file("/t/data").endswith(b"!")
    with fs.open("/t/text", "w") as f:  # text mode through fsspec's wrapper
        f.write("héllo\n")
    with fs.open("/t/text", "r") as f:
        assert f.read() == "héllo\n"
    with fs.transaction:
        with fs.open("/t/in_txn", "wb") as f:
            f.write(b"later")
        assert not fs.exists("/t/in_txn")
    assert fs.cat_file("/t/in_txn") == b"later"
    with pytest.raises(KeyError):
        with fs.transaction:
            with fs.open("/t/in_txn", "wb") as f:
                f.write(b"rolled back")
            raise KeyError("abort the transaction")
    assert fs.cat_file("/t/in_txn") == b"later" and client.listdir("/t") == ["data", "in_txn", "text"]
    with fs.open("/t/data", "rb") as f:
        assert f.read(4) == b"new " and f.seek(-1, 2) == f.size - 1 and f.read() == b"!"
    with pytest.raises(ValueError, match="mode"):
        fs.open("/t/data", "r+b")


def _frame() -> pl.DataFrame:
    rng = np.random.default_rng(3)
    return pl.DataFrame({
        "id": np.arange(1000, dtype=np.int64),
        "x": rng.standard_normal(1000),
        "name": [f"row-{i}" if i % 7 else None for i in range(1000)],
        "flag": rng.integers(0, 2, 1000).astype(bool),
    })


def test_polars_parquet_and_csv_round_trip(fs):
    frame = _frame()
    with fs.open("/tables/frame.parquet", "wb") as f:
        frame.write_parquet(f)
    with fs.open("/tables/frame.parquet", "rb") as f:
        assert_frame_equal(pl.read_parquet(f), frame)
    with fs.open("/tables/frame.csv", "wb") as f:
        frame.write_csv(f)
    with fs.open("/tables/frame.csv", "rb") as f:
        assert_frame_equal(pl.read_csv(f, schema=frame.schema), frame)


def test_pyarrow_filesystem_round_trip(fs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    table = _frame().to_arrow()
    arrow_fs.create_dir("arrow/nested")
    pq.write_table(table, "arrow/nested/t.parquet", filesystem=arrow_fs)
    assert pq.read_table("arrow/nested/t.parquet", filesystem=arrow_fs).equals(table)
    info = arrow_fs.get_file_info("arrow/nested/t.parquet")
    assert info.type == pa.fs.FileType.File and info.size == fs.info("/arrow/nested/t.parquet")["size"]
    arrow_fs.move("arrow/nested/t.parquet", "arrow/t2.parquet")
    assert pl.read_parquet(fs.open("/arrow/t2.parquet")).equals(_frame())
    arrow_fs.delete_dir("arrow")
    assert not fs.exists("/arrow")
