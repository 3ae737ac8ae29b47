"""3FS CRAQ storage service in one process: writes, reads, no dirty reads, failed and lost writes,
divergence after a partial commit, idempotent re-forwards. The cluster fixture is in
threefs_storage_fixtures."""

from __future__ import annotations

import pickle
import random
import threading

import pytest

from storage.threefs.storage.block_checksums import content_checksum
from storage.threefs.storage.chunk_store import ChunkId, ChunkStore
from storage.threefs.errors import ChainVersionMismatch, ChunkDiverged, NodeUnavailable, TargetNotServing
from storage.threefs.mgmtd.routing import TargetState
from storage.threefs.storage.service import StorageService

from threefs_storage_fixtures import Cluster, apply_model, assert_replicas_identical
from threefs_storage_fixtures import cluster  # noqa: F401 - a pytest fixture


def test_write_read_round_trips(cluster):
    rng = random.Random(1)
    models: dict[tuple[int, ChunkId], bytearray] = {}
    for step in range(40):
        chain_id = rng.choice([1, 2])
        chunk = ChunkId(rng.randint(1, 3), rng.randint(0, 2))
        model = models.setdefault((chain_id, chunk), bytearray())
        offset = rng.choice([0, rng.randint(0, 5000), len(model), len(model) + rng.randint(1, 3000)])
        data = rng.randbytes(rng.choice([1, rng.randint(1, 70_000)]))
        version = cluster.write(chain_id, chunk, offset, data)
        apply_model(model, offset, data)
        head = cluster.manager.routing().chain(chain_id).targets[0]
        assert cluster.store(head).meta(chunk).committed_version == version
    for (chain_id, chunk), model in models.items():
        for target in cluster.manager.routing().readable_targets(chain_id):
            assert cluster.read(chain_id, target, chunk) == bytes(model)
            off, length = rng.randint(0, len(model) + 10), rng.randint(0, 9000)
            assert cluster.read(chain_id, target, chunk, off, length) == bytes(model[off:off + length])
        assert cluster.read(chain_id, target, ChunkId(99, 0), 0, 10) == b""  # a hole
    for chain_id in (1, 2):
        assert_replicas_identical(cluster, chain_id)


def test_write_rejects_stale_chain_version_and_non_head(cluster):
    routing = cluster.manager.routing()
    head, middle = routing.chain(1).targets[:2]
    with pytest.raises(ChainVersionMismatch, match="chain 1"):
        cluster.peer(routing.target_node[head]).write(1, routing.chain(1).version + 1, ChunkId(1, 0), 0, b"x")
    with pytest.raises(TargetNotServing, match="head of chain 1"):
        cluster.peer(routing.target_node[middle]).write(1, routing.chain(1).version, ChunkId(1, 0), 0, b"x")


def test_concurrent_writers_serialize(cluster):
    chunk = ChunkId(5, 0)
    cluster.write(1, chunk, 0, b"\xff" * 4000)
    results: list[tuple[int, int, bytes]] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(6):
            offset, data = rng.randint(0, 3000), rng.randbytes(rng.randint(1, 2000))
            version = cluster.write(1, chunk, offset, data)
            with lock:
                results.append((version, offset, data))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.sort()
    assert [v for v, _, _ in results] == list(range(2, 2 + len(results)))  # one version per write
    model = bytearray(b"\xff" * 4000)
    for _, offset, data in results:  # the serial order the head chose
        apply_model(model, offset, data)
    (meta, content), *_ = assert_replicas_identical(cluster, 1)[-1:]
    assert meta.chunk_id == chunk and meta.committed_version == 1 + len(results) and content == bytes(model)


class HoldForward:
    """Stand-in for the tail's service: holds forwarded writes before and after the tail commits."""

    def __init__(self) -> None:
        self.arrived, self.release = threading.Event(), threading.Event()
        self.tail_committed, self.release_ack = threading.Event(), threading.Event()

    def __call__(self, service: StorageService):
        hold = self

        class Proxy:
            def __getattr__(self, name):
                return getattr(service, name)

            def update(self, *args, **kwargs):
                hold.arrived.set()
                assert hold.release.wait(30)
                version = service.update(*args, **kwargs)
                hold.tail_committed.set()
                assert hold.release_ack.wait(30)
                return version

        return Proxy()


