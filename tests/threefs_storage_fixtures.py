"""Shared fixtures and helpers for the 3FS storage-layer tests (chunk store, mgmtd, CRAQ, resync).

The cluster fixture runs 3 storage nodes x 2 targets in 2 chains of 3 replicas, over real ChunkStores
under tmp_path. `peer(node)` hands out the other services and raises NodeUnavailable for a node the
test killed; a test may wrap a node's service to hold a forwarded write at a chosen point.

Test modules import the names they use, the `cluster` fixture included:
`from threefs_storage_fixtures import cluster` (tests/ is on sys.path: it has no __init__.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.threefs.storage.chunk_store import ChunkId, ChunkStore
from storage.threefs.errors import ChainVersionMismatch, NodeUnavailable
from storage.threefs.mgmtd.manager import Manager
from storage.threefs.storage.service import StorageService


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
        self.manager = Manager(heartbeat_timeout=2.0, clock=self.clock)
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
