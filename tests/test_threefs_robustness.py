"""Failure paths a review of storage.threefs found: handles that outlive their path, clients that close with
files open, garbage on a dead chain, exclusive creates that race, a directory opened by two clusters, and
the metadata server's per-thread SQLite connections."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from storage.threefs.cluster import ClusterShape, EmbeddedCluster
from storage.threefs.client.fsspec_fs import ThreeFSFileSystem
from storage.threefs.mgmtd.routing import TargetState
from storage.threefs.kv.sqlite import SqliteKV

SHAPE = ClusterShape(nodes=3, targets_per_node=1, replicas=3, chunk_size=4096, stripe=1)


@pytest.fixture
def cluster(tmp_path):
    with EmbeddedCluster(tmp_path / "cluster", SHAPE, heartbeat_interval=None) as cluster:
        yield cluster


def chunk_files(cluster, inode_id: int) -> int:
    """How many chunk copies of a file the targets hold."""
    return sum(1 for node, service in cluster.services.items() for target in cluster.shape.targets()[node]
               for meta in service.dump_chunkmeta(target) if meta.chunk_id.inode_id == inode_id)


def test_truncate_acts_on_the_open_file_wherever_it_moved(cluster):
    client = cluster.client()
    with client.open("/a", "wb") as f:
        f.write(b"x" * 10_000)
    handle = client.open("/a", "r+b")
    client.rename("/a", "/b")
    with client.open("/a", "wb") as other:
        other.write(b"y" * 5000)
    handle.truncate(100)
    handle.close()
    assert client.stat("/a").size == 5000 and client.stat("/b").size == 100
    with client.open("/a", "rb") as f:
        assert f.read() == b"y" * 5000
    client.close()


def test_closing_a_client_closes_its_files_so_removed_files_are_collected(cluster):
    writer, other = cluster.client(), cluster.client()
    f = writer.open("/f", "wb")
    f.write(os.urandom(3 * 4096))
    inode = f.inode_id
    other.remove("/f")  # the write session keeps the chunks
    assert chunk_files(cluster, inode) == 9
    writer.close()  # ends the session: the file becomes garbage
    assert f.closed and other.collect_garbage() == 1
    assert chunk_files(cluster, inode) == 0
    other.close()


def test_garbage_on_a_dead_chain_neither_fails_nor_blocks_a_remove(cluster):
    client = cluster.client()
    with client.open("/f", "wb") as f:
        f.write(os.urandom(4096))
    inode = client.stat("/f").inode_id
    head = cluster.manager.routing().write_path(cluster.meta.stat("/f").layout.chains[0])[0]
    cluster.stop_node(cluster.manager.routing().target_node[head])
    started = time.monotonic()
    client.remove("/f")  # the namespace change stands; chunk deletion is left to garbage collection
    assert time.monotonic() - started < 0.5  # no storage request (it would retry for seconds)
    assert not client.exists("/f") and [g.inode_id for g in cluster.meta.garbage()] == [inode]
    assert client.collect_garbage() == 0 and chunk_files(cluster, inode) == 3  # the chain's head is down
    cluster.start_node(cluster.manager.routing().target_node[head])
    cluster.wait_until_serving()
    client.collect_garbage()  # (wait_until_serving's heartbeat rounds may have collected it already)
    assert cluster.meta.garbage() == [] and chunk_files(cluster, inode) == 0
    client.close()


def test_fsspec_exclusive_create_stays_exclusive_when_two_writers_race(cluster):
    fs = ThreeFSFileSystem(client=cluster.client())
    first, second = fs.open("/lock", "xb"), fs.open("/lock", "xb")  # both pass the existence check
    first.write(b"winner")
    second.write(b"loser")
    first.close()
    with pytest.raises(FileExistsError):
        second.close()
    assert fs.cat_file("/lock") == b"winner" and fs.ls("/", detail=False) == ["/lock"]
    fs.client.close()


def test_rename_without_replace_and_truncate_by_inode(cluster):
    meta = cluster.meta
    client = cluster.client()
    for name in ("/a", "/b"):
        with client.open(name, "wb") as f:
            f.write(b"1234")
    with pytest.raises(FileExistsError) as info:
        meta.rename("/a", "/b", replace=False)
    assert info.value.errno == errno.EEXIST and info.value.filename == "/b"
    meta.rename("/a", "/c", replace=False)
    assert meta.truncate_inode(meta.stat("/c").inode_id, 2).length == 2
    with pytest.raises(IsADirectoryError):
        meta.truncate_inode(meta.stat("/").inode_id, 0)
    client.close()


def test_a_cluster_directory_cannot_be_opened_twice(tmp_path):
    with EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=None):
        with pytest.raises(RuntimeError, match="in use"):
            EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=None)
    EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=None).close()  # released on close


def test_sqlite_connections_of_finished_threads_are_closed(tmp_path):
    kv = SqliteKV(str(tmp_path / "kv.db"))

    def one_transaction():
        kv.transact(lambda txn: txn.set(b"k", b"v"))

    threads = [threading.Thread(target=one_transaction) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(kv._connections) <= 2  # the main thread's, and at most one not yet collected
    assert kv.transact(lambda txn: txn.get(b"k"), read_only=True) == b"v"
    kv.close()



def test_a_dead_clients_write_session_expires_and_its_removed_file_is_collected(tmp_path):
    with EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=None, session_lease=2.0) as cluster:
        dead = cluster.client(session_renew_interval=None)  # never renews, as if its process died
        alive = cluster.client(session_renew_interval=0.1)
        kept, dropped = alive.open("/kept", "wb"), dead.open("/dropped", "wb")
        kept.write(b"k" * 4096)
        dropped.write(b"d" * 4096)
        inodes = {name: alive.stat(name).inode_id for name in ("/kept", "/dropped")}
        alive.remove("/kept")
        alive.remove("/dropped")
        time.sleep(2.5)  # generous against a loaded machine: the live client renews every 0.1 s
        cluster.tick()  # the dead client's lease ran out (the round collects its file); the live one renewed
        assert chunk_files(cluster, inodes["/dropped"]) == 0 and chunk_files(cluster, inodes["/kept"]) == 3
        kept.close()
        assert alive.collect_garbage() == 1 and chunk_files(cluster, inodes["/kept"]) == 0
        dropped.close()  # its session is gone: closing still works
        dead.close()
        alive.close()
        assert cluster.meta.check_consistency() == []


def test_a_restarted_storage_node_is_resynced_even_if_mgmtd_never_noticed_it_was_gone(cluster):
    """No write and no heartbeat timeout while node 2 was down: its targets still looked serving. A
    restarted server may have lost pending versions, so it must come back through syncing."""
    client = cluster.client()
    with client.open("/f", "wb") as f:
        f.write(os.urandom(3 * 4096))
    cluster.tick()
    node_targets = cluster.shape.targets()[2]
    cluster.stop_node(2)
    cluster.start_node(2)
    states = cluster.manager.routing().target_states
    assert all(states[t] is not TargetState.SERVING for t in node_targets)
    cluster.wait_until_serving()
    with client.open("/f", "rb") as f:
        assert len(f.read()) == 3 * 4096
    client.close()
