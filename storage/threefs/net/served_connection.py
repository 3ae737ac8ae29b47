"""A server connection whose requests run concurrently (``RpcServer``, ``transport.py``).

The connection's thread reads request frames one after another and hands each to a worker; workers
(daemon threads, started as needed and kept for the connection's life) run the method and write the
reply, with the request's id, under the connection's send lock: whole frames, never interleaved, in
the order the methods finish. At most `max_in_flight` requests of one connection are received and not
yet answered: past that the reading thread stops reading (TCP then stops the client), so one client
cannot make a server hold unbounded work or memory.

Each request's segment area (a write's payload) is received into a ``RequestBuffer`` taken from the
connection's pool and given back once the method returned and the request's values are dropped (at
most `max_in_flight` buffers); a buffer is reused only when no view of it survives (a reply that holds
one, or a method that kept one, makes the next request use a new buffer: ``request_buffer.py``).
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from storage.threefs.net.framing import send_frame
from storage.threefs.net.request_buffer import RequestBuffer

MAX_IN_FLIGHT = 32  # requests of one connection received and not yet answered


class ServedConnection:
    """Serves one authenticated connection.

    receive(conn, peer, request_buffer) -> (request id, method, args, kwargs), or None at the end (the
    peer closed, or sent a malformed frame: `receive` logs it). answer(method, args, kwargs) -> the
    encoded reply (it never raises: errors are replies). ``serve()`` returns when the connection ends;
    the socket is then closed (after any reply still being written).
    """

    def __init__(self, conn: socket.socket, peer: str, receive: Callable[..., tuple | None],
                 answer: Callable[[str, tuple, dict], list], max_in_flight: int = MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._conn, self._peer, self._receive, self._answer = conn, peer, receive, answer
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._send_lock = threading.Lock()
        self._buffers: list[RequestBuffer] = []  # free ones (list append/pop are atomic)
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _idle and _workers
        self._idle = 0
        self._workers = 0

    def serve(self) -> None:
        try:
            while True:
                self._slots.acquire()  # backpressure: wait for a request of this connection to finish
                buffer = self._buffers.pop() if self._buffers else RequestBuffer()
                request = self._receive(self._conn, self._peer, buffer)
                if request is None:
                    return
                self._dispatch(request, buffer)
                del request
        except OSError:
            return  # the client went away, or the server's shutdown closed the socket
        finally:
            self._end()

    def _dispatch(self, request: tuple, buffer: RequestBuffer) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                start = False
            else:
                self._workers += 1
                start = True
        self._work.put((request, buffer))
        if start:
            threading.Thread(target=self._work_loop, name=f"rpc-worker-{self._peer}", daemon=True).start()

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            request, buffer = item
            del item
            self._run(request, buffer)
            del request
            with self._lock:
                self._idle += 1

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
            self._shut()  # the reading thread sees it and ends the connection
        finally:
            self._slots.release()

    def _shut(self) -> None:
        try:
            self._conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _end(self) -> None:
        """Stops the workers (each after its current request) and closes the socket once no reply is being
        written (a worker blocked sending to a client that stopped reading fails at once: the socket is
        shut first)."""
        with self._lock:
            workers = self._workers
        for _ in range(workers):
            self._work.put(None)
        self._shut()
        with self._send_lock:
            self._conn.close()
