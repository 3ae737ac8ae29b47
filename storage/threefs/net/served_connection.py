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
        self._turn = threading.Condition(threading.Lock())  # guards the three below
        self._reading = True  # a thread holds the reading role (the first one, in serve())
        self._idle = 0  # threads waiting for the reading role
        self._ended = False

    def serve(self) -> None:
        self._take_turns(reading=True)

    def _take_turns(self, reading: bool) -> None:
        """A thread of the connection: waits for the reading role, reads one request, passes the role on,
        runs the request; again, until the connection ends."""
        counted = not reading  # a thread started by _pass_turn is already counted as idle
        while True:
            if not reading and not self._wait_for_turn(counted):
                return
            reading = counted = False
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
                return
            self._pass_turn()
            self._run(request, buffer)
            del request

    def _wait_for_turn(self, counted: bool) -> bool:
        """Takes the reading role once it is free; False if the connection ended meanwhile."""
        with self._turn:
            self._idle += not counted
            while self._reading and not self._ended:
                self._turn.wait()
            self._idle -= 1
            if self._ended:
                return False
            self._reading = True
            return True

    def _pass_turn(self) -> None:
        with self._turn:
            self._reading = False
            if self._idle:
                self._turn.notify()
                return
            self._idle += 1  # the thread started below, until it takes the role
        threading.Thread(target=self._take_turns, args=(False,), name=f"rpc-conn-{self._peer}", daemon=True).start()

    def _run(self, request: tuple, buffer: RequestBuffer) -> None:
        request_id, method, args, kwargs = request
        del request
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
        """Ends the connection (called by the thread holding the reading role): idle threads leave, running
        ones after their request (a reply blocked on a client that stopped reading fails at once: the
        socket is shut first); the socket is closed once no reply is being written."""
        with self._turn:
            self._ended = True
            self._turn.notify_all()
        self._shut()
        with self._send_lock:
            self._conn.close()
