"""Method calls between this 3FS's services over TCP: ``RpcServer`` exposes an object, ``RpcClient`` calls it.

3FS's services (mgmtd, meta, storage) talk through their own RPC framework (serde-encoded messages over
RDMA or TCP). This is the same idea at its smallest:

  connection = the handshake of ``auth.py`` (both ends prove they hold the cluster's secret), then frames
  frame      = 16-byte header (body length, request id), then the body: one value in ``codec.py``'s format
  request    = (method_name: str, args: tuple, kwargs: dict)
  reply      = ("ok", return_value) | ("err", exception), with the id of the request it answers

Both ends take a ``Codec`` (its registry says which types may travel: ``wire_types.threefs_codec()`` for
3FS) and the cluster's secret (``auth.load_or_create_secret(root)``). ``RpcServer`` lives in ``server.py``
(re-exported here). Many requests are in flight on one connection: a client's calling threads share one
connection per server (``connections`` to have a few), each call tagged with its own request id; the callers
take turns reading the replies, each reader handing every reply to the call with its id until its own
arrives (``multiplexer.py``: no reader thread, so a lone caller reads its own reply). The server runs each
request on the thread that read it while another thread of the connection takes over the reading, each reply
written whole under a send lock in the order the methods finish, at most ``max_in_flight`` per connection
(past that it stops reading: backpressure; ``served_connection.py``). Exceptions raised by the served object
travel back and are re-raised in the caller with their own type if the codec knows it (a note names the
server and method), else as a ``RuntimeError`` naming the type.

Data path: a server connection receives each request's segment area into a buffer of a small pool it reuses
from request to request (``RequestBuffer``, ``request_buffer.py``: no zeroed allocation per request; a
buffer is reused only once its request finished and no view of it survives); the ``view_methods`` it serves
get their bytes arguments as views of it (a storage server's write payloads go to ``pwrite`` and to the
successor without a copy). A frame's parts go out in one ``sendmsg`` (large bytes values are never
concatenated; ``framing.py``); ``call_into(destination, ...)`` receives a reply's raw bytes (the codec's
segment area) with ``recv_into`` straight into the caller's buffer, behind a ``ReplyBuffer`` whose owner can
revoke it (a hedged read that another replica answered first; ``reply_buffer.py``): with several calls in
flight, the reply for request id k lands in the buffer registered for k.

Failure rules:
  * A refused, reset, closed or timed-out connection raises ``errors.NodeUnavailable`` naming the address;
    so does a server that accepts the connection but never answers the handshake (down or hung). A call
    is never retried by this layer once its request may have reached the server (the caller decides
    whether the operation is safe to repeat); an idle pooled connection the server has already closed is
    detected before use and replaced, which sends nothing twice. A connection that dies (EOF, reset, a
    frame stalled past the timeout, an interrupted send) fails every call in flight on it at once.
  * A call that times out or is interrupted forgets its request id (and revokes its ``ReplyBuffer``):
    its late reply is read and discarded, never taken as another call's; the connection stays up.
  * A server that answers the handshake but refuses the client's secret, or cannot prove its own, raises
    ``auth.AuthenticationError`` naming the address: not a ``NodeUnavailable``, so callers that retry an
    unavailable node do not retry this.
  * Arguments or a return value the codec cannot encode raise ``codec.WireFormatError`` in the caller
    (before sending) or come back as a ``RuntimeError`` (from the server); a malformed reply raises
    ``WireFormatError`` naming the address.
  * The server logs (``logging`` warning naming the peer) and closes a connection that fails the handshake
    or sends a malformed frame, and keeps serving everyone else.

Security: the wire format cannot run code when decoded, and only a process that can read the cluster's
secret file may call a server. Frames after the handshake are neither encrypted nor signed: serve on
loopback (the default) or a private network, as 3FS itself assumes of its RPC.
"""


from __future__ import annotations

import socket
import threading
import weakref
from typing import Any

