"""storage.threefs.net.transport: method calls over real loopback sockets, failures as NodeUnavailable."""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from storage.threefs.errors import NodeUnavailable
from storage.threefs.net.transport import RpcClient, RpcServer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class ChunkMeta:
    chunk_id: tuple[int, int]
    version: int
    checksum: int


class QuotaExceeded(Exception):
    """A project-specific error class that must arrive with its own type."""


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from args=(a,)
        super().__init__(a)
        self.b = b


class Service:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0

    def echo(self, value):
        with self.lock:
            self.calls += 1
        return value

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def meta(self, inode: int) -> ChunkMeta:
        return ChunkMeta((inode, 3), version=7, checksum=0xDEADBEEF)

    def missing(self, path: str):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)

    def over_quota(self):
        raise QuotaExceeded("quota of 3 chunks exceeded")

    def unpicklable_error(self):
        raise NeedsTwoArgs("first", "second")

    def unpicklable_result(self):
        return threading.Lock()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def _secret(self):
        return "never exposed"


@pytest.fixture
def served():
    server = RpcServer(Service()).serve_in_thread()
    client = RpcClient(server.address, timeout=10)
    yield server, client
    client.disconnect()
    server.shutdown()


def test_round_trips_bytes_ints_dataclasses(served):
    server, client = served
    assert server.address.startswith("127.0.0.1:")
    assert client.echo(b"\x00\xffchunk") == b"\x00\xffchunk"
    assert client.add(2, b=40) == 42
    assert client.add(-(1 << 70), 1) == -(1 << 70) + 1
    assert client.meta(11) == ChunkMeta((11, 3), 7, 0xDEADBEEF)
    assert client.echo({"targets": (1, 2, 3), "none": None}) == {"targets": (1, 2, 3), "none": None}


def test_large_payload_is_intact(served):
    _, client = served
    payload = os.urandom(16 << 20)
    assert client.echo(payload) == payload


def test_remote_exceptions_keep_their_type(served):
    server, client = served
    with pytest.raises(FileNotFoundError) as info:
        client.missing("/data/x")
    assert info.value.errno == errno.ENOENT and info.value.filename == "/data/x"
    assert any(server.address in note for note in info.value.__notes__)
    with pytest.raises(QuotaExceeded, match="quota of 3 chunks"):
        client.over_quota()
    with pytest.raises(RuntimeError, match="NeedsTwoArgs"):
        client.unpicklable_error()
    with pytest.raises(RuntimeError, match="cannot be pickled"):
        client.unpicklable_result()
    assert client.add(1, 1) == 2  # the connection survives all of that


def test_unknown_private_and_disallowed_methods(served):
    _, client = served
    with pytest.raises(AttributeError, match="no_such_method"):
        client.no_such_method()
    with pytest.raises(AttributeError):
        client._secret()
    with pytest.raises(AttributeError, match="_secret"):
        client.call("_secret")
    with RpcServer(Service(), allowed={"echo"}).serve_in_thread() as narrow:
        with RpcClient(narrow.address) as limited:
            assert limited.echo(5) == 5
            with pytest.raises(AttributeError, match="add"):
                limited.add(1, 2)
    with pytest.raises(ValueError, match="nonexistent"):
        RpcServer(Service(), allowed={"echo", "nonexistent"})
    with pytest.raises(ValueError, match="host:port"):
        RpcClient("localhost")


def test_concurrent_calls_from_eight_threads(served):
    server, client = served
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(50):
                assert client.add(k, i) == k + i
                assert client.echo(bytes([k]) * i) == bytes([k]) * i
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert server.obj.calls == 8 * 50

    # calls really overlap: 8 sleeps of 0.3 s take far less than 2.4 s
    start = time.monotonic()
    sleepers = [threading.Thread(target=client.sleep, args=(0.3,)) for _ in range(8)]
    for t in sleepers:
        t.start()
    for t in sleepers:
        t.join()
    assert time.monotonic() - start < 1.6


def test_connections_of_finished_threads_are_closed(served):
    server, client = served
    threads = [threading.Thread(target=client.add, args=(k, k)) for k in range(20)]
    for t in threads:
        t.start()
        t.join()  # one at a time: each thread opens its own connection, then ends
    deadline = time.monotonic() + 5
    while server.open_connections > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.open_connections == 0


def test_shutdown_gives_node_unavailable_naming_the_address():
    server = RpcServer(Service()).serve_in_thread()
    address = server.address
    client = RpcClient(address, timeout=5)
    assert client.echo(1) == 1
    server.shutdown()
    with pytest.raises(NodeUnavailable, match=address.replace(".", r"\.")):
        client.echo(2)  # the pooled connection was closed by the server
    with pytest.raises(NodeUnavailable, match=address.replace(".", r"\.")):
        client.echo(3)  # a fresh connection is refused
    assert isinstance(NodeUnavailable("x"), ConnectionError)


def test_reply_timeout_is_node_unavailable_and_the_client_recovers(served):
    server, _ = served
    impatient = RpcClient(server.address, timeout=0.2)
    with pytest.raises(NodeUnavailable, match="sleep"):
        impatient.sleep(1.0)
    assert impatient.add(20, 22) == 42  # a new connection replaces the abandoned one
    impatient.disconnect()


def test_idle_connection_to_a_restarted_server_is_replaced():
    first = RpcServer(Service()).serve_in_thread()
    host, port = first.address.rsplit(":", 1)
    client = RpcClient(first.address, timeout=5)
    assert client.echo("before") == "before"
    first.shutdown()
    second = RpcServer(Service(), host=host, port=int(port)).serve_in_thread()
    try:
        assert client.echo("after") == "after"  # the stale pooled socket was detected, nothing resent
        assert second.obj.calls == 1
    finally:
        client.disconnect()
        second.shutdown()


_SERVER_SCRIPT = """
import time
from storage.threefs.net.transport import RpcServer

class Chunks:
    def __init__(self):
        self.data = {}
    def put(self, key, value):
        self.data[key] = value
        return len(value)
    def get(self, key):
        return self.data[key]
    def pid(self):
        import os
        return os.getpid()

server = RpcServer(Chunks()).serve_in_thread()
print(server.address, flush=True)
while True:
    time.sleep(60)
"""


def test_subprocess_server_killed_with_sigkill():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), process.stderr.read()
        client = RpcClient(address, timeout=10)
        assert client.pid() == process.pid
        assert client.put((1, 0), b"x" * 1000) == 1000
        assert client.get((1, 0)) == b"x" * 1000
        with pytest.raises(KeyError):
            client.get((2, 0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        with pytest.raises(NodeUnavailable) as info:
            client.get((1, 0))
        assert address in str(info.value)
        with pytest.raises(NodeUnavailable, match=address.replace(".", r"\.")):
            RpcClient(address, timeout=2).pid()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()
