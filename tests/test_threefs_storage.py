"""3FS storage layer in one process: chunk stores on disk, mgmtd, CRAQ storage services, resync.

The cluster fixture runs 3 storage nodes x 2 targets in 2 chains of 3 replicas, over real ChunkStores
under tmp_path. `peer(node)` hands out the other services and raises NodeUnavailable for a node the
test killed; a test may wrap a node's service to hold a forwarded write at a chosen point.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

from storage.threefs.block_checksums import BLOCK_SIZE
from storage.threefs.chunk_store import ChunkId, ChunkMeta, ChunkStore, ChunkStoreFormatError, PendingVersionExists
from storage.threefs.errors import (ChainVersionMismatch, ChecksumError, ChunkDiverged, NodeUnavailable,
                                    TargetNotServing)
from storage.threefs.mgmtd import Manager, next_public_state, place_chains
from storage.threefs.resync import REMOVE, SKIP, TRANSFER, chunk_action
from storage.threefs.routing import LocalState, TargetState
from storage.threefs.storage_service import StorageService

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A monotonic clock the test moves by hand (heartbeat timeouts without sleeping)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """mgmtd + 3 storage services in one process; nodes can be killed and restarted."""

    def __init__(self, root: Path, nodes: int = 3, targets_per_node: int = 2, replicas: int = 3) -> None:
        self.root = root
        self.clock = FakeClock()
        self.manager = Manager(root / "mgmtd.json", heartbeat_timeout=2.0, clock=self.clock)
        self.node_targets = {n: [100 * n + i for i in range(1, targets_per_node + 1)] for n in range(1, nodes + 1)}
        self.manager.create_chains(self.node_targets, replicas)
        self.dead: set[int] = set()
        self.wrappers: dict[int, object] = {}  # node -> callable(service) -> stand-in for peers
        self.services: dict[int, StorageService] = {}
        for node in self.node_targets:
            self.manager.register_node(node, f"local://node{node}")
            self.start(node)

    def start(self, node: int) -> StorageService:
        stores = {t: ChunkStore(self.root / f"node{node}" / f"target{t}") for t in self.node_targets[node]}
        self.services[node] = StorageService(node, stores, self.manager.routing, self.peer,
                                             on_successor_failure=self.manager.mark_offline)
        return self.services[node]

    def peer(self, node: int):
        if node in self.dead:
            raise NodeUnavailable(f"storage node {node} is down")
        wrap = self.wrappers.get(node)
        return wrap(self.services[node]) if wrap else self.services[node]

    def kill(self, node: int) -> None:
        self.dead.add(node)

    def restart(self, node: int) -> None:
        """A process restart: reopen the node's chunk stores from disk, alive again."""
        for target in self.node_targets[node]:
            self.services[node].store(target).close()
        self.start(node)
        self.dead.discard(node)

    def tick(self) -> list:
        reports = []
        for node, service in self.services.items():
            if node not in self.dead:
                reports += service.tick(self.manager)
        return reports

    def fail_silent_nodes(self) -> None:
        """Time passes: the live nodes heartbeat, mgmtd declares the silent ones offline."""
        self.clock.now += 3.0
        self.tick()
        self.manager.check()

    # a minimal client: routes by the current chain table, retries a stale chain version
    def write(self, chain_id: int, chunk: ChunkId, offset: int, data: bytes, full_replace: bool = False) -> int:
        for _ in range(5):
            routing = self.manager.routing()
            head = routing.write_path(chain_id)[0]
            try:
                return self.peer(routing.target_node[head]).write(
                    chain_id, routing.chain(chain_id).version, chunk, offset, data, full_replace)
            except ChainVersionMismatch:
                continue
        raise AssertionError("chain version kept changing")

    def read(self, chain_id: int, target: int, chunk: ChunkId, offset: int = 0, length: int = 1 << 30) -> bytes:
        node = self.manager.routing().target_node[target]
        return self.peer(node).read(chain_id, target, chunk, offset, length)

    def store(self, target: int) -> ChunkStore:
        return self.services[self.manager.routing().target_node[target]].store(target)

    def chain_with_middle_on(self, node: int) -> int:
        routing = self.manager.routing()
        for chain_id in routing.chain_table.chain_ids:
            if routing.target_node[routing.chain(chain_id).targets[1]] == node:
                return chain_id
        raise AssertionError(f"no chain has its middle target on node {node}")

    def replica_view(self, chain_id: int) -> dict[int, list]:
        """target -> [(meta, content)] of every chunk on each target of the chain."""
        view = {}
        for target in self.manager.routing().chain(chain_id).targets:
            store = self.store(target)
            view[target] = [(m, store.read(m.chunk_id, 0, 1 << 30)) for m in store.list_meta()]
        return view

    def close(self) -> None:
        for node, service in self.services.items():
            for target in self.node_targets[node]:
                service.store(target).close()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    c.tick()
    yield c
    c.close()


