"""Receiving an RPC reply straight into the caller's buffer (``RpcClient.call_into``, ``transport.py``).

A reply frame is the codec's prefix and header (small values) followed by its segment area (the raw
bytes values, in order). `receive_reply_into` reads the frame header and the codec header into a small
buffer and the segment area with ``recv_into`` into a ``ReplyBuffer``: the caller's memory when it fits
(no intermediate copy; a reply's bytes values are then read-only views of it), a buffer of their own
otherwise. A ``ReplyBuffer`` can be revoked by its owner (a hedged read that another replica answered
first): from then on nothing more is written into it, and a call still receiving stops and fails (its
connection is dropped, with the rest of the reply unread).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from storage.threefs.net.codec import PREFIX_SIZE, Codec, WireFormatError
from storage.threefs.net.framing import HEADER, MAX_FRAME, recv_exact, recv_into, wait_readable


class ReplyBuffer:
    """Where ``RpcClient.call_into`` receives a reply's raw bytes: the caller's writable ``buffer``.

    ``landed``: after the call, how many bytes of the reply's segment area (its bytes values, in order)
    were received into ``buffer[:landed]``; None when the area did not fit (the values then live in a
    buffer of their own). ``revoke()``: from the moment it returns, nothing more is written into
    ``buffer`` (a call still receiving stops and drops its connection), so a reader that stopped
    waiting (a hedged read another replica answered first) can hand the buffer back to its owner.
    """

    __slots__ = ("view", "landed", "_lock", "_revoked")

    def __init__(self, buffer) -> None:
        self.view = memoryview(buffer).cast("B")
        if self.view.readonly:
            raise TypeError("ReplyBuffer needs a writable buffer")
        self.landed: int | None = None
        self._lock = threading.Lock()
        self._revoked = False

    def revoke(self) -> None:
        with self._lock:
            self._revoked = True

    def write_with(self, fill: Any) -> int:
        """``fill(view)`` under the guard (it writes into the buffer and returns a count); -1, running
        nothing, once revoked."""
        with self._lock:
            return -1 if self._revoked else fill(self.view)

    def receive(self, sock: socket.socket, size: int) -> memoryview:
        """Receives `size` bytes from `sock` into the buffer's first bytes (elsewhere if they do not fit);
        returns a view of where they are. Once revoked it stops at once with ConnectionAbortedError (an
        OSError: the caller drops the connection, so the rest of the reply is never read)."""
        if size > len(self.view):
            return memoryview(recv_exact(sock, size))
        view, got = self.view[:size], 0
        timeout = sock.gettimeout()
        sock.settimeout(0)  # recv_into returns at once; waiting happens in poll, without the lock
        try:
            while got < size:
                with self._lock:  # never held while waiting: a revoke waits at most one recv
                    if self._revoked:
                        raise ConnectionAbortedError("the reply buffer was revoked during the call")
                    try:
                        k = sock.recv_into(view[got:])
                    except BlockingIOError:
                        k = -1
                if k == 0:
                    raise ConnectionResetError(f"connection closed after {got} of {size} bytes")
                if k < 0:
                    if not wait_readable(sock, timeout):
                        raise socket.timeout(f"no reply bytes within {timeout} s")
                    continue
                got += k
        finally:
            sock.settimeout(timeout)
        with self._lock:
            if self._revoked:
                raise ConnectionAbortedError("the reply buffer was revoked during the call")
            self.landed = size
        return view


def receive_reply_into(sock: socket.socket, codec: Codec, destination: ReplyBuffer) -> Any:
    """One reply frame from `sock`, decoded by `codec` with its segment area received into
    `destination` (see the module docstring). ConnectionResetError when the server closed the connection,
    WireFormatError for a malformed frame, other OSErrors as the socket raises them."""
    head = bytearray(HEADER.size + PREFIX_SIZE)
    if not recv_into(sock, memoryview(head), frame_start=True):
        raise ConnectionResetError("server closed the connection before replying")
    (length,) = HEADER.unpack_from(head)
    header_length = codec.header_length(memoryview(head)[HEADER.size:])
    if PREFIX_SIZE + header_length > length or length > MAX_FRAME:
        raise WireFormatError(f"frame of {length} bytes cannot hold a {header_length}-byte header")
    head += recv_exact(sock, header_length)
    segments = destination.receive(sock, length - PREFIX_SIZE - header_length)
    return codec.decode_split(memoryview(head)[HEADER.size:], segments, segment_views=True)

