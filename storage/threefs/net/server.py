"""``RpcServer``: exposes an object's public methods to ``RpcClient`` (``transport.py``, whose docstring
states the protocol and the failure rules).

The server accepts connections on a daemon thread, authenticates each (``auth.py``), then serves it with a
``ServedConnection`` (``served_connection.py``: several requests of one connection at once, each run on
the thread that read it, at most ``max_in_flight``). Each request's segment area is received into a
``RequestBuffer`` (``request_buffer.py``); the ``view_methods`` get their bytes arguments as views of it.
Errors raised by the served object become error replies; a connection that fails the handshake or sends a
malformed frame is logged and closed, and everyone else keeps being served.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from storage.threefs.net.auth import DEFAULT_TIMEOUT, AuthenticationError, server_handshake
from storage.threefs.net.codec import PREFIX_SIZE, Codec, WireFormatError
from storage.threefs.net.framing import HEADER as _HEADER, MAX_FRAME as _MAX_FRAME, recv_exact as _recv_exact
from storage.threefs.net.framing import recv_into as _recv_into
from storage.threefs.net.request_buffer import RequestBuffer
from storage.threefs.net.served_connection import MAX_IN_FLIGHT, ServedConnection

LOGGER = "storage.threefs.net.transport"  # the RPC layer's logger, named for its public module


def check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("secret: expected the cluster's secret, at least 16 bytes (auth.load_or_create_secret)")
    return secret


class RpcServer:
    """Serves the public methods of ``obj`` (names not starting with ``_``; only ``allowed`` if given).

    host/port: where to listen (port 0 picks a free port; ``address`` tells which). codec: the types that
    may travel. secret: the cluster's secret; a client must prove it holds it within
    ``handshake_timeout`` seconds of connecting. Start with ``serve_in_thread()``; ``shutdown()`` closes
    the listener and every open connection, so clients see ``NodeUnavailable`` as if the process had died.
    view_methods: methods whose bytes arguments arrive as writable memoryviews of the connection's
    request buffer (no copy; a write's payload goes straight to ``pwrite``), valid during the call: the
    method only reads them (a view it keeps past the call is safe, it merely stops the buffer's reuse:
    ``RequestBuffer``). Every other method gets bytes. max_in_flight: how many requests of one
    connection run at once (``served_connection.py``); past that the server stops reading it.
    """

    def __init__(self, obj: Any, host: str = "127.0.0.1", port: int = 0, allowed: set[str] | None = None, *,
                 codec: Codec, secret: bytes, handshake_timeout: float = DEFAULT_TIMEOUT,
                 view_methods: set[str] | frozenset[str] = frozenset(), max_in_flight: int = MAX_IN_FLIGHT):
        self.max_in_flight = max_in_flight
        self._codec, self._cluster_secret, self._handshake_timeout = codec, check_secret(secret), handshake_timeout
        self._view_methods = frozenset(view_methods)
        if allowed is not None:
            bad = sorted(name for name in allowed if name.startswith("_") or not callable(getattr(obj, name, None)))
            if bad:
                raise ValueError(f"allowed={bad}: not public methods of {type(obj).__name__}")
        self.obj = obj
        self.allowed = frozenset(allowed) if allowed is not None else None
        self._listener = socket.create_server((host, port))
        bound_host, bound_port = self._listener.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._accept_thread: threading.Thread | None = None

    @property
    def open_connections(self) -> int:
        """How many client connections are being served now."""
        with self._lock:
            return len(self._connections)

    def serve_in_thread(self) -> RpcServer:
        """Starts accepting connections on a daemon thread; returns self."""
        if self._accept_thread is not None:
            raise RuntimeError(f"RpcServer {self.address} is already serving")
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"rpc-accept-{self.address}",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        """Serves on the calling thread until ``shutdown`` (for a server process's main thread)."""
        self.serve_in_thread()
        self._stopped.wait()

    def shutdown(self) -> None:
        """Stops serving: closes the listener and all connections (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5)

    def __enter__(self) -> RpcServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # listener closed by shutdown
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopped.is_set():
                    conn.close()
                    return
                self._connections.add(conn)
            peer_address = f"{peer[0]}:{peer[1]}"
            threading.Thread(target=self._serve_connection, args=(conn, peer_address),
                             name=f"rpc-conn-{self.address}", daemon=True).start()

    def _serve_connection(self, conn: socket.socket, peer: str) -> None:
        """Authenticates the peer, then serves its requests until it closes or sends a malformed frame."""
        try:
            server_handshake(conn, self._cluster_secret, self._handshake_timeout)
        except AuthenticationError as exc:
            self._refuse(peer, f"failed the handshake: {exc}")
            self._forget(conn)
            conn.close()
            return
        except OSError:
            self._forget(conn)
            conn.close()
            return
        ServedConnection(conn, peer, self._receive_one, self._answer, self.max_in_flight).serve()
        self._forget(conn)

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _refuse(self, peer: str, why: str) -> None:
        if not self._stopped.is_set():  # shutdown interrupting a handshake is no news
            logging.getLogger(LOGGER).warning("RPC server %s: closing the connection from %s, which %s",
                                                self.address, peer, why)

    def _receive_one(self, conn: socket.socket, peer: str, requests: RequestBuffer) -> tuple | None:
        """Receives one request: (request id, method, args, kwargs); None when the peer closed the
        connection between frames or sent a malformed frame (refused and logged)."""
        try:
            head = bytearray(_HEADER.size + PREFIX_SIZE)
            if not _recv_into(conn, memoryview(head), frame_start=True):
                return None
            length, request_id = _HEADER.unpack_from(head)
            if length > _MAX_FRAME:
                raise WireFormatError(f"frame length {length} exceeds {_MAX_FRAME}: not this protocol")
            if length < PREFIX_SIZE:
                raise WireFormatError(f"frame of {length} bytes is shorter than its {PREFIX_SIZE}-byte prefix")
            header_length = self._codec.header_length(memoryview(head)[_HEADER.size:])
            if PREFIX_SIZE + header_length > length:
                raise WireFormatError(f"frame of {length} bytes cannot hold a {header_length}-byte header")
            head += _recv_exact(conn, header_length)
            tree = self._codec.parse_head(memoryview(head)[_HEADER.size:])
            views = type(tree) is list and len(tree) > 1 and type(tree[1]) is str and tree[1] in self._view_methods
            segments = requests.receive(conn, length - PREFIX_SIZE - header_length)
            return (request_id, *self._check_request(self._codec.build(
                tree, segments if views else segments.toreadonly(), views=views)))
        except WireFormatError as exc:
            self._refuse(peer, f"sent a malformed request: {exc}")
            return None

    def _answer(self, method: str, args: tuple, kwargs: dict) -> list[bytes | bytearray | memoryview]:
        """Runs one request; the encoded reply."""
        return self._encode_reply(self._dispatch(method, args, kwargs))

    @staticmethod
    def _check_request(request: Any) -> tuple[str, tuple, dict]:
        if not (type(request) is tuple and len(request) == 3 and type(request[0]) is str
                and type(request[1]) is tuple and type(request[2]) is dict
                and all(type(key) is str for key in request[2])):
            raise WireFormatError(f"a request is (method: str, args: tuple, kwargs: dict[str, ...]), "
                                  f"not {type(request).__qualname__} {str(request)[:100]}")
        return request

    def _encode_reply(self, reply: tuple[str, Any]) -> list[bytes | bytearray | memoryview]:
        try:
            return self._codec.encode(reply)
        except WireFormatError as exc:  # a return value of an unregistered type becomes an error reply
            error = RuntimeError(f"reply of type {type(reply[1]).__qualname__} cannot be encoded: {exc}")
            return self._codec.encode(("err", error))

    def _dispatch(self, method: str, args: tuple, kwargs: dict) -> tuple[str, Any]:
        try:
            if method.startswith("_") or (self.allowed is not None and method not in self.allowed):
                raise AttributeError(f"{type(self.obj).__name__} at {self.address} exposes no method {method!r}")
            function = getattr(self.obj, method, None)
            if not callable(function):
                raise AttributeError(f"{type(self.obj).__name__} at {self.address} has no method {method!r}")
            return ("ok", function(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller (the codec replaces
            return ("err", exc)   # one it cannot encode by a RuntimeError naming its type)
