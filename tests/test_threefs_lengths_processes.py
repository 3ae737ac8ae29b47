"""Lengths and garbage collection under real process faults (issue 14, part B): a ProcessCluster (mgmtd,
meta and storage servers as processes, short heartbeats and a 2 s session lease), shared by the tests.

A writer process whose writes every replica acknowledged is SIGKILLed before it closes: once its session
lease ends, the meta server takes the file's length from storage, so every acknowledged byte stays
readable. A removal touches no storage (it returns while every storage server is paused); the meta
server's background collector deletes the chunks afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from storage.threefs.cluster import ClusterShape, ServerTimings
from storage.threefs.cluster.processes import ProcessCluster
from storage.threefs.mgmtd.routing import TargetState
from storage.threefs.storage.chunk_id import ChunkId

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64 << 10
SHAPE = ClusterShape(nodes=3, targets_per_node=2, replicas=3, chunk_size=CHUNK, stripe=2)
TIMINGS = ServerTimings(heartbeat_interval=0.1, heartbeat_timeout=1.0, session_lease=2.0)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def chunk_files(root: Path, inode_id: int) -> list[Path]:
    prefix = ChunkId(inode_id, 0).hex()[:24]
    return sorted(root.glob(f"node-*/target-*/chunks/{prefix}*"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ProcessCluster(tmp_path_factory.mktemp("lengths") / "cluster", SHAPE, TIMINGS) as c:
        yield c


@pytest.fixture
def client(cluster):
    with cluster.client() as c:
        yield c


def test_a_sigkilled_writer_s_acknowledged_bytes_stay_in_the_file(cluster, client):
    size = 3 * CHUNK + 1000
    # the writer renews no lease and reports no length: only storage knows what it wrote
    script = textwrap.dedent(f"""
        import sys, time
        from storage.threefs.connect import connect
        client = connect("3fs+tcp://{cluster.root}", session_renew_interval=None)
        f = client.open("/dead-writer", "wb")
        f.write(bytes(i % 251 + 1 for i in range({size})))
        print("acknowledged", flush=True)
        time.sleep(120)
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "acknowledged"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert client.stat("/dead-writer").size == 0  # nothing was reported
    wait_for(lambda: client.stat("/dead-writer").size == size, 3 * TIMINGS.session_lease + 3,
             "the length from storage after the dead writer's lease")
    with client.open("/dead-writer", "rb") as f:
        assert f.read() == bytes(i % 251 + 1 for i in range(size))


def test_remove_touches_no_storage_and_the_meta_server_collects_in_the_background(cluster, client):
    with client.open("/doomed", "wb") as f:
        f.write(b"d" * (2 * CHUNK))
    inode = client.stat("/doomed").inode_id
    assert len(chunk_files(cluster.root, inode)) == 2 * SHAPE.replicas
    nodes = list(SHAPE.targets())
    for node in nodes:
        cluster.pause(node)
    try:
        remover = threading.Thread(target=client.remove, args=("/doomed",), daemon=True)
        started = time.monotonic()
        remover.start()
        remover.join(2.0)
        assert not remover.is_alive(), "remove waited on a (hung) storage server"
        assert time.monotonic() - started < 1.0
    finally:
        for node in nodes:
            cluster.resume(node)
    assert not client.exists("/doomed")
    wait_for(lambda: chunk_files(cluster.root, inode) == [], 15, "the background collection of /doomed")
    wait_for(lambda: all(s is TargetState.SERVING for s in _states(client).values()), 30, "every target to serve")


def _states(client):
    client.routing.invalidate()
    return client.routing.get().target_states