def apply_model(model: bytearray, offset: int, data: bytes) -> None:
    if offset > len(model):
        model.extend(bytes(offset - len(model)))
    model[offset:offset + len(data)] = data


def assert_replicas_identical(cluster: Cluster, chain_id: int) -> list:
    view = cluster.replica_view(chain_id)
    first, *rest = view.values()
    for target, chunks in view.items():
        assert chunks == first, f"target {target} differs from {next(iter(view))}"
        assert all(meta.pending_version == 0 for meta, _ in chunks)
    return first


# ------------------------------------------------------------------------------- chunk store

def test_chunk_id_encoding():
    cid = ChunkId(0x0102030405060708, 0x0A0B0C0D)
    raw = cid.to_bytes()
    assert raw == bytes.fromhex("0000" "0102030405060708" "0000" "0a0b0c0d")
    assert ChunkId.from_bytes(raw) == cid and ChunkId.from_hex(cid.hex()) == cid
    assert ChunkId(1, 5).to_bytes() < ChunkId(1, 6).to_bytes() < ChunkId(2, 0).to_bytes()
    with pytest.raises(ValueError, match="chunk_index"):
        ChunkId(1, 1 << 32).to_bytes()


def test_chunk_store_versions_and_reopen(tmp_path):
    cid = ChunkId(7, 0)
    store = ChunkStore(tmp_path / "t")
    assert store.read(cid, 0, 10) == b"" and store.meta(cid) is None
    assert store.apply_write(cid, 3, b"abc", chain_version=1) == 1
    assert store.read(cid, 0, 10) == b"" and store.read(cid, 0, 10, pending=True) == b"\0\0\0abc"
    store.commit(cid, 1)
    assert store.read(cid, 0, 100) == b"\0\0\0abc" and store.read(cid, 4, 1) == b"b"
    assert store.apply_write(cid, 8, b"XY", chain_version=2) == 2  # past the end: zero-extended
    with pytest.raises(PendingVersionExists, match="pending version 2"):
        store.apply_write(cid, 0, b"no", chain_version=2)
    store.commit(cid, 2)
    assert store.read(cid, 0, 100) == b"\0\0\0abc\0\0XY"
    assert store.meta(cid)[1:4] == (2, 0, 2)
    store.apply_write(cid, 0, b"Z", chain_version=3)  # pending 3, never committed
    store.apply_write(ChunkId(7, 1), 0, b"only pending", chain_version=3)
    store.close()
    (tmp_path / "t" / "chunks" / "orphan.v9.crashed").write_bytes(b"junk")

    reopened = ChunkStore(tmp_path / "t")
    assert reopened.read(cid, 0, 100) == b"\0\0\0abc\0\0XY"
    assert [m[:6] for m in reopened.list_meta()] == [(cid, 2, 0, 2, 10, zlib.crc32(b"\0\0\0abc\0\0XY"))]
    assert reopened.meta(ChunkId(7, 1)) is None
    assert sorted(p.name for p in (tmp_path / "t" / "chunks").iterdir()) == [reopened.content_path(cid).name]
    reopened.replace(cid, b"whole", committed_version=9, chain_version=4)
    assert reopened.read(cid, 0, 100) == b"whole" and reopened.meta(cid).committed_version == 9
    assert reopened.remove_inode(7) == 1 and reopened.list_meta() == []
    assert list((tmp_path / "t" / "chunks").iterdir()) == []
    reopened.close()


