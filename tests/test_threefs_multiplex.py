"""Several requests in flight on one RPC connection (net/multiplexer.py, net/served_connection.py):
every caller gets exactly its own reply (payloads derived from the arguments), in place for call_into,
late replies answer nobody, a dead connection fails every call on it, and the server bounds its work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage.threefs.errors import NodeUnavailable
from storage.threefs.net.auth import server_handshake
from storage.threefs.net.codec import Codec
from storage.threefs.net.framing import HEADER, recv_frame
from storage.threefs.net.transport import ReplyBuffer, RpcClient, RpcServer

CODEC = Codec()
SECRET = os.urandom(32)
REPO_ROOT = Path(__file__).resolve().parents[1]


def pattern(caller: int, call: int, size: int) -> bytes:
    """The payload of one call: a function of its arguments only."""
    return (caller * 1000 + call).to_bytes(4, "big") * (size // 4)


class Service:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most_running = 0

    def payload(self, caller: int, call: int, size: int, delay: float) -> bytes:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(delay)  # varying: replies come back out of order
        with self.lock:
            self.running -= 1
        return pattern(caller, call, size)

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


@pytest.fixture
def served():
    with RpcServer(Service(), codec=CODEC, secret=SECRET).serve_in_thread() as server:
        client = RpcClient(server.address, timeout=10, codec=CODEC, secret=SECRET)
        try:
            yield server, client
        finally:
            client.disconnect()


def test_many_threads_on_one_connection_get_their_own_replies_out_of_order(served):
    server, client = served

    def caller(k: int) -> None:
        for i in range(12):
            delay = ((k * 7 + i * 3) % 5) * 0.004
            if i % 2:
                assert client.payload(k, i, 64 + 4 * i, delay) == pattern(k, i, 64 + 4 * i)
            else:
                buffer = bytearray(256 << 10)
                value = client.call_into(buffer, "payload", k, i, 128 << 10, delay)
                assert bytes(value) == pattern(k, i, 128 << 10) == bytes(buffer[:128 << 10])

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(caller, k) for k in range(16)]:
            future.result()
    assert client.open_connections == 1 and server.open_connections == 1
    assert server.obj.most_running > 1  # the server ran one connection's requests concurrently


def test_call_into_with_several_in_flight_fills_each_callers_buffer(served):
    _, client = served
    buffers = [bytearray(1 << 20) for _ in range(8)]

    def read(k: int) -> None:
        client.call_into(ReplyBuffer(buffers[k]), "payload", k, 0, 1 << 20, (8 - k) * 0.01)  # last sent, first back

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read, range(8)))
    for k, buffer in enumerate(buffers):
        assert buffer == pattern(k, 0, 1 << 20)


def test_a_timed_out_calls_late_reply_is_dropped_and_the_next_call_gets_its_own(served):
    server, _ = served
    impatient = RpcClient(server.address, timeout=0.2, codec=CODEC, secret=SECRET)
    try:
        buffer = bytearray(1 << 20)
        with pytest.raises(NodeUnavailable, match="payload"):
            impatient.call_into(buffer, "payload", 1, 1, 1 << 20, 0.3)
        assert impatient.payload(2, 2, 64, 0.15) == pattern(2, 2, 64)  # in flight when the late reply comes
        time.sleep(0.1)
        assert buffer == bytes(1 << 20)  # the abandoned reply never landed in the caller's buffer
        assert impatient.payload(3, 3, 64, 0) == pattern(3, 3, 64)
        assert impatient.open_connections == 1  # the timeout did not cost the connection
    finally:
        impatient.disconnect()


def test_a_revoked_reply_buffer_fails_only_its_call(served):
    _, client = served
    guarded = ReplyBuffer(bytearray(4 << 20))
    outcome: list = []

    def revocable() -> None:
        try:
            outcome.append(client.call_into(guarded, "payload", 9, 9, 4 << 20, 0.3))
        except NodeUnavailable as exc:
            outcome.append(exc)

    thread = threading.Thread(target=revocable)
    thread.start()
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(client.payload, k, 1, 1 << 16, 0.4) for k in range(4)]
        time.sleep(0.1)
        guarded.revoke()
        thread.join(5)
        assert [f.result() for f in others] == [pattern(k, 1, 1 << 16) for k in range(4)]
    assert isinstance(outcome[0], NodeUnavailable) and "revoked" in str(outcome[0])
    assert guarded.view.tobytes() == bytes(4 << 20)
    assert client.open_connections == 1


_SERVER = """
import sys, time
from storage.threefs.net.codec import Codec
from storage.threefs.net.transport import RpcServer
class Slow:
    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds
