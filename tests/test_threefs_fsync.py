"""Durability at fsync/close (issue 15, part H): a client's ``fsync`` and the ``close`` of a file it wrote
make the writes durable on every replica of the file's write paths before they return.

Checked against the storage's own bookkeeping: with the background group commit off
(``chunk_sync_interval=0`` embedded, 60 s over processes), a written file's slot files are unsynced on
every replica until the client's fsync/close, and none are afterwards. A replica node that cannot be
reached makes fsync fail (ETIMEDOUT after the client's retry timeout) unless routing takes it out of the
chain meanwhile; close then still ends the write session and raises.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from storage.threefs.cluster import ClusterShape, EmbeddedCluster, ServerTimings
from storage.threefs.cluster.processes import ProcessCluster
from storage.threefs.cluster.servers import cluster_client
from storage.threefs.storage.chunk_id import ChunkId
from storage.threefs.storage.chunk_store import ChunkStore

CHUNK = 64 << 10
SHAPE = ClusterShape(nodes=3, targets_per_node=2, replicas=3, chunk_size=CHUNK, stripe=2)
PAYLOAD = bytes(range(256)) * (3 * CHUNK // 256) + b"tail"  # 4 chunks, both chains


def file_slot_names(inode_id: int, size: int) -> set[str]:
    """Every slot file name the file's chunks can have."""
    return {f"{ChunkId(inode_id, index).hex()}.{slot}" for index in range(-(-size // CHUNK)) for slot in (0, 1)}


def unsynced_of_file(unsynced: dict[int, tuple[list[str], bool]], inode_id: int, size: int) -> dict[int, list[str]]:
    """target -> the file's slot files it has not synced (targets with none left out)."""
    names = file_slot_names(inode_id, size)
    found = {target: sorted(set(files) & names) for target, (files, _) in unsynced.items()}
    return {target: files for target, files in found.items() if files}


def embedded_unsynced(cluster: EmbeddedCluster) -> dict[int, tuple[list[str], bool]]:
    return {target: service.unsynced(target) for service in cluster.services.values()
            for target in cluster.shape.targets()[service.node_id]}


def write_path_targets(cluster_routing, layout) -> set[int]:
    return {t for chain in set(layout.chains) for t in cluster_routing.write_path(chain)}


@pytest.fixture
def cluster(tmp_path):
    with EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=None, chunk_sync_interval=0) as c:
        yield c


def test_fsync_makes_the_file_durable_on_every_replica(cluster):
    with cluster.client() as client, client.open("/f", "wb") as f:
        f.write(PAYLOAD)
        inode = client.stat("/f").inode_id
        before = unsynced_of_file(embedded_unsynced(cluster), inode, len(PAYLOAD))
        layout = cluster.meta.stat_inode(inode).layout
        assert set(before) == write_path_targets(cluster.manager.routing(), layout)  # every replica: unsynced
        f.fsync()
        after = embedded_unsynced(cluster)
        assert unsynced_of_file(after, inode, len(PAYLOAD)) == {}
        assert not any(metadata for _, metadata in after.values())  # the commits' rows too
        f.write(b"more")  # the next write is unsynced again, until close
        assert unsynced_of_file(embedded_unsynced(cluster), inode, len(PAYLOAD) + 4)
    assert unsynced_of_file(embedded_unsynced(cluster), inode, len(PAYLOAD) + 4) == {}
    with cluster.client() as client, client.open("/f", "rb") as f:
        assert f.read() == PAYLOAD + b"more"


def test_close_of_a_written_file_makes_it_durable_on_every_replica(cluster):
    with cluster.client() as client:
        with client.open("/g", "wb") as f:
            f.write(PAYLOAD)
        inode = client.stat("/g").inode_id
    assert unsynced_of_file(embedded_unsynced(cluster), inode, len(PAYLOAD)) == {}


def test_fsync_fails_while_a_replica_node_cannot_be_reached(cluster):
    with cluster.client(retry_timeout=0.3) as client:
        f = client.open("/h", "wb")
        f.write(PAYLOAD)
        cluster.stop_node(2)  # no heartbeats run: routing keeps it on every chain's write path
        with pytest.raises(OSError) as raised:
            f.fsync()
        assert raised.value.errno == errno.ETIMEDOUT
        with pytest.raises(OSError):
            f.close()  # the sync's error, once the handle and its session are closed
        assert f.closed
        assert client.stat("/h").size == len(PAYLOAD)  # the session ended with the length reported
        cluster.start_node(2)


def test_fsync_succeeds_once_the_unreachable_node_left_the_chains(tmp_path):
    with EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=0.05, heartbeat_timeout=0.5,
                         chunk_sync_interval=0) as cluster, cluster.client(retry_timeout=10) as client:
        with client.open("/k", "wb") as f:
            f.write(PAYLOAD)
            inode = client.stat("/k").inode_id
            cluster.stop_node(3)
            started = time.monotonic()
            f.fsync()  # waits until mgmtd takes node 3 out of the chains, then the remaining replicas synced
            assert time.monotonic() - started < 5
            remaining = {t: files for t, files in unsynced_of_file(embedded_unsynced(cluster), inode,
                                                                   len(PAYLOAD)).items() if t // 100 != 3}
            assert remaining == {}


def test_a_failed_fsync_keeps_its_files_to_sync_again(tmp_path, monkeypatch):
    store = ChunkStore(tmp_path / "t", sync_interval=0)
    cid = ChunkId(7, 0)
    store.commit(cid, store.apply_write(cid, 0, b"x" * 5000, chain_version=1))

    def failing_fsync(fd):
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        store.sync()
    assert store.unsynced_files() == [f"{cid.hex()}.0"] and store.metadata_unsynced()
    monkeypatch.undo()
    assert store.sync() == 1
    assert store.unsynced_files() == [] and not store.metadata_unsynced()
    store.close()


def test_fsync_over_rpc_syncs_every_replica_and_fails_on_a_dead_node(tmp_path):
    timings = ServerTimings(heartbeat_interval=0.1, heartbeat_timeout=30.0, session_lease=30.0,
                            chunk_sync_interval=60.0)  # no group commit, and a dead node stays in the chains
    with ProcessCluster(tmp_path / "c", SHAPE, timings, mgmtd_standbys=0) as cluster, \
            cluster.client(retry_timeout=1.0) as client:
        routing = client.routing.get()
        nodes = {node: cluster_client(cluster.root, routing.node_addresses[node]) for node in SHAPE.targets()}

        def unsynced() -> dict[int, tuple[list[str], bool]]:
            return {t: tuple(nodes[node].unsynced(t)) for node, targets in SHAPE.targets().items() for t in targets}

        try:
            with client.open("/r", "wb") as f:
                f.write(PAYLOAD)
                inode = client.stat("/r").inode_id
                assert len(unsynced_of_file(unsynced(), inode, len(PAYLOAD))) == 6  # every target of both chains
                f.fsync()
                assert unsynced_of_file(unsynced(), inode, len(PAYLOAD)) == {}
                f.write(b"more")
            assert unsynced_of_file(unsynced(), inode, len(PAYLOAD) + 4) == {}  # close synced
            f = client.open("/r", "r+b")
            f.write(b"again")
            cluster.kill("storage-1")
            with pytest.raises(OSError) as raised:
                f.fsync()
            assert raised.value.errno == errno.ETIMEDOUT
            with pytest.raises(OSError):
                f.close()
        finally:
            for proxy in nodes.values():
                proxy.disconnect()
