"""RpcServer's request buffer (net/transport.py ``_RequestBuffer``): a view method's bytes arguments are
views of the connection's reused buffer, never overwritten while someone still holds them; every other
method gets bytes. References: the bytes the client sent."""

from __future__ import annotations

import logging
import os
import socket
import struct

import pytest

from storage.threefs.net.auth import client_handshake
from storage.threefs.net.codec import Codec
from storage.threefs.net.transport import RpcClient, RpcServer

CODEC = Codec()
SECRET = os.urandom(32)
SIZE = 256 << 10


class Keeper:
    """Keeps what it is given (a view method that breaks the 'only during the call' rule)."""

    def __init__(self) -> None:
        self.kept: list = []

    def keep(self, data) -> int:
        self.kept.append(data)
        return len(data)

    def kept_bytes(self) -> list[bytes]:
        return [bytes(item) for item in self.kept]

    def kind(self, data) -> list:
        return [type(data).__name__, isinstance(data, memoryview) and not data.readonly]

    def same_buffer(self, data) -> bool:
        """Whether `data` views the buffer the previous call's view did (holding the buffer object, not a
        view of it, leaves it free for reuse)."""
        previous = getattr(self, "_buffer", None)
        self._buffer = data.obj
        return data.obj is previous

    def digest(self, data) -> bytes:
        return bytes(data[:16]) + bytes(data[-16:])


@pytest.fixture
def pair():
    keeper = Keeper()
    with RpcServer(keeper, codec=CODEC, secret=SECRET,
                   view_methods={"keep", "kind", "same_buffer", "digest"}).serve_in_thread() as server:
        client = RpcClient(server.address, codec=CODEC, secret=SECRET)
        try:
            yield keeper, client
        finally:
            client.disconnect()


def test_a_kept_view_is_not_overwritten_by_the_next_request(pair):
    """A view method keeps its payload's view; the next requests (same size) must not land on it."""
    keeper, client = pair
    payloads = [os.urandom(SIZE) for _ in range(4)]
    for payload in payloads:
        assert client.keep(payload) == SIZE
        assert client.digest(os.urandom(SIZE)) is not None  # another request of the size in between
    assert client.kept_bytes() == payloads


def test_view_methods_get_writable_views_and_the_others_bytes():
    class Both(Keeper):
        def plain(self, data) -> list:
            return [type(data).__name__]

    with RpcServer(Both(), codec=CODEC, secret=SECRET, view_methods={"kind"}).serve_in_thread() as server:
        with RpcClient(server.address, codec=CODEC, secret=SECRET) as client:
            assert client.kind(os.urandom(SIZE)) == ["memoryview", True]
            assert client.kind(b"small") == ["memoryview", True]
            assert client.plain(os.urandom(SIZE)) == ["bytes"]
            assert client.plain(b"small") == ["bytes"]


def test_the_buffer_is_reused_once_no_view_survives(pair):
    """Requests whose views die with the call land in one buffer (no allocation per request), and the
    bytes a method sees are always the request's own."""
    _, client = pair
    client.same_buffer(os.urandom(SIZE))
    for _ in range(4):
        payload = os.urandom(SIZE)
        assert client.same_buffer(payload)
        assert client.digest(payload) == payload[:16] + payload[-16:]


def test_a_larger_request_after_a_smaller_one_arrives_whole(pair):
    _, client = pair
    for size in (10, SIZE, 3 * SIZE, SIZE // 2, 5 * SIZE):
        payload = os.urandom(size)
        assert client.digest(payload) == payload[:16] + payload[-16:]


def test_a_method_name_that_is_not_a_string_is_refused_and_the_server_serves_on(pair, caplog):
    """A header whose second node is a list (unhashable) must not crash the view-method lookup."""
    _, client = pair
    caplog.set_level(logging.WARNING)
    header = b'["t",["l"],["t"],["d"]]'
    body = struct.pack(">4sI", b"3FW1", len(header)) + header
    host, port = client.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        client_handshake(sock, SECRET, 5.0)
        sock.sendall(struct.pack(">QQ", len(body), 1) + body)
        sock.settimeout(5.0)
        assert sock.recv(1) == b""  # closed: refused as malformed
    assert any("malformed request" in record.getMessage() for record in caplog.records)
    payload = os.urandom(SIZE)
    assert client.digest(payload) == payload[:16] + payload[-16:]


def test_a_frame_shorter_than_its_prefix_is_refused(pair):
    _, client = pair
    host, port = client.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        client_handshake(sock, SECRET, 5.0)
        sock.sendall(struct.pack(">QQ", 3, 1) + b"3FW1\0\0\0\0")
        sock.settimeout(5.0)
        assert sock.recv(1) == b""
    assert client.digest(b"x" * 40) == b"x" * 32
