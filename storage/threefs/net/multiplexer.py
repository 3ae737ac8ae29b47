"""One client connection shared by every calling thread, several requests in flight on it (``RpcClient``).

Each request gets a fresh id (``framing.py``'s header carries it); the server may answer in any order.
There is no reader thread: the callers take turns reading (leader/follower). A caller whose reply has
not arrived takes the connection's receive lock if it is free and reads reply frames itself: a frame for
another id goes straight into that call's ``ReplyBuffer`` (``call_into``) or a buffer of its own
(``call``) and wakes its caller; the reader goes on until its own reply arrives, then releases the lock
and wakes one waiting caller, which becomes the next reader. A lone caller thus reads its own reply on
its own thread: no handoff. Senders hold a lock around a whole frame, so frames never interleave.

Contracts:
  * A reply whose id no call waits for (the call timed out, was interrupted, or its buffer was revoked)
    is read and discarded: a late reply never answers another call.
  * A call that stops waiting (its deadline passed, or an exception such as KeyboardInterrupt) forgets
    its id and revokes its ``ReplyBuffer`` before it returns, so nothing is written into the caller's
    buffer afterwards, even while another caller is receiving that reply (it discards the rest).
  * Deadlines: a waiting caller gives up at its deadline. The reader checks its deadline between frames;
    a frame it started is read to its end (each read bounded by the socket's timeout), since leaving in
    the middle would put the connection out of step.
  * The connection dies on EOF, a reset, a read stalled mid-frame past the socket's timeout, a malformed
    frame header, an exception (KeyboardInterrupt) in the middle of reading a frame, a failed or
    interrupted send (a partial frame may be on the wire) or ``close``; every call in flight on it then
    fails at once with the cause (none hangs), and later calls find it dead (``alive`` False) before
    sending anything (``NotSent``). The socket is closed once no thread is inside a send or a read.
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
    """A request in flight: where its reply goes and, once ``finished``, the raw reply or the error.
    ``wake`` is set when the call finished or when it is this caller's turn to try reading."""

    __slots__ = ("destination", "wake", "finished", "head", "segments", "error")

    def __init__(self, destination: ReplyBuffer | None) -> None:
        self.destination = destination
        self.wake = threading.Event()
        self.finished = False
        self.head: Any = None
        self.segments: Any = None
        self.error: BaseException | None = None