from storage.threefs.net.auth import DEFAULT_TIMEOUT, AuthenticationError, PeerUnresponsive, client_handshake
from storage.threefs.net.codec import Codec, WireFormatError
from storage.threefs.net.multiplexer import MultiplexedConnection, NotSent
from storage.threefs.net.reply_buffer import ReplyBuffer  # re-exported
from storage.threefs.net.server import RpcServer, check_secret  # RpcServer re-exported
from storage.threefs.errors import NodeUnavailable

__all__ = ["ReplyBuffer", "RemoteMethods", "RpcClient", "RpcServer", "not_sent"]


def not_sent(error: NodeUnavailable) -> NodeUnavailable:
    """Marks a transport failure that happened before the request left this process (connect or
    handshake): it is safe to send again. The mark is an attribute the wire does not carry, so a
    NodeUnavailable a server raised and sent back never looks unsent, whatever its message says."""
    error.request_sent = False
    return error


class RemoteMethods:
    """Base of the client proxies: ``proxy.method(*args, **kw)`` is ``proxy.call("method", *args, **kw)``
    (names starting with ``_`` are never sent: ``AttributeError`` locally)."""

    def call(self, method: str, *args, **kwargs) -> Any:
        raise NotImplementedError

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def remote_method(*args, **kwargs):
            return self.call(name, *args, **kwargs)

        remote_method.__name__ = name
        return remote_method


