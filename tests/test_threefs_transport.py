"""storage.threefs.net.transport: method calls over real loopback sockets, failures as NodeUnavailable,
only between holders of the cluster secret, and no code run by what a peer sends."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from storage.threefs.errors import NodeUnavailable
from storage.threefs.net.auth import HANDSHAKE_MAGIC, AuthenticationError, client_handshake, load_or_create_secret
from storage.threefs.net.codec import Codec
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
    def __init__(self, a, b):  # registered, but cannot be rebuilt from args=(a,)
        super().__init__(a)
        self.b = b


CODEC = Codec([ChunkMeta, QuotaExceeded, NeedsTwoArgs])
SECRET = os.urandom(32)


def serve(obj, **kwargs) -> RpcServer:
    return RpcServer(obj, codec=CODEC, secret=SECRET, **kwargs)


def connect(address: str, timeout: float | None = 30.0, secret: bytes = SECRET) -> RpcClient:
    return RpcClient(address, timeout, codec=CODEC, secret=secret)


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

    def slow(self, seconds: float, value):
        time.sleep(seconds)
        return value

    def meta(self, inode: int) -> ChunkMeta:
        return ChunkMeta((inode, 3), version=7, checksum=0xDEADBEEF)

    def missing(self, path: str):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)

    def over_quota(self):
        raise QuotaExceeded("quota of 3 chunks exceeded")

    def unpicklable_error(self):
        raise NeedsTwoArgs("first", "second")

    def unencodable_result(self):
        return threading.Lock()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def _secret(self):
        return "never exposed"


@pytest.fixture
def served():
    server = serve(Service()).serve_in_thread()
    client = connect(server.address, timeout=10)
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
    with pytest.raises(RuntimeError, match="cannot be encoded"):
        client.unencodable_result()
    assert client.add(1, 1) == 2  # the connection survives all of that


def test_unknown_private_and_disallowed_methods(served):
    _, client = served
    with pytest.raises(AttributeError, match="no_such_method"):
        client.no_such_method()
    with pytest.raises(AttributeError):
        client._secret()
    with pytest.raises(AttributeError, match="_secret"):
        client.call("_secret")
    with serve(Service(), allowed={"echo"}).serve_in_thread() as narrow:
        with connect(narrow.address) as limited:
            assert limited.echo(5) == 5
            with pytest.raises(AttributeError, match="add"):
                limited.add(1, 2)
    with pytest.raises(ValueError, match="nonexistent"):
        serve(Service(), allowed={"echo", "nonexistent"})
    with pytest.raises(ValueError, match="host:port"):
        connect("localhost")


def test_a_call_interrupted_mid_reply_leaves_no_reply_for_the_next_call(served):
    """An exception that is not a transport error (here raised by a signal handler while the call waits)
    drops the connection, so the abandoned call's late reply cannot answer the next call."""
    import os
    import signal

    class Interrupted(Exception):
        pass

    def interrupt(*_):
        raise Interrupted

    _, client = served
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            client.slow(0.5, b"late")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert client.slow(0, b"next") == b"next"  # sent before the abandoned reply arrived


def test_connections_on_descriptors_past_1024_are_reused_and_wait_for_replies(served):
    """select() cannot watch a descriptor >= FD_SETSIZE: the idle check and the in-place receive must
    not use it (they reconnected on every call, or raised ValueError mid-call)."""
    import os

    server, _ = served
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    client = connect(server.address, timeout=10)
    try:
        assert client.slow(0.05, b"first") == b"first"  # its socket is past descriptor 1100
        [connection] = client._open
        assert connection.sock.fileno() > 1024
        assert client.slow(0.05, b"second") == b"second"
        assert client._open == [connection]  # reused, not replaced after a failed idle check
        payload = b"p" * (8 << 20)  # more than the socket buffers: the in-place receive has to wait
        buffer = bytearray(len(payload))
        assert bytes(client.call_into(buffer, "slow", 0, payload)) == payload
    finally:
        client.disconnect()
        for fd in filler:
            os.close(fd)


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


def test_threads_share_one_connection_closed_by_disconnect(served):
    server, client = served
    threads = [threading.Thread(target=client.add, args=(k, k)) for k in range(20)]
    for t in threads:
        t.start()
        t.join()  # one at a time: every thread uses the one connection
    assert server.open_connections == 1 and client.open_connections == 1
    client.disconnect()
    deadline = time.monotonic() + 5
    while server.open_connections > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.open_connections == 0


def test_shutdown_gives_node_unavailable_naming_the_address():
    server = serve(Service()).serve_in_thread()
    address = server.address
    client = connect(address, timeout=5)
    assert client.echo(1) == 1
    server.shutdown()
    with pytest.raises(NodeUnavailable, match=address.replace(".", r"\.")):
        client.echo(2)  # the pooled connection was closed by the server
    with pytest.raises(NodeUnavailable, match=address.replace(".", r"\.")):
        client.echo(3)  # a fresh connection is refused
    assert isinstance(NodeUnavailable("x"), ConnectionError)


def test_reply_timeout_is_node_unavailable_and_the_client_recovers(served):
    server, _ = served
    impatient = connect(server.address, timeout=0.2)
    with pytest.raises(NodeUnavailable, match="sleep"):
        impatient.sleep(1.0)
    assert impatient.add(20, 22) == 42  # a new connection replaces the abandoned one
    impatient.disconnect()


def test_idle_connection_to_a_restarted_server_is_replaced():
    first = serve(Service()).serve_in_thread()
    host, port = first.address.rsplit(":", 1)
    client = connect(first.address, timeout=5)
    assert client.echo("before") == "before"
    first.shutdown()
    second = serve(Service(), host=host, port=int(port)).serve_in_thread()
    try:
        assert client.echo("after") == "after"  # the stale pooled socket was detected, nothing resent
        assert second.obj.calls == 1
    finally:
        client.disconnect()
        second.shutdown()