class MultiplexedConnection:
    """An authenticated socket (its timeout set once, never changed) whose callers read it in turn."""

    def __init__(self, sock: socket.socket, codec: Codec, name: str) -> None:
        self.sock, self._codec, self.name = sock, codec, name
        self._send_lock = threading.Lock()
        self._receive_lock = threading.Lock()  # held by the caller reading frames now
        self._lock = threading.Lock()  # guards _calls, the calls' outcomes and _dead
        self._calls: dict[int, _Call] = {}  # unfinished calls, oldest first
        self._ids = itertools.count(1)
        self._dead: BaseException | None = None
        self._sock_closed = False

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def closed_by_server(self) -> bool:
        """Whether the server closed or reset this connection (its FIN or RST has arrived), checked with
        ``poll`` alone, nothing read (nobody reads a connection without calls in flight)."""
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
            self._await(call, deadline, timeout)
        except BaseException:
            self._forget(request_id, call)
            raise
        if call.error is not None:
            raise call.error
        return call.head, call.segments

    def close(self, why: BaseException | None = None) -> None:
        """Fails every call in flight with `why` and shuts the socket (closed once nobody uses it)."""
        self._fail(why or ConnectionAbortedError("the client closed the connection"))

    def _await(self, call: _Call, deadline: float | None, timeout: float | None) -> None:
        """Returns once `call` finished, reading frames while the receive lock is free; socket.timeout at
        the deadline."""
        while not call.finished:
            if self._receive_lock.acquire(blocking=False):
                try:
                    self._read_until(call, deadline)
                finally:
                    self._receive_lock.release()
                    self._after_reading()
                if call.finished:
                    return
            else:
                call.wake.clear()
                if call.finished:
                    return
                if not self._receive_lock.locked():  # released since we tried: its wake may be lost
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is None or remaining > 0:
                    call.wake.wait(remaining)
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                raise socket.timeout(f"no reply within {timeout} s")

    def _read_until(self, call: _Call, deadline: float | None) -> None:
        """As the reader: reads frames until `call` finished or, between frames, its deadline passed.
        Anything raised in the middle of a frame kills the connection (it is out of step)."""
        sock = self.sock
        while not call.finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                if not wait_readable(sock, remaining):
                    continue
            except (OSError, ValueError) as exc:  # the socket was closed under us: the connection is dead
                self._fail(exc if isinstance(exc, OSError) else ConnectionAbortedError(repr(exc)))
                return
            try:
                if not self._read_one(call):
                    self._fail(ConnectionResetError("server closed the connection"))
            except BaseException as exc:
                self._fail(exc if isinstance(exc, (OSError, WireFormatError))
                           else ConnectionAbortedError(f"reading a reply was interrupted: {exc!r}"))
                if not isinstance(exc, (OSError, WireFormatError)):
                    raise

    def _read_one(self, own: _Call) -> bool:
        """Reads one reply frame and hands it to its call (or discards it), waking its caller unless it is
        the reader's `own`; False on EOF between frames."""
        sock = self.sock
        head = bytearray(HEADER.size + PREFIX_SIZE)
        if not recv_into(sock, memoryview(head), frame_start=True):
            return False
        length, request_id = HEADER.unpack_from(head)
        header_length = self._codec.header_length(memoryview(head)[HEADER.size:])
        if PREFIX_SIZE + header_length > length or length > MAX_FRAME:
            raise WireFormatError(f"reply frame of {length} bytes cannot hold a {header_length}-byte header")
        head += recv_exact(sock, header_length)
        size = length - PREFIX_SIZE - header_length
        call = self._calls.get(request_id)  # a forgotten call's buffer is revoked: safe to race with _forget
        if call is None:
            drain(sock, size)  # its caller gave up: the reply answers nobody
            return True
        error = None
        try:
            segments = recv_exact(sock, size) if call.destination is None else call.destination.receive(sock, size)
        except ReplyRevoked as exc:
            segments, error = None, exc
        with self._lock:
            if self._calls.pop(request_id, None) is None:
                return True  # failed or forgotten meanwhile
            call.head, call.segments, call.error = memoryview(head)[HEADER.size:], segments, error
            call.finished = True
        if call is not own:
            call.wake.set()
        return True

    def _after_reading(self) -> None:
        """After the reader released the receive lock: wakes the oldest waiting call (the next reader),
        or closes a dead connection's socket."""
        with self._lock:
            waiting = next(iter(self._calls.values()), None)
        if waiting is not None:
            waiting.wake.set()
        if self._dead is not None:
            self._close_socket()

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
        if self._dead is not None:
            self._close_socket()

    def _forget(self, request_id: int, call: _Call) -> None:
        """The caller stops waiting: its late reply is discarded and nothing more lands in its buffer; the
        turn to read, if it was given to this call, passes on."""
        with self._lock:
            self._calls.pop(request_id, None)
        if call.destination is not None:
            call.destination.revoke()
        self._after_reading()

    def _fail(self, why: BaseException) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = why
            calls, self._calls = list(self._calls.values()), {}
            for call in calls:
                call.error, call.finished = why, True
        for call in calls:
            call.wake.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader in poll; later sends fail at once
        except OSError:
            pass
        self._close_socket()

    def _close_socket(self) -> None:
        """Closes the socket of a dead connection once no thread is inside a send or a read (a descriptor
        closed under a thread in a system call could be reused by another socket)."""
        if self._sock_closed or not self._send_lock.acquire(blocking=False):
            return
        try:
            if self._receive_lock.acquire(blocking=False):
                try:
                    if not self._sock_closed:
                        self._sock_closed = True
                        self.sock.close()
                finally:
                    self._receive_lock.release()
        finally:
            self._send_lock.release()
