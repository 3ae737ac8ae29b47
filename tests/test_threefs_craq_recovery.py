"""3FS CRAQ recovery in one process: checksum repair from a replica, a node dying and resyncing, a live
target marked offline, lastsrv, and the resync rules. The cluster fixture is in threefs_storage_fixtures."""

from __future__ import annotations

import errno
import random

import pytest

from storage.threefs.storage.chunk_store import ChunkId, ChunkMeta
from storage.threefs.errors import ChecksumError, NoIntactReplica, TargetNotServing
from storage.threefs.storage.resync import REMOVE, SKIP, TRANSFER, chunk_action
from storage.threefs.mgmtd.routing import LocalState, TargetState

from threefs_storage_fixtures import apply_model, assert_replicas_identical
from threefs_storage_fixtures import cluster  # noqa: F401 - a pytest fixture


def test_checksum_failure_repairs_from_replica(cluster):
    routing = cluster.manager.routing()
    chain_id, chunk = 2, ChunkId(11, 3)
    data = random.Random(2).randbytes(50_000)
    cluster.write(chain_id, chunk, 0, data)
    victim = routing.chain(chain_id).targets[1]
    store = cluster.store(victim)
    path = store.content_path(chunk)
    raw = bytearray(path.read_bytes())
    raw[12345] ^= 0x01  # block 3: bytes [12288, 16384)
    path.write_bytes(bytes(raw))
    assert store.read(chunk, 0, 12288) == data[:12288]  # the intact blocks before it
    assert store.read(chunk, 16384, 100) == data[16384:16484]  # and after it
    with pytest.raises(ChecksumError, match="block 3"):
        store.read(chunk, 12340, 10)
    with pytest.raises(ChecksumError, match="block 3"):  # a whole-chunk read (repair, resync source)
        cluster.services[routing.target_node[victim]].read_chunk(victim, chunk)
    assert cluster.read(chain_id, victim, chunk, 0, 4096) == data[:4096]  # intact: no repair needed
    assert store.content_path(chunk) == path
    assert cluster.read(chain_id, victim, chunk, 12000, 1000) == data[12000:13000]  # overlaps: repaired
    assert cluster.store(victim).read(chunk, 0, 1 << 20) == data  # repaired on disk
    assert cluster.store(victim).content_path(chunk) != path
    assert cluster.read(chain_id, victim, chunk) == data

    for target in routing.chain(chain_id).targets:  # every replica damaged: no silent wrong answer
        p = cluster.store(target).content_path(chunk)
        p.write_bytes(b"\0" + p.read_bytes()[1:])
    with pytest.raises(NoIntactReplica, match="no other replica") as info:  # EIO: not worth retrying
        cluster.read(chain_id, victim, chunk)
    assert info.value.errno == errno.EIO


def test_node_dies_and_resyncs(cluster):
    rng = random.Random(3)
    dead = 2
    chain_id = cluster.chain_with_middle_on(dead)
    other_chain = 3 - chain_id
    routing = cluster.manager.routing()
    victim = routing.chain(chain_id).targets[1]
    version_before = routing.chain(chain_id).version
    models: dict[tuple[int, ChunkId], bytearray] = {}

    def write(chain: int, chunk: ChunkId, offset: int, data: bytes) -> None:
        cluster.write(chain, chunk, offset, data)
        apply_model(models.setdefault((chain, chunk), bytearray()), offset, data)

    for i in range(4):
        write(chain_id, ChunkId(20, i), 0, rng.randbytes(3000))
        write(other_chain, ChunkId(21, i), 0, rng.randbytes(3000))
    write(chain_id, ChunkId(22, 0), 0, b"to be removed")
    cluster.kill(dead)

    # Writes keep succeeding: the head reports its dead successor and forwards to the tail.
    write(chain_id, ChunkId(20, 0), 100, b"after the failure")
    routing = cluster.manager.routing()
    assert routing.target_states[victim] is TargetState.OFFLINE
    assert routing.chain(chain_id).targets[-1] == victim
    assert routing.chain(chain_id).version == version_before + 1
    # The other chain's target on the dead node goes offline by heartbeat timeout.
    cluster.fail_silent_nodes()
    routing = cluster.manager.routing()
    assert all(routing.target_states[t] is TargetState.OFFLINE for t in cluster.node_targets[dead])
    for i in range(4):
        write(chain_id, ChunkId(20, i), rng.randint(0, 4000), rng.randbytes(2000))
        write(other_chain, ChunkId(21, i), rng.randint(0, 4000), rng.randbytes(2000))
    write(chain_id, ChunkId(23, 0), 0, b"new while down")
    assert cluster.services[1].remove_chunks(chain_id, 22) == 1  # the dead replica still holds it
    del models[(chain_id, ChunkId(22, 0))]

    # The node restarts: its targets become syncing and take writes as full-chunk replaces.
    cluster.restart(dead)
    cluster.services[dead].tick(cluster.manager)
    routing = cluster.manager.routing()
    assert [routing.target_states[t] for t in cluster.node_targets[dead]] == [TargetState.SYNCING] * 2
    assert routing.write_path(chain_id)[-1] == victim and victim not in routing.readable_targets(chain_id)
    with pytest.raises(TargetNotServing, match="syncing"):
        cluster.read(chain_id, victim, ChunkId(20, 1))
    write(chain_id, ChunkId(20, 1), 10, b"partial write while syncing")
    head = routing.write_path(chain_id)[0]
    assert cluster.store(victim).meta(ChunkId(20, 1)) == cluster.store(head).meta(ChunkId(20, 1))
    assert cluster.store(victim).read(ChunkId(20, 1), 0, 1 << 20) == bytes(models[(chain_id, ChunkId(20, 1))])

    # The predecessors resync on their next heartbeat; the targets serve again.
    reports = {r.target_id: r for r in cluster.tick()}
    assert set(reports) == set(cluster.node_targets[dead]) and not any(r.error for r in reports.values())
    assert reports[victim].removed == 1 and reports[victim].transferred >= 4  # 20/0, 20/2, 20/3, 23/0
    routing = cluster.manager.routing()
    assert all(routing.target_states[t] is TargetState.SERVING for t in routing.target_states)
    for chain in (chain_id, other_chain):
        assert_replicas_identical(cluster, chain)
        for (c, chunk), model in models.items():
            if c == chain:
                for target in routing.readable_targets(chain):
                    assert cluster.read(chain, target, chunk) == bytes(model)
    assert not any(r for r in cluster.tick())  # nothing left to sync