server = RpcServer(Slow(), codec=Codec(), secret=bytes.fromhex(sys.argv[1]))
print(server.address, flush=True)
server.serve_forever()
"""


def test_killing_the_server_fails_every_call_in_flight_promptly():
    process = subprocess.Popen([sys.executable, "-c", _SERVER, SECRET.hex()], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               text=True)
    try:
        address = process.stdout.readline().strip()
        client = RpcClient(address, timeout=30, codec=CODEC, secret=SECRET)
        assert client.sleep(0) == 0
        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(client.sleep, 20) for _ in range(8)]
            time.sleep(0.3)
            start = time.monotonic()
            process.kill()
            errors = [f.exception(timeout=5) for f in calls]
        assert time.monotonic() - start < 3
        assert all(isinstance(error, NodeUnavailable) and address in str(error) for error in errors)
        assert all(getattr(error, "request_sent", True) for error in errors)  # they had left: never resent
        client.disconnect()
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()


def test_sixteen_callers_share_one_connection_or_the_bound(served):
    server, _ = served
    for bound in (1, 3):
        client = RpcClient(server.address, timeout=10, codec=CODEC, secret=SECRET, connections=bound)
        try:
            with ThreadPoolExecutor(16) as pool:
                assert list(pool.map(lambda _: client.sleep(0.2), range(16))) == [0.2] * 16
            assert client.open_connections == bound
        finally:
            client.disconnect()


def test_the_server_bounds_the_requests_in_flight_per_connection():
    service = Service()
    with RpcServer(service, codec=CODEC, secret=SECRET, max_in_flight=3).serve_in_thread() as server, \
            RpcClient(server.address, timeout=10, codec=CODEC, secret=SECRET) as client, ThreadPoolExecutor(12) as pool:
        start = time.monotonic()
        results = list(pool.map(lambda k: client.payload(k, 0, 8, 0.1), range(12)))
        assert results == [pattern(k, 0, 8) for k in range(12)]
        assert service.most_running == 3  # never more than the bound, and the bound was used
        assert time.monotonic() - start >= 0.39  # 12 calls of 0.1 s, 3 at a time


def test_large_replies_finishing_together_arrive_whole(served):
    """Replies larger than the socket buffers, sent at once by several workers: frames never interleave."""
    _, client = served

    def caller(k: int) -> None:
        for i in range(3):
            assert client.payload(k, i, 4 << 20, 0) == pattern(k, i, 4 << 20)

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(caller, k) for k in range(8)]:
            future.result()


def test_a_call_that_times_out_while_another_caller_receives_its_reply_leaves_its_buffer_alone():
    """A hand-written server dribbles the reply of a call_into (pauses shorter than the socket's timeout):
    another caller, the connection's reader, is receiving it into the caller's buffer when the caller's
    deadline passes. From the moment the call raised, its buffer must not change (the call revokes it;
    the reader discards the rest)."""
    size, first, chunk = 1 << 20, 256 << 10, 128 << 10
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[str] = []
    got_hold = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            server_handshake(conn, SECRET, 5)
            while True:
                frame = recv_frame(conn)
                if frame is None:
                    return
                request_id, body = frame
                method = CODEC.decode(body)[0]
                requests.append(method)
                if method == "hold":  # never answered: its caller is the reader meanwhile
                    got_hold.set()
                    continue
                parts = b"".join(bytes(part) for part in CODEC.encode(("ok", pattern(7, 7, size))))
                frame_bytes = HEADER.pack(len(parts), request_id) + parts
                start = len(frame_bytes) - size + first
                conn.sendall(frame_bytes[:start])
                while start < len(frame_bytes):
                    time.sleep(0.3)  # shorter than the socket's timeout: the connection stays up
                    conn.sendall(frame_bytes[start:start + chunk])
                    start += chunk

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = RpcClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout=1.0, codec=CODEC, secret=SECRET)
    buffer = bytearray(size)
    try:
        holder = ThreadPoolExecutor(1)
        held = holder.submit(client.hold)  # its caller takes the receive lock and waits for frames
        assert got_hold.wait(5)
        time.sleep(0.1)
        with pytest.raises(NodeUnavailable, match="no reply within"):
            client.call_into(buffer, "big")
        snapshot = bytes(buffer)
        assert snapshot[:first] == pattern(7, 7, size)[:first]  # the reader was receiving into it
        with pytest.raises(NodeUnavailable):
            held.result(10)  # the reader reads the dribbled frame to its end, then times out itself
        server.join(0.1)
        time.sleep(0.7)  # the rest of the frame has arrived meanwhile
        assert bytes(buffer) == snapshot  # nothing landed after the call returned
        holder.shutdown()
    finally:
        client.disconnect()
        listener.close()