def test_no_dirty_reads(cluster):
    routing = cluster.manager.routing()
    chain_id = 1
    head, middle, tail = routing.chain(chain_id).targets
    chunk = ChunkId(9, 0)
    old, new = b"A" * 3000, b"B" * 1000
    cluster.write(chain_id, chunk, 0, old)
    hold = HoldForward()
    cluster.wrappers[routing.target_node[tail]] = hold
    writer = threading.Thread(target=cluster.write, args=(chain_id, chunk, 500, new))
    writer.start()
    try:
        assert hold.arrived.wait(30)  # head and middle hold pending version 2, the tail has not seen it
        assert cluster.store(head).meta(chunk)[1:3] == (1, 2)
        assert cluster.store(middle).meta(chunk)[1:3] == (1, 2)
        for target in (head, middle, tail):
            assert cluster.read(chain_id, target, chunk) == old
        hold.release.set()
        assert hold.tail_committed.wait(30)  # the tail committed; the ack has not reached the middle
        assert cluster.store(middle).meta(chunk)[1:3] == (1, 2)
        assert cluster.store(tail).meta(chunk)[1:3] == (2, 0)
        expected = old[:500] + new + old[1500:]
        for target in (head, middle, tail):
            assert cluster.read(chain_id, target, chunk) == expected  # dirty locally, clean at the tail
    finally:
        hold.release.set()
        hold.release_ack.set()
        writer.join()
    assert all(cluster.read(chain_id, t, chunk) == expected for t in (head, middle, tail))


def test_failed_write_leaves_committed_versions(cluster):
    """The tail fails a forwarded write (not a dead node: an error): every replica keeps its committed
    version and drops the pending one; the next write takes the next version."""
    routing = cluster.manager.routing()
    head, middle, tail = routing.chain(1).targets
    chunk = ChunkId(12, 0)
    cluster.write(1, chunk, 0, b"kept")

    class FailingTail:
        def __init__(self, service):
            self.service = service

        def __getattr__(self, name):
            return getattr(self.service, name)

        def update(self, *args, **kwargs):
            raise OSError("disk full")

    cluster.wrappers[routing.target_node[tail]] = FailingTail
    with pytest.raises(OSError, match="disk full"):
        cluster.write(1, chunk, 0, b"lost")
    for target in (head, middle, tail):
        assert cluster.store(target).meta(chunk)[1:3] == (1, 0)
        assert cluster.read(1, target, chunk) == b"kept"
    del cluster.wrappers[routing.target_node[tail]]
    assert cluster.write(1, chunk, 2, b"pt") == 2
    assert all(cluster.read(1, t, chunk) == b"kept"[:2] + b"pt" for t in (head, middle, tail))


class LoseAnswers:
    """Stand-in for a node's service: the forwarded writes (`update`) in `lost` run there, but their
    answers are lost; `unreachable` lists the other methods the caller cannot reach meanwhile."""

    def __init__(self, lost: int = 1, unreachable: tuple[str, ...] = ()) -> None:
        self.lost, self.unreachable = lost, unreachable

    def __call__(self, service: StorageService):
        lose = self

        class Proxy:
            def __getattr__(self, name):
                if name in lose.unreachable:
                    raise NodeUnavailable(f"{name}: node unreachable")
                return getattr(service, name)

            def update(self, *args, **kwargs):
                version = service.update(*args, **kwargs)
                if lose.lost:
                    lose.lost -= 1
                    raise NodeUnavailable("the answer to a forwarded write was lost")
                return version

        return Proxy()


def fail_commit_once(monkeypatch, store: ChunkStore) -> None:
    """The store's next commit fails (a full disk) after everything downstream committed."""
    real, calls = store.commit, []

    def commit(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "commit", commit)


def assert_chain_agrees(cluster: Cluster, chain_id: int, chunk: ChunkId, version: int, content: bytes) -> None:
    """Every replica committed `version` of the chunk with `content` (nothing pending), and every
    replica's reads answer it. (The chain version stored with it may differ: a re-forward that a
    replica already committed keeps the one it committed under.)"""
    expected = (version, 0, len(content), content_checksum(content), content)
    for target in cluster.manager.routing().chain(chain_id).targets:
        meta, store = cluster.store(target).meta(chunk), cluster.store(target)
        assert (meta.committed_version, meta.pending_version, meta.length, meta.checksum,
                store.read(chunk, 0, 1 << 30)) == expected, f"target {target}"
        assert cluster.read(chain_id, target, chunk) == content


