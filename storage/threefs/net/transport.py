"""Method calls between this 3FS's services over TCP: ``RpcServer`` exposes an object, ``RpcClient`` calls it.

3FS's services (mgmtd, meta, storage) talk through their own RPC framework (serde-encoded messages over
RDMA or TCP, no authentication: the cluster network is trusted). This is the same idea at its smallest:

  frame    = 8-byte big-endian payload length, then the payload (a pickle)
  request  = (method_name: str, args: tuple, kwargs: dict)
  reply    = ("ok", return_value) | ("err", exception)

The server runs one thread per connection; the client keeps one connection per calling thread (so
calls from many threads run concurrently, and a connection never interleaves two calls). Exceptions
raised by the served object travel back and are re-raised in the caller with their own type (a note
names the server and method); one that cannot be pickled arrives as a ``RuntimeError`` carrying its repr.

Failure rule: a refused, reset, closed or timed-out connection raises ``errors.NodeUnavailable`` naming
the address. A call is never retried by this layer once its request may have reached the server (the
caller decides whether the operation is safe to repeat); an idle pooled connection the server has
already closed is detected before use and replaced, which sends nothing twice.

Security: unpickling runs code chosen by the sender. Serve only on loopback (the default) or a private,
trusted network, as 3FS itself assumes of its RPC.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
import threading
import traceback
import weakref
from typing import Any

from storage.threefs.errors import NodeUnavailable

_HEADER = struct.Struct(">Q")
_MAX_FRAME = 1 << 40  # a header announcing more than this is a protocol error, not a payload


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    header = _HEADER.pack(len(payload))
    if len(payload) < 65536:
        sock.sendall(header + payload)  # one segment for small messages
    else:
        sock.sendall(header)
        sock.sendall(payload)  # no copy of a large payload


def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """Reads exactly n bytes; None if the peer closed the connection before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0:
                return None
            raise ConnectionResetError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def _recv_frame(sock: socket.socket) -> bytearray | None:
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > _MAX_FRAME:
        raise ConnectionResetError(f"frame length {length} exceeds {_MAX_FRAME}: not this protocol")
    payload = _recv_exact(sock, length) if length else bytearray()
    if payload is None:
        raise ConnectionResetError("connection closed between frame header and payload")
    return payload


def _picklable_error(exc: BaseException) -> BaseException:
    """The exception itself if it survives a pickle round trip, else a RuntimeError with its repr."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send a description instead
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return RuntimeError(f"unpicklable remote exception {type(exc).__qualname__}: {text}")


class RpcServer:
    """Serves the public methods of ``obj`` (names not starting with ``_``; only ``allowed`` if given).

    host/port: where to listen (port 0 picks a free port; ``address`` tells which). Start with
    ``serve_in_thread()``; ``shutdown()`` closes the listener and every open connection, so clients see
    ``NodeUnavailable`` as if the process had died.
    """

    def __init__(self, obj: Any, host: str = "127.0.0.1", port: int = 0, allowed: set[str] | None = None):
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
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed by shutdown
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopped.is_set():
                    conn.close()
                    return
                self._connections.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn,), name=f"rpc-conn-{self.address}",
                             daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            while True:
                request = _recv_frame(conn)
                if request is None:
                    return
                reply = self._dispatch(request)
                try:
                    payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as exc:  # noqa: BLE001 - an unpicklable return value becomes an error reply
                    error = RuntimeError(f"reply of type {type(reply[1]).__qualname__} cannot be pickled: {exc!r}")
                    payload = pickle.dumps(("err", error), protocol=pickle.HIGHEST_PROTOCOL)
                _send_frame(conn, payload)
        except OSError:
            return  # client went away or shutdown closed the socket
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _dispatch(self, request: bytearray) -> tuple[str, Any]:
        try:
            method, args, kwargs = pickle.loads(request)
            if not isinstance(method, str) or method.startswith("_") or (
                    self.allowed is not None and method not in self.allowed):
                raise AttributeError(f"{type(self.obj).__name__} at {self.address} exposes no method {method!r}")
            function = getattr(self.obj, method, None)
            if not callable(function):
                raise AttributeError(f"{type(self.obj).__name__} at {self.address} has no method {method!r}")
            return ("ok", function(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
            return ("err", _picklable_error(exc))


class _Connection:
    """One pooled socket; closed when its thread ends (the thread-local drops it) or the client closes."""

    __slots__ = ("sock", "__weakref__")

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    def __del__(self) -> None:
        self.sock.close()


class RpcClient:
    """A proxy for the object served at ``address`` ("host:port"): ``client.method(*args, **kw)``.

    timeout: seconds for connecting and for each reply (None waits forever). Each calling thread has its
    own connection, opened on first use and reopened after a failure. Any transport failure raises
    ``NodeUnavailable`` naming the address and method; the call is not retried. Names starting with
    ``_`` are never sent (``AttributeError`` locally); a name the server does not expose raises
    ``AttributeError`` from the server.
    """

    def __init__(self, address: str, timeout: float | None = 30.0):
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address={address!r}: expected 'host:port'")
        self._address = address
        self._endpoint = (host, int(port))
        self._timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._closed = False

    @property
    def address(self) -> str:
        return self._address

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def remote_method(*args, **kwargs):
            return self.call(name, *args, **kwargs)

        remote_method.__name__ = name
        return remote_method

    def call(self, method: str, *args, **kwargs) -> Any:
        """Calls ``method`` remotely and returns its result, or re-raises its exception."""
        if self._closed:
            raise ValueError(f"RpcClient for {self._address} is closed")
        request = pickle.dumps((method, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        connection = self._connection(method)
        try:
            _send_frame(connection.sock, request)
            reply = _recv_frame(connection.sock)
            if reply is None:
                raise ConnectionResetError("server closed the connection before replying")
        except OSError as exc:  # includes socket.timeout
            self._drop(connection)
            raise NodeUnavailable(f"{self._address}: call {method!r} failed: {exc!r}") from exc
        status, value = pickle.loads(reply)
        if status == "ok":
            return value
        if isinstance(value, BaseException):
            value.add_note(f"raised by {method!r} on the server at {self._address}")
            raise value
        raise RuntimeError(f"{self._address}: malformed reply to {method!r}: {status!r}")

    def disconnect(self) -> None:
        """Closes every connection this client opened (from any thread). Not ``close``: that name is
        left to the served object (a metadata service closes files)."""
        self._closed = True
        with self._lock:
            connections = list(self._open)
            self._open.clear()
        for connection in connections:
            connection.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.disconnect()

    def __repr__(self) -> str:
        return f"RpcClient({self._address!r})"

    def _connection(self, method: str) -> _Connection:
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._stale(connection.sock):
            self._drop(connection)
            connection = None
        if connection is None:
            try:
                sock = socket.create_connection(self._endpoint, timeout=self._timeout)
            except OSError as exc:
                raise NodeUnavailable(f"{self._address}: cannot connect for {method!r}: {exc!r}") from exc
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._timeout)
            connection = _Connection(sock)
            self._local.connection = connection
            with self._lock:
                self._open.add(connection)
        return connection

    @staticmethod
    def _stale(sock: socket.socket) -> bool:
        """An idle connection is readable only if the server closed it (EOF or reset)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _drop(self, connection: _Connection) -> None:
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._open.discard(connection)
        connection.close()