class RpcClient(RemoteMethods):
    """A proxy for the object served at ``address`` ("host:port"): ``client.method(*args, **kw)``.

    timeout: seconds for connecting, for the handshake (None: ``auth.DEFAULT_TIMEOUT``), for each reply
    (None waits forever) and for each read or send of a frame once it started. codec: the types that may
    travel. secret: the cluster's secret. connections: how many connections to the server the calling
    threads share (opened and authenticated on first use, reopened after a failure; a new one only while
    every open one has calls in flight); each carries many calls at once (``multiplexer.py``). A
    transport failure raises ``NodeUnavailable`` naming the address and method; a server that refuses
    the secret raises ``AuthenticationError``; the call is not retried. Names starting with ``_`` are
    never sent (``AttributeError`` locally); a name the server does not expose raises ``AttributeError``
    from the server.
    """

    def __init__(self, address: str, timeout: float | None = 30.0, *, codec: Codec, secret: bytes,
                 connections: int = 1):
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address={address!r}: expected 'host:port'")
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        self._codec, self._cluster_secret = codec, check_secret(secret)
        self._address = address
        self._endpoint = (host, int(port))
        self._timeout = timeout
        self._max_connections = connections
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()  # one thread connects at a time: callers share what it opens
        self._open: list[MultiplexedConnection] = []
        weakref.finalize(self, _close_all, self._open)  # a client dropped without disconnect() closes them
        self._closed = False

    @property
    def address(self) -> str:
        return self._address

    @property
    def open_connections(self) -> int:
        """How many live connections this client holds now."""
        with self._lock:
            return sum(connection.alive for connection in self._open)

    def call(self, method: str, *args, **kwargs) -> Any:
        """Calls ``method`` remotely and returns its result, or re-raises its exception."""
        return self._exchange(method, args, kwargs, None)

    def call_into(self, destination: ReplyBuffer | Any, method: str, *args, **kwargs) -> Any:
        """``call``, receiving the reply's raw bytes straight into `destination` (a ``ReplyBuffer`` or a
        writable buffer): no intermediate copy. The bytes values of the returned value are read-only
        memoryviews, of the destination's first bytes (in order) when the reply's segment area fits
        there (``ReplyBuffer.landed`` says how many), else of a buffer of their own. A call that fails or
        times out revokes `destination`: nothing is written into it after the call returned."""
        destination = destination if isinstance(destination, ReplyBuffer) else ReplyBuffer(destination)
        return self._exchange(method, args, kwargs, destination)

    def _exchange(self, method: str, args: tuple, kwargs: dict, destination: ReplyBuffer | None) -> Any:
        """Sends one request on a shared connection and waits for its reply (into `destination` if given);
        transport failures become NodeUnavailable."""
        if self._closed:
            raise ValueError(f"RpcClient for {self._address} is closed")
        request = self._codec.encode((method, args, kwargs))  # WireFormatError here: nothing was sent
        connection = self._connection(method)
        try:
            head, segments = connection.call(request, destination, self._timeout)
            status, value = self._check_reply(self._codec.decode_split(head, segments, segment_views=True)
                                              if destination is not None else self._codec.decode_split(head, segments))
        except NotSent as exc:
            raise not_sent(NodeUnavailable(f"{self._address}: call {method!r} not sent: {exc}")) from exc
        except OSError as exc:  # includes socket.timeout and a revoked ReplyBuffer (ReplyRevoked)
            raise NodeUnavailable(f"{self._address}: call {method!r} failed: {exc!r}") from exc
        except WireFormatError as exc:
            raise WireFormatError(f"{self._address}: malformed reply to {method!r}: {exc}") from exc
        if status == "ok":
            return value
        value.add_note(f"raised by {method!r} on the server at {self._address}")
        raise value

    @staticmethod
    def _check_reply(reply: Any) -> tuple[str, Any]:
        if not (type(reply) is tuple and len(reply) == 2 and (
                reply[0] == "ok" or reply[0] == "err" and isinstance(reply[1], BaseException))):
            raise WireFormatError(f"a reply is ('ok', value) or ('err', exception), not {str(reply)[:100]}")
        return reply

    def disconnect(self) -> None:
        """Closes every connection this client opened (calls in flight fail with NodeUnavailable). Not
        ``close``: that name is left to the served object (a metadata service closes files)."""
        self._closed = True
        _close_all(self._open)

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.disconnect()

    def __repr__(self) -> str:
        return f"RpcClient({self._address!r})"

    def _pick(self) -> MultiplexedConnection | None:
        """The live connection with the fewest calls in flight; None when a new one should be opened."""
        with self._lock:
            for connection in [c for c in self._open if not c.alive or (not c.in_flight and c.closed_by_server())]:
                connection.close()  # a connection the server closed while idle: replaced, nothing resent
                self._open.remove(connection)
            best = min(self._open, key=lambda c: c.in_flight, default=None)
            if best is None or (best.in_flight and len(self._open) < self._max_connections):
                return None
            return best

    def _connection(self, method: str) -> MultiplexedConnection:
        connection = self._pick()
        if connection is not None:
            return connection
        with self._connect_lock:
            connection = self._pick()  # another thread may have opened one meanwhile
            if connection is not None:
                return connection
            try:
                sock = socket.create_connection(self._endpoint, timeout=self._timeout)
            except OSError as exc:
                raise not_sent(NodeUnavailable(f"{self._address}: cannot connect for {method!r}: {exc!r}")) from exc
            self._authenticate(sock, method)
            sock.settimeout(self._timeout)
            connection = MultiplexedConnection(sock, self._codec, self._address)
            with self._lock:
                if self._closed:
                    connection.close()
                    raise ValueError(f"RpcClient for {self._address} is closed")
                self._open.append(connection)
            return connection

    def _authenticate(self, sock: socket.socket, method: str) -> None:
        """The handshake on a new connection (closed on failure): NodeUnavailable if the server does not
        answer it, AuthenticationError if it refuses our secret or cannot prove its own."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_handshake(sock, self._cluster_secret, DEFAULT_TIMEOUT if self._timeout is None else self._timeout)
        except PeerUnresponsive as exc:
            sock.close()
            raise not_sent(NodeUnavailable(f"{self._address}: no handshake for {method!r}: {exc}")) from exc
        except AuthenticationError as exc:
            sock.close()
            raise AuthenticationError(f"{self._address}: cannot authenticate for {method!r}: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise not_sent(NodeUnavailable(f"{self._address}: handshake for {method!r} failed: {exc!r}")) from exc


def _close_all(connections: list[MultiplexedConnection]) -> None:
    for connection in list(connections):
        connection.close()
    connections.clear()
