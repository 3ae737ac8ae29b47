"""mgmtd off the data path, with real server processes (ProcessCluster): a standby mgmtd takes over from a
SIGKILLed leader during a write load, a restarted mgmtd and meta server (new ports) are found again by
existing clients, new clients and storage servers, and a storage server that cannot reach mgmtd fences
itself after heartbeat_timeout / 2 and serves again once a heartbeat succeeds.

Timings are short (heartbeat every 0.1 s, timeout 1 s) so failovers take about a second.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from storage.threefs.cluster import ClusterShape, ServerTimings
from storage.threefs.cluster.processes import ProcessCluster
from storage.threefs.cluster.servers import MGMTD_LEADER, cluster_client, read_address, resolve_address
from storage.threefs.errors import NodeUnavailable, NotPrimary, TargetNotServing
from storage.threefs.mgmtd.routing import TargetState
from storage.threefs.storage.chunk_id import ChunkId

CHUNK = 64 << 10
SHAPE = ClusterShape(nodes=3, targets_per_node=1, replicas=3, chunk_size=CHUNK, stripe=1)
TIMINGS = ServerTimings(heartbeat_interval=0.1, heartbeat_timeout=1.0, session_lease=5.0)


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_and_check(client, path: str, data: bytes) -> None:
    with client.open(path, "wb") as f:
        f.write(data)
    with client.open(path, "rb") as f:
        assert f.read() == data, path


@pytest.fixture(scope="module")
def single_mgmtd(tmp_path_factory):
    """A cluster whose mgmtd has no standby (tests restore whatever they kill or pause)."""
    with ProcessCluster(tmp_path_factory.mktemp("single") / "cluster", SHAPE, TIMINGS, mgmtd_standbys=0) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def with_standby(tmp_path_factory):
    """A cluster with mgmtd and one standby, mgmtd-2 (tests leave both running, either may lead)."""
    with ProcessCluster(tmp_path_factory.mktemp("standby") / "cluster", SHAPE, TIMINGS) as cluster:
        yield cluster


def test_a_standby_mgmtd_takes_over_during_a_write_load_and_nothing_acknowledged_is_lost(with_standby):
    rng = np.random.default_rng(5)
    cluster = with_standby
    with cluster.client() as client:
        assert cluster.mgmtd_leader() == "mgmtd"
        client.makedirs("/load")
        acked: dict[str, bytes] = {}
        ack_times: list[float] = []
        stop, errors = threading.Event(), []

        def writer() -> None:
            try:
                i = 0
                while not stop.is_set():
                    path, data = f"/load/{i}", rng.bytes(int(rng.integers(1, 2 * CHUNK)))
                    write_and_check(client, path, data)
                    acked[path] = data
                    ack_times.append(time.monotonic())
                    i += 1
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        wait_for(lambda: len(acked) >= 5 or errors, 30, "writes before the kill")
        cluster.kill("mgmtd")
        killed_at, before = time.monotonic(), len(acked)
        wait_for(lambda: cluster.mgmtd_leader() == "mgmtd-2", 10, "the standby to lead")
        wait_for(lambda: len(acked) >= before + 10 or errors, 30, "writes after the failover")
        stop.set()
        thread.join(30)
        assert not errors, errors
        gaps = np.diff([killed_at] + [t for t in ack_times if t > killed_at])
        assert gaps.max() < 6.0, f"writes stalled for {gaps.max():.1f} s around the failover"
        with cluster.client() as reader:  # a new client finds the new leader too
            for path, data in acked.items():
                with reader.open(path, "rb") as f:
                    assert f.read() == data, path
            routing = reader.routing.get()
            assert all(state is TargetState.SERVING for state in routing.target_states.values())
    cluster.start("mgmtd")  # back, as the standby
    assert cluster.mgmtd_leader() == "mgmtd-2"


def test_a_paused_leader_is_replaced_and_stands_by_once_it_resumes(with_standby):
    """SIGSTOP of the leading mgmtd: the standby takes over; the old leader, resumed, serves nothing."""
    cluster = with_standby
    with cluster.client() as client:
        old = wait_for(cluster.mgmtd_leader, 10, "a leader")
        new = next(name for name in cluster.mgmtd_names if name != old)
        cluster.pause(old)
        try:
            wait_for(lambda: cluster.mgmtd_leader() == new, 10, f"{new} to lead")
            write_and_check(client, "/paused-leader", b"p" * 5000)
        finally:
            cluster.resume(old)
        stale = cluster_client(cluster.root, read_address(cluster.root, old), timeout=5)
        try:
            wait_for(lambda: not stale_serves(stale), 5, f"the resumed {old} to stand by")
            with pytest.raises(NotPrimary) as refused:
                stale.mark_offline(SHAPE.targets()[1][0])
            assert refused.value.leader == read_address(cluster.root, new)
        finally:
            stale.disconnect()
        assert cluster.mgmtd_leader() == new
        write_and_check(client, "/after-resume", b"r" * 5000)
        assert all(s is TargetState.SERVING for s in client.routing.get().target_states.values())


def stale_serves(client) -> bool:
    try:
        client.routing()
        return True
    except NotPrimary:
        return False


def test_a_restarted_mgmtd_on_a_new_port_is_found_by_clients_and_storage_servers(single_mgmtd):
    cluster = single_mgmtd
    with cluster.client() as old_client:
        write_and_check(old_client, "/before", b"x" * 1000)
        old_address = read_address(cluster.root, "mgmtd")
        cluster.kill("mgmtd")
        time.sleep(0.6)  # past the routing caches' ttl (0.5 s): the meta server's asks mgmtd, which is gone
        done: list = []

        def io_while_mgmtd_is_down() -> None:
            write_and_check(old_client, "/during", b"d" * 1000)  # meta creates it on its last chain table
            with old_client.open("/before", "rb") as f:
                assert f.read() == b"x" * 1000
            done.append(True)

        worker = threading.Thread(target=io_while_mgmtd_is_down)
        worker.start()  # storage serves on its last routing, then fences and IO is retried until mgmtd is back
        cluster.start("mgmtd")
        worker.join(30)
        assert done == [True]
        new_address = read_address(cluster.root, "mgmtd")
        assert new_address != old_address
        wait_for(lambda: cluster.mgmtd_leader() == "mgmtd", 10, "the restarted mgmtd to lead")
        # every storage server heartbeats to the new mgmtd (it has heard from each target)
        mgmtd = cluster_client(cluster.root, new_address, timeout=5)
        try:
            wait_for(lambda: all(mgmtd.local_state(t) is not None for ts in SHAPE.targets().values() for t in ts),
                     10, "heartbeats at the restarted mgmtd")
            assert all(s is TargetState.SERVING for s in mgmtd.routing().target_states.values())
        finally:
            mgmtd.disconnect()
        write_and_check(old_client, "/after-old", b"o" * 3000)
        with cluster.client() as new_client:
            write_and_check(new_client, "/after-new", b"n" * 3000)
            assert new_client.stat("/after-old").size == 3000


def test_a_restarted_meta_server_on_a_new_port_is_found_by_an_existing_client(single_mgmtd):
    cluster = single_mgmtd
    with cluster.client() as client:
        write_and_check(client, "/meta-before", b"m" * 100)
        old_address = read_address(cluster.root, "meta")
        cluster.kill("meta")
        cluster.start("meta")
        assert read_address(cluster.root, "meta") != old_address
        assert client.stat("/meta-before").size == 100
        write_and_check(client, "/meta-after", b"a" * 100)


def test_a_storage_server_without_mgmtd_fences_itself_after_half_the_heartbeat_timeout(single_mgmtd):
    cluster = single_mgmtd
    with cluster.client() as client:
        write_and_check(client, "/fence", b"f" * 2000)
        inode = client.meta.stat("/fence")
        chain = inode.layout.chain_of_chunk(0)
        routing = client.routing.get()
        target = routing.readable_targets(chain)[0]
        node = routing.target_node[target]
        storage = cluster_client(cluster.root, read_address(cluster.root, f"storage-{node}"), timeout=5)

        def read() -> bytes:
            return storage.read(chain, target, ChunkId(inode.inode_id, 0), 0, 2000)

        def fenced() -> bool:
            try:
                read()
                return False
            except TargetNotServing as exc:
                assert "fenced" in str(exc)
                return True

        try:
            assert read() == b"f" * 2000
            cluster.pause("mgmtd")
            paused_at = time.monotonic()
            try:
                wait_for(fenced, 5, "the storage server to fence itself")
                fenced_after = time.monotonic() - paused_at
                # within T/2 of its last heartbeat: before mgmtd could declare it offline (after T)
                assert fenced_after < TIMINGS.heartbeat_timeout, fenced_after
                with pytest.raises(TargetNotServing):
                    storage.write(chain, routing.chain(chain).version, ChunkId(inode.inode_id, 0), 0, b"z")
            finally:
                cluster.resume("mgmtd")
            wait_for(lambda: not fenced(), 5, "the storage server to serve again")
            assert read() == b"f" * 2000
            write_and_check(client, "/fence", b"g" * 2000)
        finally:
            storage.disconnect()


def test_bad_mgmtd_settings_and_an_unelected_leader_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="mgmtd_standbys"):
        ProcessCluster(tmp_path / "c", SHAPE, TIMINGS, mgmtd_standbys=-1)
    with pytest.raises(NodeUnavailable, match="mgmtd-leader"):
        resolve_address(tmp_path, MGMTD_LEADER)