def test_chunk_store_checks_the_blocks_it_reads(tmp_path):
    store = ChunkStore(tmp_path / "t")
    cid = ChunkId(3, 2)
    data = random.Random(5).randbytes(3 * BLOCK_SIZE + 500)  # blocks 0-2 whole, block 3 short
    store.apply_write(cid, 0, data, chain_version=1)
    store.commit(cid, 1)
    assert store.meta(cid).checksum == zlib.crc32(data)  # the whole-content CRC32 stays in the metadata
    path = store.content_path(cid)
    raw = bytearray(path.read_bytes())
    raw[BLOCK_SIZE + 150] ^= 0x40  # bit rot in block 1
    path.write_bytes(bytes(raw))
    # a read checks the blocks it returns: intact blocks next to the damaged one read fine
    assert store.read(cid, 0, BLOCK_SIZE) == data[:BLOCK_SIZE]
    assert store.read(cid, BLOCK_SIZE - 6, 6) == data[BLOCK_SIZE - 6:BLOCK_SIZE]
    assert store.read(cid, 2 * BLOCK_SIZE, 1 << 20) == data[2 * BLOCK_SIZE:]
    assert store.read(cid, len(data) + 10, 5) == b""
    # a read overlapping the damaged block fails, naming the chunk, the target and the block
    for offset, length in [(BLOCK_SIZE + 150, 1), (BLOCK_SIZE - 1, 2), (2 * BLOCK_SIZE - 1, 1), (0, 1 << 20)]:
        with pytest.raises(ChecksumError, match=rf"chunk ChunkId\(inode_id=3, chunk_index=2\).*{tmp_path / 't'}"
                                                rf".*block 1 \(bytes \[4096, 8192\)\)"):
            store.read(cid, offset, length)
    with pytest.raises(ChecksumError, match="block 1"):  # the whole chunk (read_chunk, resync): every block
        store.read_version(cid, 1, 0, 1 << 62)
    with pytest.raises(ChecksumError, match="block 1"):  # an update builds on the whole committed content
        store.apply_write(cid, 3 * BLOCK_SIZE, b"x", chain_version=1)
    # the file's length: a read that reaches the end checks where the file ends
    path.write_bytes(data + b"junk")
    assert store.read(cid, 0, 100) == data[:100]
    with pytest.raises(ChecksumError, match="more than the 12788 bytes"):
        store.read(cid, len(data) - 10, 100)
    path.write_bytes(data[:5000])
    assert store.read(cid, 0, 10) == data[:10]
    with pytest.raises(ChecksumError, match="ends at byte 5000, inside block 1"):
        store.read(cid, BLOCK_SIZE, 10)
    store.close()


def test_chunk_store_refuses_another_metadata_format(tmp_path):
    (tmp_path / "t").mkdir()
    db = sqlite3.connect(tmp_path / "t" / "chunkmeta.sqlite")  # a store from before per-block checksums
    db.execute("CREATE TABLE chunks (id BLOB PRIMARY KEY, committed_version INTEGER NOT NULL)")
    db.commit()
    db.close()
    with pytest.raises(ChunkStoreFormatError, match="has metadata format 0; this code reads format 2"):
        ChunkStore(tmp_path / "t")
    ChunkStore(tmp_path / "fresh").close()
    ChunkStore(tmp_path / "fresh").close()  # a store this code created reopens


_CRASH_WRITER = """
import sys
from storage.threefs.chunk_store import ChunkId, ChunkStore
store = ChunkStore(sys.argv[1])
cid = ChunkId(1, 0)
version = store.meta(cid).committed_version if store.meta(cid) else 0
for written in range(1, 1 << 30):
    version = store.apply_write(cid, 0, bytes([(version + 1) % 256]) * 50_000, chain_version=1)
    store.commit(cid, version)
    if written == 3:
        print("ready", flush=True)
"""


def test_chunk_store_survives_kill(tmp_path):
    """SIGKILL a process in the middle of a stream of writes: the store reopens at a committed version."""
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _CRASH_WRITER, str(tmp_path / "t")], cwd=REPO,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = ChunkStore(tmp_path / "t")
        meta = store.meta(ChunkId(1, 0))
        assert meta.pending_version == 0 and meta.committed_version >= 3 * (attempt + 1)
        assert store.read(ChunkId(1, 0), 0, 1 << 20) == bytes([meta.committed_version % 256]) * 50_000
        assert len(list((tmp_path / "t" / "chunks").iterdir())) == 1
        store.close()