def test_live_target_marked_offline_stops_serving_and_resyncs(cluster):
    """A predecessor that cannot reach a live successor has it marked offline: the service stops
    serving that target at once and brings it back only through a resync."""
    routing = cluster.manager.routing()
    chain_id, chunk = 1, ChunkId(40, 0)
    cluster.write(chain_id, chunk, 0, b"before")
    tail = routing.chain(chain_id).targets[-1]
    node = routing.target_node[tail]
    cluster.manager.mark_offline(tail)
    with pytest.raises(TargetNotServing, match="offline"):
        cluster.read(chain_id, tail, chunk)
    assert cluster.services[node].local_states()[tail] is LocalState.ONLINE
    cluster.write(chain_id, chunk, 2, b"AFTER")
    assert cluster.store(tail).read(chunk, 0, 100) == b"before"  # no longer on the write path
    cluster.services[node].tick(cluster.manager)
    assert cluster.manager.routing().target_states[tail] is TargetState.SYNCING
    (report,) = cluster.tick()
    assert report.target_id == tail and report.transferred == 1 and report.error is None
    assert cluster.manager.routing().target_states[tail] is TargetState.SERVING
    assert cluster.read(chain_id, tail, chunk) == b"beAFTER"
    assert cluster.services[node].local_states()[tail] is LocalState.UPTODATE


def test_lastsrv_when_all_others_fail(cluster):
    routing = cluster.manager.routing()
    chain_id = 1
    first, second, third = (routing.target_node[t] for t in routing.chain(chain_id).targets)
    chunk = ChunkId(30, 0)
    cluster.write(chain_id, chunk, 0, b"v1")
    cluster.kill(second)
    cluster.kill(third)
    cluster.fail_silent_nodes()
    cluster.write(chain_id, chunk, 0, b"v2 on the last replica standing")
    survivor = routing.chain(chain_id).targets[0]
    assert cluster.manager.routing().write_path(chain_id) == (survivor,)
    cluster.kill(first)
    cluster.fail_silent_nodes()
    routing = cluster.manager.routing()
    assert routing.target_states[survivor] is TargetState.LASTSRV
    assert [routing.target_states[t] for t in routing.chain(chain_id).targets[1:]] == [TargetState.OFFLINE] * 2

    cluster.restart(second)  # it cannot sync from a lastsrv predecessor: it waits
    cluster.tick()
    routing = cluster.manager.routing()
    second_target = cluster.manager.routing().chain(chain_id).targets[1]
    assert routing.target_node[second_target] == second
    assert routing.target_states[second_target] is TargetState.WAITING
    cluster.restart(first)  # the chain comes back through its last serving target
    cluster.tick()  # first serves again, second starts syncing
    cluster.restart(third)
    for _ in range(3):
        cluster.tick()
    routing = cluster.manager.routing()
    assert all(routing.target_states[t] is TargetState.SERVING for t in routing.chain(chain_id).targets)
    assert_replicas_identical(cluster, chain_id)
    for target in routing.chain(chain_id).targets:
        assert cluster.read(chain_id, target, chunk) == b"v2 on the last replica standing"


def test_resync_rules():
    def m(committed: int, pending: int = 0, chain_version: int = 1) -> ChunkMeta:
        return ChunkMeta(ChunkId(1, 0), committed, pending, chain_version, 0, 0)

    assert chunk_action(m(3), None) == TRANSFER
    assert chunk_action(None, m(3)) == REMOVE
    assert chunk_action(m(3, chain_version=4), m(3, chain_version=2)) == TRANSFER
    assert chunk_action(m(3), m(2)) == TRANSFER
    assert chunk_action(m(3), m(2, pending=3)) == TRANSFER  # a leftover pending version
    assert chunk_action(m(3), m(3)) == SKIP
    assert chunk_action(None, None) == SKIP
