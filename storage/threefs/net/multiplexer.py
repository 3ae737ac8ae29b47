"""One client connection shared by every calling thread, several requests in flight on it (``RpcClient``).

Each request gets a fresh id (``framing.py``'s header carries it); the server may answer in any order.
A reader thread per connection reads every reply frame: it looks up the id among the calls in flight,
receives the reply's segment area straight into that call's ``ReplyBuffer`` (``call_into``) or into a
buffer of its own (``call``), and wakes the caller, which decodes it. Senders hold a lock around a whole
frame, so frames never interleave.

Contracts:
  * A reply whose id no call waits for (the call timed out, was interrupted, or its buffer was revoked)
    is read and discarded: a late reply never answers another call.
  * A call that stops waiting (its deadline passed, or an exception such as KeyboardInterrupt) forgets
    its id and revokes its ``ReplyBuffer`` before it returns, so nothing is written into the caller's
    buffer afterwards. A reply already being received when the deadline passes is waited for (the
    socket's timeout bounds each read of it).
  * The connection dies on EOF, a reset, a read stalled mid-frame past the socket's timeout, a malformed
    frame header, a failed or interrupted send (a partial frame may be on the wire) or ``close``; every
    call in flight on it then fails at once with the cause (none hangs), and later calls find it dead
    (``alive`` False) before sending anything.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from typing import Any

from storage.threefs.net.codec import PREFIX_SIZE, Codec, WireFormatError
from storage.threefs.net.framing import HEADER, MAX_FRAME, drain, recv_exact, recv_into, send_frame, wait_readable
from storage.threefs.net.reply_buffer import ReplyBuffer, ReplyRevoked


class NotSent(ConnectionError):
    """The request never left this process (the connection was dead, or its turn to send never came)."""


class _Call:
    """A request in flight: where its reply goes and, once ``done``, the raw reply or the error."""

    __slots__ = ("destination", "done", "receiving", "head", "segments", "error")

    def __init__(self, destination: ReplyBuffer | None) -> None:
        self.destination = destination
        self.done = threading.Event()
        self.receiving = False
        self.head: bytearray | None = None
        self.segments: Any = None
        self.error: BaseException | None = None


class MultiplexedConnection:
    """An authenticated socket (its timeout set once, never changed) with its reader thread."""

    def __init__(self, sock: socket.socket, codec: Codec, name: str) -> None:
        self.sock, self._codec = sock, codec
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _calls and _dead
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._dead: BaseException | None = None
        threading.Thread(target=self._read_replies, name=f"rpc-reader-{name}", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def closed_by_server(self) -> bool:
        """Whether the server closed or reset this connection (its FIN or RST has arrived), checked with
        ``poll`` alone, nothing read: the reader thread may not have seen it yet."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLRDHUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def call(self, request: list, destination: ReplyBuffer | None, timeout: float | None) -> tuple[Any, Any]:
        """Sends `request` (a codec's parts) and waits up to `timeout` seconds (None: forever) for its
        reply: (head, segments), the codec's head and the segment area (views of `destination` when it
        landed there). ``NotSent`` if nothing was sent; another OSError (socket.timeout included) or
        WireFormatError if it may have been."""
        deadline = None if timeout is None else time.monotonic() + timeout
        call = _Call(destination)
        with self._lock:
            if self._dead is not None:
                raise NotSent(f"connection already closed: {self._dead!r}")
            request_id = next(self._ids)
            self._calls[request_id] = call
        try:
            self._send(request, request_id, deadline)
            while not call.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                if not call.receiving:  # a reply being received is bounded by the socket's timeout
                    raise socket.timeout(f"no reply within {timeout} s")
        except BaseException:
            self._forget(request_id, call)
            raise
        if call.error is not None:
            raise call.error
        return call.head, call.segments

    def close(self, why: BaseException | None = None) -> None:
        """Fails every call in flight with `why` and shuts the socket (the reader closes it)."""
        self._fail(why or ConnectionAbortedError("the client closed the connection"))

    def _send(self, request: list, request_id: int, deadline: float | None) -> None:
        if not self._send_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise NotSent("another request's frame was still being sent at the deadline")
        try:
            if self._dead is not None:
                raise NotSent(f"connection closed while waiting to send: {self._dead!r}")
            send_frame(self.sock, request, request_id)
        except NotSent:
            raise
        except BaseException as exc:  # a partial frame may be on the wire: nothing after it can be trusted
            self._fail(exc if isinstance(exc, OSError) else ConnectionAbortedError(f"send interrupted: {exc!r}"))
            raise
        finally:
            self._send_lock.release()

    def _forget(self, request_id: int, call: _Call) -> None:
        with self._lock:
            self._calls.pop(request_id, None)
        if call.destination is not None:
            call.destination.revoke()  # the reader discards the rest; nothing more lands in the caller's buffer

    def _fail(self, why: BaseException) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = why
            calls, self._calls = list(self._calls.values()), {}
        for call in calls:
            call.error = why
            call.done.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; later sends fail at once
        except OSError:
            pass

    def _read_replies(self) -> None:
        try:
            while self._read_one():
                pass
            self._fail(ConnectionResetError("server closed the connection"))
        except BaseException as exc:  # noqa: BLE001 - every call in flight learns why
            self._fail(exc)
        finally:
            with self._send_lock:  # no sender is inside sendmsg: the descriptor can go
                self.sock.close()

    def _read_one(self) -> bool:
        """Reads one reply frame and hands it to its call (or discards it); False on EOF between frames."""
        sock = self.sock
        if not wait_readable(sock, None):
            return True
        head = bytearray(HEADER.size + PREFIX_SIZE)
        if not recv_into(sock, memoryview(head), frame_start=True):
            return False
        length, request_id = HEADER.unpack_from(head)
        header_length = self._codec.header_length(memoryview(head)[HEADER.size:])
        if PREFIX_SIZE + header_length > length or length > MAX_FRAME:
            raise WireFormatError(f"reply frame of {length} bytes cannot hold a {header_length}-byte header")
        head += recv_exact(sock, header_length)
        size = length - PREFIX_SIZE - header_length
        with self._lock:
            call = self._calls.get(request_id)
            if call is not None:
                call.receiving = True
        if call is None:
            drain(sock, size)  # its caller gave up: the reply answers nobody
            return True
        try:
            segments = recv_exact(sock, size) if call.destination is None else call.destination.receive(sock, size)
        except ReplyRevoked as exc:
            segments, call.error = None, exc
        with self._lock:
            if self._calls.pop(request_id, None) is None:
                return True  # failed or forgotten meanwhile
        call.head, call.segments = memoryview(head)[HEADER.size:], segments
        call.done.set()
        return True
