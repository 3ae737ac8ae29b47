"""A server connection whose requests run concurrently (``RpcServer``, ``server.py``).

The connection's threads take turns reading (leader/follower): the thread holding the reading role reads
one request frame, hands the role to an idle thread of the connection (starting one if none is idle) and
runs the request itself, then writes the reply, with the request's id, under the connection's send lock:
whole frames, never interleaved, in the order the methods finish. A request is thus never handed to
another thread; while it runs, the next thread already watches the socket, so a second request arriving
meanwhile runs at once beside it. Threads are daemons kept for the connection's life, at most
`max_in_flight` + 1. At most `max_in_flight` requests of one connection are received and not yet
answered: past that the reader stops reading (TCP then stops the client), so one client cannot make a
server hold unbounded work or memory.

Each request's segment area (a write's payload) is received into a ``RequestBuffer`` taken from the
connection's pool and given back once the method returned and the request's values are dropped (at
most `max_in_flight` buffers); a buffer is reused only when no view of it survives (a reply that holds
one, or a method that kept one, makes the next request use a new buffer: ``request_buffer.py``).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from storage.threefs.net.framing import send_frame, wait_readable
from storage.threefs.net.request_buffer import RequestBuffer

MAX_IN_FLIGHT = 32  # requests of one connection received and not yet answered


class ServedConnection:
    """Serves one authenticated connection.

    receive(conn, peer, request_buffer) -> (request id, method, args, kwargs), or None at the end (the
    peer closed, or sent a malformed frame: `receive` logs it). answer(method, args, kwargs) -> the
    encoded reply (it never raises: errors are replies). ``serve()`` runs on the connection's first
    thread and returns when the connection ended; the socket is then shut, and closed once no reply is
    being written.
    """

    def __init__(self, conn: socket.socket, peer: str, receive: Callable[..., tuple | None],
                 answer: Callable[[str, tuple, dict], list], max_in_flight: int = MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._conn, self._peer, self._receive, self._answer = conn, peer, receive, answer
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._send_lock = threading.Lock()
        self._buffers: list[RequestBuffer] = []  # free ones (list append/pop are atomic)
        self._role = threading.Lock()  # held by the thread reading now; idle threads block on it
        self._counter_lock = threading.Lock()  # guards _idle
        self._idle = 0  # threads blocked on (or about to take) the reading role
        self._ended = False

    def serve(self) -> None:
        self._role.acquire()
        self._take_turns()

    def _take_turns(self) -> None:
        """A thread of the connection, holding the reading role: reads one request, passes the role on,
        runs the request, waits for the role again; until the connection ends."""
        while True:
            if self._ended:
                self._role.release()  # wakes the next idle thread, which leaves too
                return
            self._slots.acquire()  # backpressure: wait for a request of this connection to finish
            try:
                wait_readable(self._conn, None)  # a buffer is taken once a request arrives: the previous
                buffer = self._buffers.pop() if self._buffers else RequestBuffer()  # one's is back by then
                request = self._receive(self._conn, self._peer, buffer)
            except (OSError, ValueError):  # the client went away, or the server's shutdown closed the socket
                request = None
            except BaseException:
                self._end()
                raise
            if request is None:
                self._end()
                continue
            self._pass_turn()
            pending = [request]  # _run takes the only reference: the views are gone once it returns
            del request
            self._run(pending, buffer)
            self._count_idle(1)
            self._role.acquire()  # a C-level lock: an idle thread waits without the GIL
            self._count_idle(-1)

    def _count_idle(self, change: int) -> int:
        with self._counter_lock:
            self._idle += change
            return self._idle

    def _pass_turn(self) -> None:
        """Releases the reading role to an idle thread, starting one if none is idle."""
        start = self._count_idle(0) == 0
        if start:
            self._count_idle(1)  # the new thread counts as idle until it holds the role
        self._role.release()
        if start:
            threading.Thread(target=self._start_thread, name=f"rpc-conn-{self._peer}", daemon=True).start()

    def _start_thread(self) -> None:
        self._role.acquire()
        self._count_idle(-1)
        self._take_turns()

    def _run(self, pending: list, buffer: RequestBuffer) -> None:
        """Answers the one request in ``pending`` (taken out of it, so no caller frame keeps its views of
        ``buffer`` alive after the reply: the next request of the connection can reuse the buffer)."""
        request_id, method, args, kwargs = pending.pop()
        try:
            reply = self._answer(method, args, kwargs)
            del args, kwargs  # the request's views of `buffer` (the reply may still hold some)
            self._buffers.append(buffer)
            with self._send_lock:
                send_frame(self._conn, reply, request_id)
        except OSError:
            self._shut()  # the reader sees it and ends the connection
        finally:
            self._slots.release()

    def _shut(self) -> None:
        try:
            self._conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _end(self) -> None:
        """Ends the connection (called by the thread holding the reading role, which keeps it until it
        leaves; each idle thread then takes it in turn and leaves): running threads leave after their
        request (a reply blocked on a client that stopped reading fails at once: the socket is shut
        first); the socket is closed once no reply is being written."""
        self._ended = True
        self._shut()
        with self._send_lock:
            self._conn.close()
