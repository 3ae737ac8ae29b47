"""storage.threefs cluster behaviour through the client: namespace operations and garbage collection,
fsspec/polars/pyarrow, connect(), a whole-cluster restart, checksum repair, a stopped node and its
resync. Fixtures are in threefs_client_fixtures."""

from __future__ import annotations

import errno
import os
import time

import fsspec
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.threefs.storage.block_checksums import content_checksum
from storage.threefs.storage.chunk_id import ChunkId
from storage.threefs.client.client import Client
from storage.threefs.cluster import ClusterShape, EmbeddedCluster
from storage.threefs.client.fsspec_fs import ThreeFSFileSystem
from storage.threefs.connect import EMBEDDED, connect
from storage.threefs.client.mount import MountClient
from storage.threefs.mgmtd.routing import TargetState

from threefs_client_fixtures import (CHUNK, SHAPE, assert_chains_consistent, chunk_files_on_disk,
                                     expected_chunks, patched, random_bytes, read_all, replica_contents,
                                     write_file)
from threefs_client_fixtures import client, cluster  # noqa: F401 - pytest fixtures


# -- namespace and garbage collection ---------------------------------------------------------------------

def test_namespace_ops_and_garbage_collection(cluster, client):
    rng = np.random.default_rng(7)
    client.makedirs("/a/b/c")
    client.makedirs("/a/b/c")  # exist_ok
    with pytest.raises(FileExistsError):
        client.makedirs("/a/b", exist_ok=False)
    files = {f"/a/b/c/f{i}": random_bytes(rng, int(rng.integers(1, 5 * CHUNK))) for i in range(3)}
    files["/a/top"] = random_bytes(rng, 4 * CHUNK)
    for path, data in files.items():
        write_file(client, path, data)
    assert client.listdir("/a") == ["b", "top"]
    assert client.listdir("/a/b/c") == ["f0", "f1", "f2"]
    assert client.exists("/a/b/c/f1") and not client.exists("/a/b/c/f9")
    assert client.stat("/a/b").type == "directory"
    inodes = {path: client.stat(path).inode_id for path in files}
    for path, inode in inodes.items():
        assert len(chunk_files_on_disk(cluster.root, inode)) == 3 * -(-len(files[path]) // CHUNK)

    # rename replaces an existing file atomically; the replaced file's chunks are collected in the background
    client.rename("/a/b/c/f0", "/a/top")
    assert read_all(client, "/a/top") == files["/a/b/c/f0"]
    assert not client.exists("/a/b/c/f0")
    assert client.stat("/a/top").inode_id == inodes["/a/b/c/f0"]
    _wait_for(lambda: chunk_files_on_disk(cluster.root, inodes["/a/top"]) == [], 5, "the replaced file's collection")
    with pytest.raises(OSError) as info:
        client.rename("/a/b", "/a/b/c/inside")
    assert info.value.errno == errno.EINVAL
    client.rename("/a/b/c", "/a/moved")  # a directory with its files
    assert client.listdir("/a/moved") == ["f1", "f2"]
    assert read_all(client, "/a/moved/f2") == files["/a/b/c/f2"]

    with pytest.raises(OSError) as info:
        client.remove("/a")
    assert info.value.errno == errno.ENOTEMPTY
    client.remove("/a/moved/f1")
    _wait_for(lambda: chunk_files_on_disk(cluster.root, inodes["/a/b/c/f1"]) == [], 5, "f1's collection")
    client.remove("/a", recursive=True)
    assert client.listdir("/") == [] and not client.exists("/a")
    _wait_for(lambda: all(chunk_files_on_disk(cluster.root, i) == [] for i in inodes.values()), 5,
              "the tree's collection")
    assert all(not chunks for chunks in replica_contents(cluster).values())
    with pytest.raises(FileNotFoundError):
        client.remove("/a")


def test_a_removed_file_open_for_writing_keeps_its_chunks_until_closed(cluster, client):
    f = client.open("/open", "wb")
    f.write(bytes(range(256)) * 40)
    inode = f.inode_id
    client.remove("/open")
    assert not client.exists("/open")
    f.write(b"more")  # the writer keeps working on the orphan
    assert len(chunk_files_on_disk(cluster.root, inode)) == 3 * 3
    f.close()
    client.collect_garbage()  # now (the background collector may have been first)
    assert chunk_files_on_disk(cluster.root, inode) == [] and cluster.meta.garbage() == []


# -- fsspec, polars, pyarrow ------------------------------------------------------------------------------

def _frame(n: int = 3000) -> pl.DataFrame:
    rng = np.random.default_rng(11)
    return pl.DataFrame({
        "id": np.arange(n, dtype=np.int64),
        "x": rng.standard_normal(n),
        "name": [f"row-{i}" if i % 7 else None for i in range(n)],
    })


def test_fsspec_url_polars_parquet_round_trip(tmp_path):
    root = tmp_path / "fs-cluster"
    ClusterShape.load_or_create(root, SHAPE)  # small chunks for the cluster the URL opens
    fs = fsspec.filesystem("3fs", url=f"3fs+embedded://{root}")
    assert isinstance(fs, ThreeFSFileSystem)
    try:
        frame = _frame()
        with fs.open("/tables/frame.parquet", "wb") as f:
            frame.write_parquet(f)
        size = fs.info("/tables/frame.parquet")["size"]
        assert size > 3 * CHUNK  # spans chunks and stripes
        with fs.open("/tables/frame.parquet", "rb") as f:
            assert_frame_equal(pl.read_parquet(f), frame)
        assert fs.ls("/tables", detail=False) == ["/tables/frame.parquet"]
        assert fs.cat_file("/tables/frame.parquet", start=0, end=4) == b"PAR1"
        fs.mv("/tables/frame.parquet", "/tables/renamed.parquet")
        assert_frame_equal(pl.read_parquet(fs.open("/tables/renamed.parquet", "rb")), frame)
        fs.rm("/tables", recursive=True)
        assert not fs.exists("/tables")
    finally:
        fs.client.close()
    assert root.resolve() not in EMBEDDED._open


def test_fsspec_client_pyarrow_filesystem_round_trip(client):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs = fsspec.filesystem("3fs", client=client)
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    table = _frame().to_arrow()
    arrow_fs.create_dir("arrow/nested")
    pq.write_table(table, "arrow/nested/t.parquet", filesystem=arrow_fs)
    assert pq.read_table("arrow/nested/t.parquet", filesystem=arrow_fs).equals(table)
    info = arrow_fs.get_file_info("arrow/nested/t.parquet")
    assert info.type == pa.fs.FileType.File and info.size == client.stat("/arrow/nested/t.parquet").size
    arrow_fs.delete_dir("arrow")
    assert not client.exists("/arrow")


# -- connect() --------------------------------------------------------------------------------------------

def test_connect_embedded_shares_one_cluster_and_closes_it_after_the_last_client(tmp_path):
    root = tmp_path / "shared"
    ClusterShape.load_or_create(root, SHAPE)
    first = connect(f"3fs+embedded://{root}")
    second = connect(f"3fs+embedded://localhost{root}")
    assert isinstance(first, Client) and isinstance(second, Client)
    cluster, users = EMBEDDED._open[root.resolve()]
    assert users == 2 and first.meta is second.meta is cluster.meta
    write_file(first, "/x", b"shared" * 2000)
    assert read_all(second, "/x") == b"shared" * 2000
    first.close()
    first.close()  # idempotent: releases once
    assert EMBEDDED._open[root.resolve()][1] == 1
    assert not cluster._closing.is_set()
    assert read_all(second, "/x") == b"shared" * 2000
    second.close()
    assert root.resolve() not in EMBEDDED._open
    assert cluster._closing.is_set()
    third = connect(f"3fs+embedded://{root}")  # a fresh cluster on the same directory
    try:
        assert EMBEDDED._open[root.resolve()][0] is not cluster
        assert read_all(third, "/x") == b"shared" * 2000
    finally:
        third.close()


@pytest.mark.parametrize("url", ["/tmp/plain-path", "3fs+embedded://host/tmp/x", "3fs+tcp://relative",
                                 "http:///tmp/x", "3fs:relative", "3fs://", "s3://bucket/key"])
def test_connect_rejects_bad_urls_naming_them(url):
    with pytest.raises(ValueError) as info:
        connect(url)
    assert repr(url) in str(info.value) and "url" in str(info.value)


def test_connect_mount_url_gives_a_mount_client(tmp_path):
    client = connect(f"3fs://{tmp_path}")
    assert isinstance(client, MountClient) and client.mount_point == os.path.realpath(tmp_path)
    write_file(client, "/m", b"on the mount")
    assert (tmp_path / "m").read_bytes() == b"on the mount"


# -- durability and recovery ------------------------------------------------------------------------------

def test_whole_cluster_restart_keeps_every_byte(tmp_path):
    rng = np.random.default_rng(12)
    root = tmp_path / "restart"
    files = {f"/r/{i}": random_bytes(rng, int(rng.integers(0, 6 * CHUNK))) for i in range(6)}
    with EmbeddedCluster(root, SHAPE) as cluster, cluster.client() as client:
        client.makedirs("/r")
        for path, data in files.items():
            write_file(client, path, data)
        with client.open("/r/sparse", "wb") as f:
            f.pwrite(b"end", 9 * CHUNK)
        files["/r/sparse"] = bytes(9 * CHUNK) + b"end"
        with client.open("/r/0", "r+b") as f:
            f.truncate(100)
        files["/r/0"] = files["/r/0"][:100]
        before = assert_chains_consistent(cluster)
    with EmbeddedCluster(root) as cluster, cluster.client() as client:  # the shape comes from disk
        assert cluster.shape == SHAPE
        assert sorted(client.listdir("/r")) == sorted(p.rsplit("/", 1)[1] for p in files)
        for path, data in files.items():
            assert client.stat(path).size == len(data)
            assert read_all(client, path) == data, path
        assert assert_chains_consistent(cluster) == before
        write_file(client, "/r/after", b"still writable")
        assert read_all(client, "/r/after") == b"still writable"
    with pytest.raises(ValueError, match="shape"):
        EmbeddedCluster(root, ClusterShape(chunk_size=8192))


def _replica_of(cluster: EmbeddedCluster, chain_id: int, position: int, chunk_id: ChunkId):
    target = cluster.manager.routing().chain(chain_id).targets[position]
    store = cluster.services[target // 100].store(target)
    return target, store, store.content_path(chunk_id)


def test_checksum_damage_is_read_around_and_repaired(cluster, client):
    rng = np.random.default_rng(13)
    data = random_bytes(rng, 3 * CHUNK)
    write_file(client, "/c", data)
    inode = client.stat("/c").inode_id
    layout = cluster.meta.stat("/c").layout
    chunk_id = ChunkId(inode, 1)
    chain_id = layout.chain_of_chunk(1)
    target, store, path = _replica_of(cluster, chain_id, 1, chunk_id)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))  # bit rot in one replica's content file
    for _ in range(2 * SHAPE.replicas):  # reads rotate over the replicas: the damaged one is among them
        with client.open("/c", "rb") as f:
            assert f.pread(CHUNK, CHUNK) == data[CHUNK:2 * CHUNK]
        if store.content_path(chunk_id) != path:
            break
    repaired = store.content_path(chunk_id)
    assert repaired != path and not path.exists(), "the damaged replica was not replaced"
    assert repaired.read_bytes() == data[CHUNK:2 * CHUNK]
    assert content_checksum(repaired.read_bytes()) == store.meta(chunk_id).checksum
    assert read_all(client, "/c") == data
    assert_chains_consistent(cluster)


