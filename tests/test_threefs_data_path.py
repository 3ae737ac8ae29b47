"""storage.threefs's data path between client and storage: reads land in the caller's buffer (in-process
and over RPC, no intermediate copy of the payload), ``read_many`` equals one-by-one reads, and a hedged
read's loser never writes into the caller's buffer after the winner returned."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from storage.threefs.client.chunk_io import ChunkIO, RoutingCache
from storage.threefs.client.client import Client
from storage.threefs.client.usrbio import IoRing, IoVec, default_workers
from storage.threefs.errors import TargetNotServing
from storage.threefs.net.auth import load_or_create_secret
from storage.threefs.net.transport import ReplyBuffer, RpcClient, RpcServer
from storage.threefs.net.wire_types import threefs_codec
from storage.threefs.storage.chunk_id import ChunkId
from storage.threefs.storage.service import StorageService

from threefs_client_fixtures import CHUNK, random_bytes
from threefs_client_fixtures import client, cluster  # noqa: F401 - pytest fixtures

MIB = 1 << 20


def shares_memory(a, b) -> bool:
    return np.shares_memory(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))


@pytest.fixture
def secret(tmp_path):
    return load_or_create_secret(tmp_path)


@pytest.fixture
def rpc_client(cluster, secret):  # noqa: F811 - the fixture
    """A client of the embedded cluster whose storage requests go over RPC (meta and mgmtd in-process)."""
    servers = {node: RpcServer(service, codec=threefs_codec(), secret=secret).serve_in_thread()
               for node, service in cluster.services.items()}
    proxies = {node: RpcClient(server.address, codec=threefs_codec(), secret=secret)
               for node, server in servers.items()}
    c = Client(cluster.meta, cluster.manager.routing, proxies.__getitem__, session_renew_interval=None)
    yield c
    c.close()
    for proxy in proxies.values():
        proxy.disconnect()
    for server in servers.values():
        server.shutdown()


def write_reference(client, path: str, size: int, seed: int = 0) -> bytes:  # noqa: F811 - a fixture's name
    data = random_bytes(np.random.default_rng(seed), size)
    with client.open(path, "wb") as f:
        f.write(data)
    return data


# ----------------------------------------------------------------------------- in the caller's buffer

def test_an_in_process_read_hands_the_callers_own_memory_to_the_chunk_store(cluster, client, monkeypatch):  # noqa: F811
    data = write_reference(client, "/f", 5 * CHUNK + 100)
    seen = []
    original = StorageService.read_into

    def spy(self, chain_id, target_id, chunk_id, offset, buffer):
        seen.append(buffer)
        return original(self, chain_id, target_id, chunk_id, offset, buffer)

    monkeypatch.setattr(StorageService, "read_into", spy)
    with IoVec(3 * CHUNK) as iov, client.open("/f", "rb") as f:
        view = iov[:].memoryview()
        try:
            assert f.pread_into(view, CHUNK // 2) == 3 * CHUNK
            assert bytes(view) == data[CHUNK // 2:CHUNK // 2 + 3 * CHUNK]
            assert len(seen) == 4 and all(shares_memory(b, view) for b in seen)
        finally:
            view.release()
            seen.clear()


@pytest.mark.parametrize("over_rpc", [False, True])
def test_reads_equal_what_was_written_holes_and_short_ends_included(cluster, client, rpc_client, over_rpc):  # noqa: F811
    reader = rpc_client if over_rpc else client
    data = write_reference(client, "/g", 7 * CHUNK + 123, seed=1)
    with client.open("/g", "r+b") as f:
        f.pwrite(b"z" * 10, 12 * CHUNK + 5)  # chunks 8..11 are a hole
    expected = data + bytes(12 * CHUNK + 5 - len(data)) + b"z" * 10
    with reader.open("/g", "rb") as f:
        for offset, size in [(0, len(expected)), (3, CHUNK), (CHUNK - 1, 2), (6 * CHUNK, 7 * CHUNK), (0, 1),
                             (len(expected) - 4, 100)]:
            buffer = bytearray(size)
            n = f.pread_into(buffer, offset)
            assert bytes(buffer[:n]) == expected[offset:offset + size]
    with IoVec(4 * CHUNK) as iov, reader.open("/g", "rb") as f, IoRing(8) as ring:
        for i in range(4):
            ring.prepare(iov[i * CHUNK:(i + 1) * CHUNK], True, f, (3 * i + 1) * CHUNK)
        ring.submit()
        assert sorted(c.result for c in ring.wait(min_results=4)) == [CHUNK] * 4
        assert all(bytes(iov[i * CHUNK:(i + 1) * CHUNK]) == expected[(3 * i + 1) * CHUNK:(3 * i + 2) * CHUNK]
                   for i in range(4))


class _Payload:
    """Served over RPC: `read` answers a prepared payload (so the server allocates nothing per call)."""

    def __init__(self, size: int) -> None:
        self.payload = bytes(range(256)) * (size // 256)

    def read(self, *args) -> bytes:
        return self.payload


def test_call_into_receives_the_reply_in_place_without_copying_the_payload(secret):
    with RpcServer(_Payload(MIB), codec=threefs_codec(), secret=secret).serve_in_thread() as server, \
            RpcClient(server.address, codec=threefs_codec(), secret=secret) as proxy:
        buffer = bytearray(MIB)
        proxy.call_into(buffer, "read")  # connect and warm up
        buffer[:] = bytes(MIB)
        destination = ReplyBuffer(buffer)
        tracemalloc.start()
        try:
            value = proxy.call_into(destination, "read")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert destination.landed == MIB and len(value) == MIB and shares_memory(value, buffer)
        assert bytes(buffer) == _Payload(MIB).payload
        assert peak < MIB // 4, f"{peak} bytes allocated to receive a {MIB}-byte reply"
        small = bytearray(10)  # a reply larger than the buffer lands elsewhere, whole
        assert bytes(proxy.call_into(small, "read")) == _Payload(MIB).payload and small == bytearray(10)


def test_a_revoked_reply_buffer_takes_no_more_bytes():
    left, right = socket.socketpair()
    left.settimeout(5)
    buffer = bytearray(8)
    destination = ReplyBuffer(buffer)
    outcome = []

    def receive():
        try:
            destination.receive(left, 8)
            outcome.append("done")
        except ConnectionAbortedError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=receive)
    thread.start()
    right.sendall(b"AAAA")
    deadline = time.monotonic() + 5
    while buffer[:4] != b"AAAA" and time.monotonic() < deadline:
        time.sleep(0.001)
    destination.revoke()
    right.sendall(b"BBBB")
    thread.join(5)
    assert buffer == b"AAAA" + bytes(4)
    assert isinstance(outcome[0], ConnectionAbortedError) and destination.landed is None
    left.close(), right.close()


# ----------------------------------------------------------------------------- hedged reads

class _Routing:
    target_node = {1: 1, 2: 2}

    @staticmethod
    def readable_targets(chain_id):
        return [1, 2]


class _Replica:
    """A replica answering `fill` bytes after `delay` seconds; `answered` is set once it returned."""

    def __init__(self, fill: bytes, delay: float) -> None:
        self.fill, self.delay, self.answered = fill, delay, threading.Event()

    def read(self, chain_id, target_id, chunk_id, offset, length) -> bytes:
        time.sleep(self.delay)
        self.answered.set()
        return self.fill * length


@pytest.mark.parametrize("over_rpc", [False, True])
def test_a_hedged_reads_loser_never_writes_into_the_callers_buffer(secret, over_rpc):
    slow, fast = _Replica(b"L", 0.4), _Replica(b"W", 0.0)
    servers, proxies = [], {}
    if over_rpc:
        servers = [RpcServer(r, codec=threefs_codec(), secret=secret).serve_in_thread() for r in (slow, fast)]
        proxies = {n: RpcClient(s.address, codec=threefs_codec(), secret=secret) for n, s in zip((1, 2), servers)}
        storage = proxies.__getitem__
    else:
        storage = {1: slow, 2: fast}.__getitem__
    with ThreadPoolExecutor(2) as pool:
        chunk_io = ChunkIO(RoutingCache(lambda: _Routing()), storage, pool, hedge_delay=0.05)
        chunk_io._rotation = iter(lambda: 0, 1)  # the slow replica is always asked first
        try:
            for _ in range(2):
                buffer = bytearray(64 * 1024)
                assert chunk_io.read_chunk_into(7, ChunkId(1, 0), 0, memoryview(buffer)) == len(buffer)
                assert buffer == b"W" * len(buffer)
                assert slow.answered.wait(5)
                time.sleep(0.1)  # the loser's reply has arrived (or been written) by now
                assert buffer == b"W" * len(buffer)
                slow.answered.clear()
        finally:
            chunk_io.close()
            for proxy in proxies.values():
                proxy.disconnect()
            for server in servers:
                server.shutdown()


# ----------------------------------------------------------------------------- batched reads

@pytest.mark.parametrize("over_rpc", [False, True])
def test_read_many_equals_reads_one_by_one(cluster, client, secret, over_rpc):  # noqa: F811
    write_reference(client, "/h", 6 * CHUNK + 50, seed=2)
    inode = client.stat("/h").inode_id
    routing = cluster.manager.routing()
    node = min(cluster.services)
    service = cluster.services[node]
    local = set(cluster.shape.targets()[node])
    requests = []
    for index in range(8):  # chunks 6 (short) and 7 (none) included
        chain = client.open("/h", "rb")._layout.chain_of_chunk(index)
        target = next(t for t in routing.chain(chain).targets if t in local)
        requests.append((chain, target, ChunkId(inode, index), index * 7, CHUNK))
    requests.append((requests[0][0], 999, ChunkId(inode, 0), 0, 10))  # not in the chain: its own error
    expected = [service.read(*r) for r in requests[:-1]]
    if over_rpc:
        with RpcServer(service, codec=threefs_codec(), secret=secret).serve_in_thread() as server, \
                RpcClient(server.address, codec=threefs_codec(), secret=secret) as proxy:
            results = proxy.read_many(requests)
    else:
        results = service.read_many(requests)
    assert results[:-1] == expected and expected[-1] == b"" and len(expected[-2]) == 50 - 6 * 7
    assert isinstance(results[-1], TargetNotServing)


def test_a_read_over_many_chunks_costs_one_rpc_per_node_and_falls_back_chunk_by_chunk(cluster, rpc_client,
                                                                                      monkeypatch):  # noqa: F811
    data = write_reference(rpc_client, "/wide", 11 * CHUNK + 123, seed=3)
    calls = {"read_many": 0, "single": 0}
    read_many, read = StorageService.read_many, StorageService.read

    def counting_read_many(self, reads):
        calls["read_many"] += 1
        return read_many(self, reads)

    def counting_read(self, *args):
        calls["single"] += 1
        return read(self, *args)

    monkeypatch.setattr(StorageService, "read_many", counting_read_many)
    monkeypatch.setattr(StorageService, "read", counting_read)
    with rpc_client.open("/wide", "rb") as f:
        assert f.pread(len(data), 0) == data
        assert 1 <= calls["read_many"] <= len(cluster.services) and calls["single"] == 0
        assert f.pread(5 * CHUNK, 3 * CHUNK + 7) == data[3 * CHUNK + 7:8 * CHUNK + 7]

        def failing_read_many(self, reads):  # every batch fails: each chunk is read on its own
            raise TargetNotServing("batches refused")

        monkeypatch.setattr(StorageService, "read_many", failing_read_many)
        calls["single"] = 0
        assert f.pread(len(data), 0) == data and calls["single"] >= 12


def test_an_ioring_has_about_as_many_workers_as_cores():
    assert 2 <= default_workers() <= 8
    with IoRing(4) as ring:
        assert ring._pool._max_workers == default_workers()
