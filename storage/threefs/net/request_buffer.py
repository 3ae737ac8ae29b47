"""A server connection's reusable receive buffer for request payloads (no allocation or copy per request).

``RpcServer`` receives each request's segment area (its bytes values: a write's payload) into the
connection's ``RequestBuffer``; the methods it serves as ``view_methods`` get those values as views of it.
"""

from __future__ import annotations

import socket

from storage.threefs.net.framing import recv_exact, recv_into

REUSE_LIMIT = 16 << 20  # a server connection keeps a request buffer up to this size for the next request


class RequestBuffer:
    """A server connection's buffer for the segment areas of the requests it receives (a write's
    payload), reused from one request to the next so a large request costs no allocation (no zeroed
    bytearray) and no copy: the request's bytes values can be views of it (``RpcServer``'s
    ``view_methods``).

    Lifetime: the buffer is reused only when no view of it survives (a bytearray with live exports
    cannot be resized: the probe in ``unshared``); a method that kept a view past its call keeps the
    old buffer to itself and the next request gets a new one. A buffer larger than ``REUSE_LIMIT`` is
    never kept.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer: bytearray | None = None

    def receive(self, sock: socket.socket, size: int) -> memoryview:
        """A writable view of `size` bytes received from `sock` (empty for 0)."""
        buffer = self._buffer
        if buffer is None or len(buffer) < size or not unshared(buffer):
            buffer = recv_exact(sock, size)  # grows as bytes arrive: a false length costs nothing extra
            self._buffer = buffer if size <= REUSE_LIMIT else None
            return memoryview(buffer)
        view = memoryview(buffer)[:size]
        recv_into(sock, view)
        return view


def unshared(buffer: bytearray) -> bool:
    """Whether no memoryview of `buffer` is alive (resizing a bytearray with exports raises BufferError)."""
    try:
        buffer.append(0)
    except BufferError:
        return False
    del buffer[-1]
    return True