@pytest.mark.parametrize("tail_answers", [True, False], ids=["tail-answers", "node-unreachable"])
def test_lost_answer_after_successors_committed(cluster, tail_answers):
    """The head's forward of B runs down the chain (middle and tail commit it) but the answer is lost
    after the head's retry window. The head must not drop B and then build a different version 2 on the
    old base (the successors would skip it as already committed: same version, other bytes). If the
    tail answers the version query, B is committed and acknowledged; if not, the head keeps B pending
    (its reads ask the tail) and the next write settles it."""
    routing = cluster.manager.routing()
    head, middle, tail = routing.chain(1).targets
    chunk = ChunkId(13, 0)
    cluster.write(1, chunk, 0, b"A" * 100)
    cluster.services[routing.target_node[head]]._retry_timeout = 0.0  # the RPC timeout outlasts the window
    cluster.wrappers[routing.target_node[middle]] = LoseAnswers()
    if not tail_answers:
        cluster.wrappers[routing.target_node[tail]] = LoseAnswers(0, unreachable=("committed_state",))
    if tail_answers:
        assert cluster.write(1, chunk, 0, b"B" * 10) == 2  # committed at the tail: acknowledged
    else:
        with pytest.raises(NodeUnavailable):
            cluster.write(1, chunk, 0, b"B" * 10)
        assert cluster.store(head).meta(chunk)[1:3] == (1, 2)  # kept: its outcome is unknown here
    cluster.wrappers.clear()
    for target in (head, middle, tail):  # B is committed at the tail: every replica answers it
        assert cluster.read(1, target, chunk) == b"B" * 10 + b"A" * 90
    assert cluster.write(1, chunk, 5, b"C" * 10) == 3
    assert_chain_agrees(cluster, 1, chunk, 3, b"B" * 5 + b"C" * 10 + b"A" * 85)


@pytest.mark.parametrize("settled_by", ["next-write", "heartbeat"])
def test_head_commit_fails_after_successors_committed(cluster, monkeypatch, settled_by):
    """The head's own commit of B fails after the middle and tail committed it: the write fails, but B
    is committed cluster-wide; the head keeps it pending and the next write (or heartbeat) commits it."""
    routing = cluster.manager.routing()
    head, middle, tail = routing.chain(1).targets
    chunk = ChunkId(14, 0)
    cluster.write(1, chunk, 0, b"A" * 100)
    fail_commit_once(monkeypatch, cluster.store(head))
    with pytest.raises(OSError, match="No space"):
        cluster.write(1, chunk, 0, b"B" * 10)
    assert [cluster.store(t).meta(chunk)[1:3] for t in (head, middle, tail)] == [(1, 2), (2, 0), (2, 0)]
    for target in (head, middle, tail):
        assert cluster.read(1, target, chunk) == b"B" * 10 + b"A" * 90
    if settled_by == "heartbeat":
        cluster.tick()
        assert_chain_agrees(cluster, 1, chunk, 2, b"B" * 10 + b"A" * 90)
    assert cluster.write(1, chunk, 5, b"C" * 10) == 3
    assert_chain_agrees(cluster, 1, chunk, 3, b"B" * 5 + b"C" * 10 + b"A" * 85)


def test_head_restart_after_successors_committed(cluster, monkeypatch):
    """The head dies after the middle and tail committed B but before it committed B itself: reopening
    its store drops the pending version, so its copy is a version behind. The next write must not build
    another version 2 on the old base: the successors reject it (ChunkDiverged), the head takes the
    tail's copy and applies the write on top of it as version 3."""
    routing = cluster.manager.routing()
    head, middle, tail = routing.chain(1).targets
    chunk = ChunkId(15, 0)
    cluster.write(1, chunk, 0, b"A" * 100)
    fail_commit_once(monkeypatch, cluster.store(head))
    with pytest.raises(OSError, match="No space"):
        cluster.write(1, chunk, 0, b"B" * 10)
    cluster.restart(routing.target_node[head])
    assert [cluster.store(t).meta(chunk)[1:3] for t in (head, middle, tail)] == [(1, 0), (2, 0), (2, 0)]
    assert cluster.write(1, chunk, 5, b"C" * 10) == 3
    assert_chain_agrees(cluster, 1, chunk, 3, b"B" * 5 + b"C" * 10 + b"A" * 85)


