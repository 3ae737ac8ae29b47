"""Receiving an RPC reply straight into the caller's buffer (``RpcClient.call_into``, ``transport.py``).

A reply frame is the codec's prefix and header (small values) followed by its segment area (the raw
bytes values, in order). The connection's reader (``multiplexer.py``) reads the frame header and the
codec header itself, then the segment area with ``recv_into`` into the ``ReplyBuffer`` registered for the
frame's request id: the caller's memory when it fits (no intermediate copy; a reply's bytes values are
then read-only views of it), a buffer of their own otherwise. A ``ReplyBuffer`` can be revoked by its
owner (a hedged read that another replica answered first, or a call that timed out): from then on
nothing more is written into it; the rest of the reply is read and discarded (the connection carries
other calls' replies after it) and that call fails with ``ReplyRevoked``.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from storage.threefs.net.framing import drain, recv_exact, wait_readable


class ReplyRevoked(ConnectionAbortedError):
    """The reply's buffer was revoked while it was being received; the rest of the reply was discarded,
    so the connection is still in step (only this call fails)."""


class ReplyBuffer:
    """Where ``RpcClient.call_into`` receives a reply's raw bytes: the caller's writable ``buffer``.

    ``landed``: after the call, how many bytes of the reply's segment area (its bytes values, in order)
    were received into ``buffer[:landed]``; None when the area did not fit (the values then live in a
    buffer of their own). ``revoke()``: from the moment it returns, nothing more is written into
    ``buffer`` (a call still receiving discards the rest of its reply and fails), so a reader that
    stopped waiting (a hedged read another replica answered first) can hand the buffer back to its owner.
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

    @property
    def revoked(self) -> bool:
        return self._revoked

    def write_with(self, fill: Any) -> int:
        """``fill(view)`` under the guard (it writes into the buffer and returns a count); -1, running
        nothing, once revoked."""
        with self._lock:
            return -1 if self._revoked else fill(self.view)

    def receive(self, sock: socket.socket, size: int) -> memoryview:
        """Receives `size` bytes from `sock` into the buffer's first bytes (elsewhere if they do not fit);
        returns a view of where they are. Once revoked it writes nothing more into the buffer, reads the
        rest of the `size` bytes into scratch memory and raises ``ReplyRevoked``. Never changes the
        socket's timeout (other threads send on it): each ``recv_into`` runs under the guard only once
        ``poll`` says bytes are there (only one thread reads the socket), so a revoke waits at most one
        ``recv_into``; a silence longer than the socket's timeout raises ``socket.timeout``."""
        if size > len(self.view):
            return memoryview(recv_exact(sock, size))
        view, got, timeout = self.view[:size], 0, sock.gettimeout()
        while got < size:
            if not wait_readable(sock, timeout):
                raise socket.timeout(f"no reply bytes within {timeout} s")
            with self._lock:  # never held while waiting
                if self._revoked:
                    break
                k = sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError(f"connection closed after {got} of {size} bytes")
            got += k
        with self._lock:
            if not self._revoked:
                self.landed = size
                return view
        drain(sock, size - got)
        raise ReplyRevoked("the reply buffer was revoked during the call")