_SERVER_SCRIPT = """
import sys
import time
from pathlib import Path
from storage.threefs.net.auth import load_or_create_secret
from storage.threefs.net.codec import Codec
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

server = RpcServer(Chunks(), codec=Codec(), secret=load_or_create_secret(Path(sys.argv[1]))).serve_in_thread()
print(server.address, flush=True)
while True:
    time.sleep(60)
"""


def test_subprocess_server_killed_with_sigkill(tmp_path):
    secret = load_or_create_secret(tmp_path)  # the server process reads the same file
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(tmp_path)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), process.stderr.read()
        with pytest.raises(AuthenticationError):
            connect(address, timeout=10).pid()  # the test module's own secret is not this cluster's
        client = connect(address, timeout=10, secret=secret)
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
            connect(address, timeout=2, secret=secret).pid()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


# ---- authentication and hostile input ---------------------------------------------------------------

def wait_for_warning(caplog, text: str, timeout: float = 5.0) -> str:
    """The first transport warning containing `text` (the server logs from its connection thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "storage.threefs.net.transport" and text in record.getMessage():
                return record.getMessage()
        time.sleep(0.01)
    raise AssertionError(f"no transport warning containing {text!r}: {[r.getMessage() for r in caplog.records]}")


def raw_connection(address: str) -> tuple[socket.socket, str]:
    """A plain socket to `address` and its own "host:port" (as the server names the peer)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    local_host, local_port = sock.getsockname()[:2]
    return sock, f"{local_host}:{local_port}"


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes `sock` (within its 5 s timeout), whatever it sent before."""
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_client_without_the_secret_is_refused_and_logged_and_others_are_served(served, caplog):
    server, client = served
    caplog.set_level(logging.WARNING, logger="storage.threefs.net.transport")
    with pytest.raises(AuthenticationError, match=server.address.replace(".", r"\.")) as info:
        connect(server.address, timeout=5, secret=os.urandom(32)).echo(1)
    assert not isinstance(info.value, NodeUnavailable)  # callers retry NodeUnavailable, not a wrong secret
    wait_for_warning(caplog, "failed the handshake")
    sock, peer = raw_connection(server.address)
    with sock:
        assert sock.recv(36, socket.MSG_WAITALL)[:4] == HANDSHAKE_MAGIC  # magic + nonce
        sock.sendall(b"GET / HTTP/1.1\r\n" + b"\r\n" * 24)  # 64 bytes of garbage for a proof
        assert closed_by_server(sock)
    assert "client's proof" in wait_for_warning(caplog, peer)
    assert client.echo("still serving") == "still serving"
    assert connect(server.address, timeout=5).add(1, 2) == 3


def test_a_silent_client_is_dropped_after_the_handshake_timeout(caplog):
    caplog.set_level(logging.WARNING, logger="storage.threefs.net.transport")
    with serve(Service(), handshake_timeout=0.2).serve_in_thread() as server:
        sock, peer = raw_connection(server.address)
        with sock:
            assert closed_by_server(sock)
        assert "timed out" in wait_for_warning(caplog, peer)
        assert connect(server.address, timeout=5).echo(7) == 7


def test_a_server_that_never_answers_the_handshake_is_node_unavailable():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog) but never speaks
        address = "%s:%d" % listener.getsockname()[:2]
        with pytest.raises(NodeUnavailable, match="handshake"):
            connect(address, timeout=0.3).echo(1)


def authenticated_connection(address: str) -> tuple[socket.socket, str]:
    sock, peer = raw_connection(address)
    client_handshake(sock, SECRET)
    return sock, peer


def codec_body(header: bytes) -> bytes:
    return b"3FW1" + struct.pack(">I", len(header)) + header


@pytest.mark.parametrize("body", [
    b"not a frame at all",
    codec_body(b"[1,2]"),  # no tag
    codec_body(b'["l",1,2]'),  # a valid value of the wrong shape: a request is a 3-tuple
    codec_body(b'["o","os.system",{"command":"touch pwned"}]'),  # a type name not in the registry
    codec_body(b'["t","echo",["t"],["d",1,2]]'),  # kwargs with a non-str key
])
def test_a_malformed_frame_after_the_handshake_is_refused_and_logged(served, caplog, body):
    server, client = served
    caplog.set_level(logging.WARNING, logger="storage.threefs.net.transport")
    sock, peer = authenticated_connection(server.address)
    with sock:
        sock.sendall(struct.pack(">QQ", len(body), 1) + body)
        assert closed_by_server(sock)
    assert "malformed request" in wait_for_warning(caplog, peer)
    assert client.echo("still serving") == "still serving"


class _CreatesFile:
    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):  # unpickling this would call open(path, "w"): the file would appear
        return (open, (str(self.path), "w"))


def test_a_pickle_is_never_unpickled(served, caplog, tmp_path):
    server, client = served
    caplog.set_level(logging.WARNING, logger="storage.threefs.net.transport")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(("echo", (_CreatesFile(marker),), {}))
    frame = struct.pack(">QQ", len(payload), 1) + payload
    sock, _ = raw_connection(server.address)  # the old protocol: a pickle frame straight away
    with sock:
        sock.sendall(frame)
        assert closed_by_server(sock)
    sock, peer = authenticated_connection(server.address)  # and after a good handshake
    with sock:
        sock.sendall(frame)
        assert closed_by_server(sock)
    assert "bad magic" in wait_for_warning(caplog, peer)
    assert not marker.exists()
    assert client.echo(1) == 1