# ------------------------------------------------------------------------------- mgmtd

def test_create_chains_places_replicas_on_distinct_nodes():
    rng = random.Random(0)
    for _ in range(200):
        replicas = rng.randint(1, 4)
        nodes = {n: [] for n in range(rng.randint(replicas, 7))}
        next_target = 1
        for n in nodes:
            for _ in range(rng.randint(1, 5)):
                nodes[n].append(next_target)
                next_target += 1
        total = next_target - 1
        try:
            chains = place_chains(nodes, replicas)
        except ValueError as exc:
            assert "replicas" in str(exc)
            assert total % replicas or max(map(len, nodes.values())) > total // replicas
            continue
        node_of = {t: n for n, ts in nodes.items() for t in ts}
        assert sorted(t for c in chains for t in c) == list(range(1, total + 1))
        for chain in chains:
            assert len(chain) == replicas and len({node_of[t] for t in chain}) == replicas
    with pytest.raises(ValueError, match="replicas=3"):
        Manager().create_chains({1: [1, 2, 3], 2: [4, 5, 6]}, replicas=3)
    table = Manager().create_chains({1: [11, 12], 2: [21, 22], 3: [31, 32]}, replicas=3)
    assert [c.version for c in table.chains.values()] == [1, 1] and table.version == 1


def test_transition_table():
    S, Y, W, L, O = (TargetState.SERVING, TargetState.SYNCING, TargetState.WAITING, TargetState.LASTSRV,
                     TargetState.OFFLINE)
    up, online, off = LocalState.UPTODATE, LocalState.ONLINE, LocalState.OFFLINE
    assert next_public_state(off, S, S, True) is O
    assert next_public_state(off, S, None, False) is L
    assert next_public_state(off, L, None, False) is L
    assert next_public_state(online, O, S, True) is W
    assert next_public_state(online, W, S, True) is Y
    assert next_public_state(online, W, L, False) is W
    assert next_public_state(online, Y, O, False) is W
    assert next_public_state(up, Y, S, True) is S
    assert next_public_state(up, W, S, True) is W  # up-to-date never skips a resync
    assert next_public_state(online, L, None, False) is S
    assert next_public_state(off, Y, S, True) is O


def test_manager_state_survives_restart(tmp_path):
    clock = FakeClock()
    manager = Manager(tmp_path / "m.json", heartbeat_timeout=2.0, clock=clock)
    manager.create_chains({1: [11, 12], 2: [21, 22], 3: [31, 32]}, replicas=3)
    for node in (1, 2, 3):
        manager.register_node(node, f"127.0.0.1:{9000 + node}")
    manager.mark_offline(21)
    before = manager.routing()
    assert before.target_states[21] is TargetState.OFFLINE
    assert before.chain(before.chain_of(21)).targets[-1] == 21

    again = Manager(tmp_path / "m.json", heartbeat_timeout=2.0, clock=clock)
    assert again.routing() == before
    assert again.create_chains({1: [11, 12], 2: [21, 22], 3: [31, 32]}, replicas=3) == before.chain_table
    clock.now += 3.0  # nobody heartbeats to the new manager: all offline, one lastsrv per chain
    after = again.check()
    for chain_id in after.chain_table.chain_ids:
        states = [after.target_states[t] for t in after.chain(chain_id).targets]
        assert states.count(TargetState.LASTSRV) == 1 and states.count(TargetState.OFFLINE) == 2
    assert Manager(tmp_path / "m.json").routing() == after


# ------------------------------------------------------------------------------- CRAQ

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
    expected = (version, 0, len(content), zlib.crc32(content), content)
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
    assert service.update(1, chain_version, middle, chunk, 90, b"B" * 10, False, 2, zlib.crc32(content)) == 2
    assert cluster.replica_view(1) == before
    with pytest.raises(ChunkDiverged) as diverged:
        service.update(1, chain_version, middle, chunk, 90, b"X" * 10, False, 2, zlib.crc32(b"X"))
    assert diverged.value.committed_version == 2
    with pytest.raises(ChunkDiverged):
        service.update(1, chain_version, middle, chunk, 0, b"A", False, 1, zlib.crc32(b"A" * 100))
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
    with pytest.raises(ChecksumError, match="no other replica"):
        cluster.read(chain_id, victim, chunk)


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
