"""storage.threefs: the client's data path under real process faults (ProcessCluster, short ServerTimings).

A hung storage server (SIGSTOP) costs a read at most a hedge delay and a write about the heartbeat
timeout, not an RPC timeout; a client closes completely while the meta server is dead; a handle of a
file removed by a client in another process reads ESTALE, never zeros. One cluster serves the module:
3 storage nodes x 1 target, one chain of 3 replicas (every node holds a replica of every chunk), 64 KiB
chunks. Each test leaves every server running and every target serving.
"""

from __future__ import annotations

import errno
import logging
import time

import numpy as np
import pytest

from storage.threefs import errors
from storage.threefs.cluster import ClusterShape, ServerTimings
from storage.threefs.cluster.processes import ProcessCluster
from storage.threefs.mgmtd.routing import TargetState

CHUNK = 64 << 10
SHAPE = ClusterShape(nodes=3, targets_per_node=1, replicas=3, chunk_size=CHUNK, stripe=1)
TIMINGS = ServerTimings(heartbeat_interval=0.1, heartbeat_timeout=1.0, session_lease=2.0)


def random_bytes(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def all_serving(client) -> bool:
    client.routing.invalidate()
    return all(s is TargetState.SERVING for s in client.routing.get().target_states.values())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ProcessCluster(tmp_path_factory.mktemp("client-faults") / "cluster", SHAPE, TIMINGS) as c:
        yield c


@pytest.fixture
def client(cluster):
    c = cluster.client()
    yield c
    c.close()


def test_a_file_removed_by_another_process_reads_estale(cluster, client):
    data = random_bytes(1, 3 * CHUNK + 17)
    with client.open("/gone", "wb") as f:
        f.write(data)
    with cluster.client() as remover:
        reader = client.open("/gone", "rb")
        assert reader.pread(10, 0) == data[:10]
        remover.remove("/gone")
        collect = getattr(remover, "collect_garbage", None)
        if collect is not None:
            collect()

        def chunks_gone() -> bool:
            try:
                reader.pread(len(data), 0)
            except errors.StaleFileHandle:
                return True
            return False

        wait_for(chunks_gone, 10, "the removed file's chunks to be collected")
        with pytest.raises(OSError) as info:
            reader.read()
        assert info.value.errno == errno.ESTALE and "/gone" in str(info.value)
        reader.close()


@pytest.mark.parametrize("position", [0, 1], ids=["head", "successor"])
def test_a_hung_storage_node_costs_a_read_a_hedge_and_a_write_the_heartbeat_timeout(cluster, client, position):
    chunks = 6
    data = random_bytes(2, chunks * CHUNK)
    with client.open("/hung", "wb") as f:
        f.write(data)
    wait_for(lambda: all_serving(client), 30, "every target serving")
    routing = client.routing.get()
    chain_id = client.meta.stat("/hung").layout.chain_of_chunk(1)
    victim = routing.target_node[routing.write_path(chain_id)[position]]
    reader = client.open("/hung", "rb")
    cluster.pause(victim)
    try:
        # reads rotate over the replicas: some ask the hung node first; each chunk must still come fast
        slowest = 0.0
        for index in range(chunks):
            started = time.monotonic()
            assert reader.pread(CHUNK, index * CHUNK) == data[index * CHUNK:(index + 1) * CHUNK]
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.4, f"a read waited {slowest:.2f} s for the hung node"
        # the first write: to a chain whose replicas include the hung node
        patch = random_bytes(3, CHUNK)
        started = time.monotonic()
        with client.open("/hung", "r+b") as f:
            f.pwrite(patch, CHUNK)
        took = time.monotonic() - started
        assert took < TIMINGS.heartbeat_timeout + 1.5, f"the first write took {took:.2f} s"
    finally:
        cluster.resume(victim)
    reader.close()
    expected = data[:CHUNK] + patch + data[2 * CHUNK:]
    wait_for(lambda: all_serving(client), 30, "the resumed node to resync and serve")
    with cluster.client() as other, other.open("/hung", "rb") as f:
        assert f.read() == expected


def test_client_close_with_the_meta_server_dead_finishes_closing(cluster, caplog):
    client = cluster.client()
    f = client.open("/closing", "wb")
    f.write(b"acknowledged by every replica")
    reader = client.open("/hung", "rb") if client.exists("/hung") else None
    cluster.kill("meta")
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            client.close()
        assert time.monotonic() - started < 2.0
        assert f.closed and (reader is None or reader.closed)
        assert "closing" in caplog.text
        assert not client._renewer.is_alive()
        client.close()  # idempotent
        for call in (lambda: client.stat("/closing"), lambda: client.open("/x", "wb"), lambda: client.listdir("/")):
            with pytest.raises(ValueError, match="closed"):
                call()
        with pytest.raises(ValueError, match="closed"):
            f.write(b"more")
    finally:
        cluster.start("meta")
    with cluster.client() as other:  # the restarted meta server serves new clients
        assert other.exists("/closing")