def test_successor_that_missed_a_version_gets_the_whole_chunk(cluster, monkeypatch):
    """The middle's commit of B fails after the tail committed it: B is committed (the tail has it), so
    the write is acknowledged. The middle keeps B pending (its reads ask the tail); the next write does
    not fit its copy, so the head sends it the whole chunk."""
    routing = cluster.manager.routing()
    head, middle, tail = routing.chain(1).targets
    chunk = ChunkId(16, 0)
    cluster.write(1, chunk, 0, b"A" * 100)
    fail_commit_once(monkeypatch, cluster.store(middle))
    assert cluster.write(1, chunk, 0, b"B" * 10) == 2
    assert [cluster.store(t).meta(chunk)[1:3] for t in (head, middle, tail)] == [(2, 0), (1, 2), (2, 0)]
    assert cluster.read(1, middle, chunk) == b"B" * 10 + b"A" * 90
    assert cluster.write(1, chunk, 5, b"C" * 10) == 3
    assert_chain_agrees(cluster, 1, chunk, 3, b"B" * 5 + b"C" * 10 + b"A" * 85)


def test_reforward_of_a_committed_write_is_idempotent(cluster):
    """A forwarded write a successor already committed (same version, same content) succeeds again and
    changes nothing; the same version with other content, or an older version, is refused (ChunkDiverged,
    carrying the successor's committed version) instead of being taken for a re-forward."""
    routing = cluster.manager.routing()
    head, middle, tail = routing.chain(1).targets
    chunk, content = ChunkId(17, 0), b"A" * 90 + b"B" * 10
    cluster.write(1, chunk, 0, b"A" * 100)
    assert cluster.write(1, chunk, 90, b"B" * 10) == 2
    chain_version = routing.chain(1).version
    service = cluster.services[routing.target_node[middle]]
    before = cluster.replica_view(1)
    assert service.update(1, chain_version, middle, chunk, 90, b"B" * 10, False, 2, content_checksum(content)) == 2
    assert cluster.replica_view(1) == before
    with pytest.raises(ChunkDiverged) as diverged:
        service.update(1, chain_version, middle, chunk, 90, b"X" * 10, False, 2, content_checksum(b"X"))
    assert diverged.value.committed_version == 2
    with pytest.raises(ChunkDiverged):
        service.update(1, chain_version, middle, chunk, 0, b"A", False, 1, content_checksum(b"A" * 100))
    assert cluster.replica_view(1) == before
    revived = pickle.loads(pickle.dumps(diverged.value))  # it crosses the wire with its version
    assert (type(revived), revived.committed_version, str(revived)) == (ChunkDiverged, 2, str(diverged.value))

    # Through the chain: the middle's answer is lost, the head marks it offline and forwards to the tail,
    # which already committed the write: it answers success, and the middle comes back by resync.
    cluster.wrappers[routing.target_node[middle]] = LoseAnswers()
    assert cluster.write(1, chunk, 0, b"C" * 10) == 3
    cluster.wrappers.clear()
    assert cluster.manager.routing().target_states[middle] is TargetState.OFFLINE
    for _ in range(3):
        cluster.tick()
    assert cluster.manager.routing().target_states[middle] is TargetState.SERVING
    assert_chain_agrees(cluster, 1, chunk, 3, b"C" * 10 + b"A" * 80 + b"B" * 10)


def test_reads_never_torn_or_backwards(cluster):
    """Readers on every replica while a writer rewrites the chunk: each read is one whole version, and a
    reader never sees an older version after a newer one (whatever replica it asks)."""
    chunk, size = ChunkId(4, 0), 20_000
    cluster.write(2, chunk, 0, bytes([1]) * size)
    targets = cluster.manager.routing().chain(2).targets
    stop, seen_problems, reads = threading.Event(), [], [0, 0]

    def reader(seed: int) -> None:
        rng, last = random.Random(seed), 0
        try:
            while not stop.is_set():
                data = cluster.read(2, rng.choice(targets), chunk)
                value = data[0]
                if data != bytes([value]) * size or value < last:
                    seen_problems.append((last, value, len(set(data))))
                last = value
                reads[seed] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            seen_problems.append(exc)

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(2)]
    for t in readers:
        t.start()
    for value in range(2, 40):
        cluster.write(2, chunk, 0, bytes([value]) * size)
    stop.set()
    for t in readers:
        t.join()
    assert not seen_problems and min(reads) > 0