def test_checksum_damage_under_a_partial_write_is_repaired_first(cluster, client):
    data = bytes(range(256)) * (2 * CHUNK // 256)
    write_file(client, "/w", data)
    chunk_id = ChunkId(client.stat("/w").inode_id, 0)
    chain_id = cluster.meta.stat("/w").layout.chain_of_chunk(0)
    for position in range(SHAPE.replicas):  # damage every replica but one, head first
        if position == SHAPE.replicas - 1:
            break
        _, _, path = _replica_of(cluster, chain_id, position, chunk_id)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
    with client.open("/w", "r+b") as f:  # the write builds on the committed bytes: they must be repaired
        f.pwrite(b"PATCH", 10)
    expected = data[:10] + b"PATCH" + data[15:]
    assert read_all(client, "/w") == expected
    per_chain = assert_chains_consistent(cluster)
    assert per_chain[chain_id][chunk_id] == expected[:CHUNK]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_stopped_node_then_resync(cluster, client):
    rng = np.random.default_rng(14)
    old = {f"/old/{i}": random_bytes(rng, int(rng.integers(1, 6 * CHUNK))) for i in range(4)}
    client.makedirs("/old")
    for path, data in old.items():
        write_file(client, path, data)
    doomed_inode = client.stat("/old/3").inode_id
    down = 2
    down_targets = cluster.shape.targets()[down]
    cluster.stop_node(down)

    # writes and reads continue while the node is down
    new = {f"/new/{i}": random_bytes(rng, int(rng.integers(1, 6 * CHUNK))) for i in range(4)}
    client.makedirs("/new")
    for path, data in new.items():
        write_file(client, path, data)
    _wait_for(lambda: all(cluster.manager.routing().target_states[t] is TargetState.OFFLINE
                          for t in down_targets), 10, f"node {down}'s targets to go offline")
    states = cluster.manager.routing().target_states
    assert all(s is TargetState.SERVING for t, s in states.items() if t not in down_targets), states
    for chain in cluster.manager.routing().chain_table.chains.values():
        assert chain.targets[-1] in down_targets  # offline targets move to the chain's end
    for path, data in {**old, **new}.items():
        assert read_all(client, path) == data
    with client.open("/old/0", "r+b") as f:  # overwrite part of a file the node holds an old copy of
        f.pwrite(b"X" * (CHUNK + 10), CHUNK - 5)
    old["/old/0"] = patched(old["/old/0"], CHUNK - 5, b"X" * (CHUNK + 10))
    with client.open("/old/1", "r+b") as f:  # and truncate one
        f.truncate(CHUNK + 1)
    old["/old/1"] = old["/old/1"][:CHUNK + 1]
    old["/old/2"] = random_bytes(rng, 2 * CHUNK + 1)  # rewritten: same inode, chunk versions start again
    write_file(client, "/old/2", old["/old/2"])
    client.remove("/old/3")  # removed while the node is down: its chunks stay there for now
    del old["/old/3"]
    on_down_node = [p for p in chunk_files_on_disk(cluster.root, doomed_inode) if f"node-{down}" in str(p)]
    _wait_for(lambda: chunk_files_on_disk(cluster.root, doomed_inode) == on_down_node, 5,
              "collection on the live nodes")
    assert on_down_node

    cluster.start_node(down)
    cluster.wait_until_serving(30)
    assert chunk_files_on_disk(cluster.root, doomed_inode) == []  # resync removed them
    per_chain = assert_chains_consistent(cluster)
    contents = replica_contents(cluster)
    for path, data in {**old, **new}.items():
        assert read_all(client, path) == data, path
        inode = client.stat(path).inode_id
        layout = cluster.meta.stat(path).layout
        for index, chunk in expected_chunks(data).items():
            chain = cluster.manager.routing().chain(layout.chain_of_chunk(index))
            down_target = next(t for t in chain.targets if t in down_targets)
            assert contents[down_target][ChunkId(inode, index)] == chunk, (path, index)
            assert per_chain[chain.chain_id][ChunkId(inode, index)] == chunk
    # the node serves again: stop another one and read everything through the resynced replicas
    cluster.stop_node(3)
    _wait_for(lambda: all(cluster.manager.routing().target_states[t] is TargetState.OFFLINE
                          for t in cluster.shape.targets()[3]), 10, "node 3's targets to go offline")
    for path, data in {**old, **new}.items():
        assert read_all(client, path) == data, path
    cluster.start_node(3)
    cluster.wait_until_serving(30)


def test_writes_during_a_resync_reach_the_syncing_target_as_whole_chunks(tmp_path):
    """Heartbeats by hand, so the syncing window stays open: a returning node's targets take every write
    as a full-chunk replace (they may have missed earlier versions) before its predecessors copy the
    rest, and serve no reads until sync-done."""
    rng = np.random.default_rng(15)
    with EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=None) as cluster, cluster.client() as client:
        files = {"/a": random_bytes(rng, 6 * CHUNK), "/b": random_bytes(rng, 3 * CHUNK + 9)}
        write_file(client, "/a", files["/a"])
        down = 2
        down_targets = cluster.shape.targets()[down]
        cluster.stop_node(down)
        for target in down_targets:  # what mgmtd does once the node's heartbeats stop
            cluster.manager.mark_offline(target)
        with client.open("/a", "r+b") as f:  # the node misses a version of these chunks
            f.pwrite(b"1" * (2 * CHUNK), CHUNK // 2)
        files["/a"] = patched(files["/a"], CHUNK // 2, b"1" * (2 * CHUNK))
        write_file(client, "/b", files["/b"])

        cluster.start_node(down)
        cluster.services[down].tick(cluster.manager)  # its heartbeat: back online, so syncing
        states = cluster.manager.routing().target_states
        assert all(states[t] is TargetState.SYNCING for t in down_targets), states

        # partial writes while it syncs: to chunks it holds stale, lacks, and of a new file
        with client.open("/a", "r+b") as f:
            f.pwrite(b"2" * 10, CHUNK + 100)
        files["/a"] = patched(files["/a"], CHUNK + 100, b"2" * 10)
        with client.open("/b", "r+b") as f:
            f.pwrite(b"3" * 5, 2 * CHUNK + 1)
        files["/b"] = patched(files["/b"], 2 * CHUNK + 1, b"3" * 5)
        files["/c"] = random_bytes(rng, 2 * CHUNK)
        write_file(client, "/c", files["/c"])
        touched = {("/a", 1), ("/b", 2), ("/c", 0), ("/c", 1)}
        contents = replica_contents(cluster)
        for path, index in touched:  # already whole and current on the syncing target, before any resync
            inode = cluster.meta.stat(path)
            chain = cluster.manager.routing().chain(inode.layout.chain_of_chunk(index))
            syncing = next(t for t in chain.targets if t in down_targets)
            assert contents[syncing][ChunkId(inode.inode_id, index)] == \
                files[path][index * CHUNK:(index + 1) * CHUNK], (path, index)
        for path, data in files.items():  # reads come from serving replicas only
            assert read_all(client, path) == data

        cluster.wait_until_serving(30)  # ticks: the predecessors copy the rest, then sync-done
        assert_chains_consistent(cluster)
        for path, data in files.items():
            assert read_all(client, path) == data
