"""storage.threefs data path through the client: byte-exact IO against a model, holes, truncate, open
modes, stat, chunk placement over the stripe chains, and USRBIO rings. Fixtures are in
threefs_client_fixtures."""

from __future__ import annotations

import errno
import io

import numpy as np
import pytest

from storage.threefs.storage.chunk_id import ChunkId
from storage.threefs.client.usrbio import IoRing, IoVec

from threefs_client_fixtures import (CHUNK, SHAPE, STRIPE, assert_chains_consistent, chunk_files_on_disk,
                                     expected_chunks, random_bytes, read_all, replica_contents, write_file)
from threefs_client_fixtures import client, cluster  # noqa: F401 - pytest fixtures


# -- byte-exact IO ---------------------------------------------------------------------------------------

def test_random_pwrite_pread_match_a_byte_model(client):
    rng = np.random.default_rng(20240601)
    model = bytearray()
    with client.open("/model.bin", "w+b") as f:
        for step in range(60):
            # offsets straddle chunk (4 KiB) and stripe (12 KiB) boundaries; some leave holes past the end
            if rng.random() < 0.3:
                offset = int(rng.integers(1, 4)) * CHUNK * STRIPE + int(rng.integers(-3, 4))
            else:
                offset = int(rng.integers(0, 70_000))
            size = int(rng.choice([1, 7, CHUNK - 1, CHUNK, CHUNK + 1, int(rng.integers(0, 3 * CHUNK * STRIPE))]))
            data = random_bytes(rng, size)
            assert f.pwrite(data, max(0, offset)) == size
            offset = max(0, offset)
            if offset + size > len(model):
                model.extend(bytes(offset + size - len(model)))
            model[offset:offset + size] = data
            for _ in range(2):
                at = int(rng.integers(0, len(model) + CHUNK))
                n = int(rng.integers(0, 3 * CHUNK * STRIPE))
                assert f.pread(n, at) == bytes(model[at:at + n]), (step, at, n)
        assert f.tell() == 0  # positional IO never moves the position
        assert f.read() == bytes(model)
        assert f.tell() == len(model)
        f.fsync()
        assert client.stat("/model.bin").size == len(model)
    assert client.stat("/model.bin").size == len(model)
    assert read_all(client, "/model.bin") == bytes(model)
    # stream IO: readinto and seek in odd steps
    with client.open("/model.bin", "rb") as f:
        buffer = bytearray(CHUNK + 3)
        got = bytearray()
        while count := f.readinto(buffer):
            got += buffer[:count]
        assert got == model
        assert f.seek(-5, io.SEEK_END) == len(model) - 5 and f.read() == bytes(model[-5:])
        assert f.seek(CHUNK - 2) == CHUNK - 2 and f.read(5) == bytes(model[CHUNK - 2:CHUNK + 3])
        assert f.seek(3, io.SEEK_CUR) == CHUNK + 6
        assert f.pread(10, len(model) + 100) == b""


def test_holes_read_as_zeros_and_sparse_chunks_are_not_stored(cluster, client):
    far = 10 * CHUNK + 17
    with client.open("/sparse", "wb") as f:
        f.pwrite(b"head", 0)
        f.pwrite(b"tail", far)
    data = read_all(client, "/sparse")
    assert data == b"head" + bytes(far - 4) + b"tail"
    inode = client.stat("/sparse").inode_id
    stored = {c.chunk_index for chunks in replica_contents(cluster).values() for c in chunks if c.inode_id == inode}
    assert stored == {0, far // CHUNK}  # the hole's chunks never existed


def test_truncate_down_then_write_past_the_end_reads_zeros_between(client):
    rng = np.random.default_rng(5)
    data = random_bytes(rng, 12 * CHUNK + 100)
    for cut, write_at in [(5000, 9000), (2 * CHUNK, 7 * CHUNK + 1), (1, CHUNK * STRIPE), (0, 100)]:
        write_file(client, "/t", data)
        with client.open("/t", "r+b") as f:
            assert f.truncate(cut) == cut
            assert client.stat("/t").size == cut
            f.pwrite(b"xyz", write_at)
        expected = data[:cut] + bytes(write_at - cut) + b"xyz"
        assert client.stat("/t").size == len(expected)
        assert read_all(client, "/t") == expected, (cut, write_at)
    # truncate up extends with zeros; truncate() without an argument cuts at the position
    with client.open("/t", "r+b") as f:
        f.truncate(3 * CHUNK)
        f.seek(CHUNK + 1)
        f.truncate()
    assert read_all(client, "/t") == bytes(100) + b"xyz" + bytes(CHUNK + 1 - 103)


def test_append_and_read_write_modes(client):
    rng = np.random.default_rng(6)
    a, b, c = (random_bytes(rng, n) for n in (CHUNK - 10, 2 * CHUNK + 7, 5))
    with client.open("/log", "ab") as f:  # creates
        f.write(a)
        f.seek(0)
        f.write(b)  # append mode writes at the end whatever the position
    with client.open("/log", "ab") as f:
        assert f.tell() == len(a + b)
        f.write(c)
    assert read_all(client, "/log") == a + b + c
    with client.open("/log", "a+b") as f:
        f.write(b"!")
        assert f.pread(3, len(a + b + c) - 2) == (a + b + c)[-2:] + b"!"
    with client.open("/log", "r+b") as f:  # neither truncates nor appends
        assert f.read(4) == a[:4]
        f.write(b"MID")
        f.seek(0)
        assert f.read() == a[:4] + b"MID" + (a + b + c)[7:] + b"!"
    with client.open("/log", "w+b") as f:  # truncates
        assert f.read() == b""
        f.write(b"new")
        f.seek(0)
        assert f.read() == b"new"
    assert read_all(client, "/log") == b"new"
    assert client.stat("/log").size == 3


def test_stat_size_exact_after_close_and_fsync(cluster, client):
    other = cluster.client()
    try:
        with client.open("/s", "wb") as f:
            f.write(bytes(3 * CHUNK + 5))
            f.fsync()
            assert client.stat("/s").size == 3 * CHUNK + 5
            assert other.stat("/s").size == 3 * CHUNK + 5  # another client sees it while still open
            f.pwrite(b"z", 10 * CHUNK)
            f.fsync()
            assert other.stat("/s").size == 10 * CHUNK + 1
            with other.open("/s", "rb") as reader:  # a reader of the open file sees the synced bytes
                assert reader.pread(2, 10 * CHUNK - 1) == b"\0z"
        assert other.stat("/s").size == 10 * CHUNK + 1
        with client.open("/s", "wb") as f:
            f.write(b"abc")
        assert other.stat("/s").size == 3
        with other.open("/s", "r+b") as f:  # a shorter write does not shrink the file
            f.pwrite(b"Z", 0)
        assert client.stat("/s").size == 3 and read_all(client, "/s") == b"Zbc"
    finally:
        other.close()


def test_modes_and_errors(client):
    client.makedirs("/d")
    write_file(client, "/d/f", b"data")
    with pytest.raises(FileExistsError):
        client.open("/d/f", "xb")
    with pytest.raises(FileNotFoundError):
        client.open("/d/missing", "rb")
    with pytest.raises(FileNotFoundError):
        client.open("/nowhere/f", "wb")
    for mode in ("rb", "wb", "r+b", "ab"):
        with pytest.raises(IsADirectoryError):
            client.open("/d", mode)
    with pytest.raises(ValueError, match="mode"):
        client.open("/d/f", "r")
    with client.open("/d/f", "rb") as f:
        for op in (lambda: f.write(b"x"), lambda: f.pwrite(b"x", 0), lambda: f.truncate(0), f.fsync):
            with pytest.raises(io.UnsupportedOperation):
                op()
    with client.open("/d/new", "xb") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.read()
        f.write(b"x")
    f = client.open("/d/f", "rb")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.read()
    assert read_all(client, "/d/f") == b"data" and read_all(client, "/d/new") == b"x"


# -- placement and replication ----------------------------------------------------------------------------

def test_striped_chunks_live_on_their_chains_with_identical_replicas(cluster, client):
    rng = np.random.default_rng(8)
    data = random_bytes(rng, 7 * STRIPE * CHUNK + 123)
    write_file(client, "/striped", data)
    inode = cluster.meta.stat("/striped")
    layout = inode.layout
    chains = cluster.manager.routing().chain_table.chains
    assert layout.stripe_size == STRIPE and len(set(layout.chains)) == STRIPE and set(layout.chains) <= set(chains)
    assert layout.chunk_size == CHUNK
    contents = replica_contents(cluster)
    expected = expected_chunks(data)
    for index, chunk in expected.items():
        chunk_id = ChunkId(inode.inode_id, index)
        holders = [t for t, chunks in contents.items() if chunk_id in chunks]
        chain = chains[layout.chain_of_chunk(index)]
        assert sorted(holders) == sorted(chain.targets) and len(holders) == SHAPE.replicas, (index, holders)
        assert {contents[t][chunk_id] for t in holders} == {chunk}
        # the replicas sit on distinct nodes, one content file each
        assert len({t // 100 for t in holders}) == SHAPE.replicas
    assert len(chunk_files_on_disk(cluster.root, inode.inode_id)) == SHAPE.replicas * len(expected)
    per_chain = {c: sum(1 for i in expected if layout.chain_of_chunk(i) == c) for c in layout.chains}
    assert sorted(per_chain.values()) == [7, 7, 8]  # round-robin over the stripe
    assert_chains_consistent(cluster)


# -- USRBIO ---------------------------------------------------------------------------------------------

def test_ioring_batched_reads_equal_one_at_a_time_reads(client):
    rng = np.random.default_rng(9)
    content = random_bytes(rng, 20 * CHUNK + 11)
    write_file(client, "/big", content)
    sizes = [int(n) for n in rng.integers(0, 3 * CHUNK, size=24)]
    offsets = [int(o) for o in rng.integers(0, len(content), size=24)]
    offsets[0] = len(content) - 100  # a short read at the end
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    with client.open("/big", "rb") as f, client.iovec(sum(sizes) + 1) as iov, \
            client.ioring(32, for_read=True) as ring:
        assert isinstance(iov, IoVec) and isinstance(ring, IoRing)
        indices = [ring.prepare(iov[s:s + n], True, f, o, userdata=i)
                   for i, (s, n, o) in enumerate(zip(starts, sizes, offsets))]
        done = ring.submit().wait()
        assert sorted(c.index for c in done) == sorted(indices)
        for c in done:
            i = c.userdata
            expected = f.pread(sizes[i], offsets[i])
            assert c.result == len(expected) and bytes(iov[starts[i]:starts[i] + c.result]) == expected
        assert next(c for c in done if c.userdata == 0).result == min(sizes[0], 100)


def test_ioring_batched_writes_equal_one_at_a_time_writes(client):
    rng = np.random.default_rng(10)
    pieces = [random_bytes(rng, int(n)) for n in rng.integers(1, 2 * CHUNK, size=16)]
    gaps = rng.integers(0, CHUNK, size=16)
    offsets, position = [], 0
    for piece, gap in zip(pieces, gaps):  # disjoint ranges, so completion order cannot matter
        offsets.append(position + int(gap))
        position = offsets[-1] + len(piece)
    with client.open("/batched", "wb") as f, IoVec(sum(map(len, pieces))) as iov, \
            IoRing(16, for_read=False, io_depth=-5) as ring:
        at = 0
        for i, piece in enumerate(pieces):
            memoryview(iov)[at:at + len(piece)] = piece
            ring.prepare(iov[at:at + len(piece)], False, f, offsets[i], userdata=i)
            at += len(piece)
        done = ring.submit().wait()
        assert ring.issued_batches == [5, 5, 5, 1]
        assert sorted(c.userdata for c in done) == list(range(16))
        assert all(c.result == len(pieces[c.userdata]) for c in done)
    with client.open("/sequential", "wb") as f:
        for piece, offset in zip(pieces, offsets):
            f.pwrite(piece, offset)
    assert read_all(client, "/batched") == read_all(client, "/sequential")
    assert client.stat("/batched").size == client.stat("/sequential").size == position
    # failures come back as -errno: a write ring over a read-only file
    with client.open("/batched", "rb") as f, IoVec(8) as iov, IoRing(1, for_read=False) as ring:
        ring.prepare(iov, False, f, 0)
        assert ring.submit().wait()[0].result == -errno.EBADF
