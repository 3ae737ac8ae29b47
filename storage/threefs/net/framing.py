"""Frames on a stream socket, the unit of this 3FS's RPC (``transport.py``).

A frame is a 16-byte header (`HEADER`: the body's length and the request id, both 64-bit big-endian),
then the body. The request id pairs a reply with its request: a connection carries several requests at
once and the server answers them in any order, each reply with the id of the request it answers.
`send_frame` gathers the header and a codec's parts into one ``sendmsg`` (large bytes values are never
concatenated); `recv_frame` reads one body into a buffer that grows as bytes arrive (a false length costs
no more memory than the bytes actually sent; a length past `MAX_FRAME` is a protocol error); `recv_into`
fills a caller's view; `drain` reads and discards a body nobody waits for.
"""

from __future__ import annotations

import select
import socket
import struct

from storage.threefs.net.codec import WireFormatError

HEADER = struct.Struct(">QQ")  # body length, request id
MAX_FRAME = 1 << 40  # a header announcing more than this is a protocol error, not a payload
FIRST_ALLOCATION = 64 << 20  # frames up to this size are read into one buffer of their exact size


def send_frame(sock: socket.socket, parts: list[bytes | bytearray | memoryview], request_id: int) -> None:
    """Sends one frame of request `request_id` whose body is ``parts`` (a codec's output: small values
    packed in the first part, each large bytes value a part of its own), header and parts gathered by
    ``sendmsg``: no copy. Callers sharing a socket hold one lock around it (frames never interleave)."""
    pending = [memoryview(HEADER.pack(sum(len(part) for part in parts), request_id))]
    pending += [memoryview(p).cast("B") for p in parts]
    while pending:
        sent = sock.sendmsg(pending)
        while pending and sent >= len(pending[0]):
            sent -= len(pending[0])
            pending.pop(0)
        if sent:
            pending[0] = pending[0][sent:]


def recv_into(sock: socket.socket, view: memoryview, frame_start: bool = False) -> bool:
    """Fills ``view`` from ``sock``; False if the peer closed the connection before the first byte of a
    frame (``frame_start``), ConnectionResetError if it closed anywhere else."""
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0 and frame_start:
                return False
            raise ConnectionResetError(f"connection closed after {got} of {len(view)} bytes")
        got += k
    return True


def recv_frame(sock: socket.socket) -> tuple[int, bytearray] | None:
    """One frame: (request id, body); None if the peer closed the connection between frames. The buffer
    grows as bytes arrive, so a false length costs no more memory than the bytes actually sent."""
    header = bytearray(HEADER.size)
    if not recv_into(sock, memoryview(header), frame_start=True):
        return None
    length, request_id = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise WireFormatError(f"frame length {length} exceeds {MAX_FRAME}: not this protocol")
    return request_id, recv_exact(sock, length)


def drain(sock: socket.socket, size: int) -> None:
    """Reads and discards `size` bytes (the rest of a frame nobody waits for), 64 KiB at a time."""
    scratch = memoryview(bytearray(min(size, 1 << 16)))
    while size > 0:
        recv_into(sock, scratch[:min(size, len(scratch))])
        size -= min(size, len(scratch))


def recv_exact(sock: socket.socket, length: int) -> bytearray:
    """`length` bytes from `sock`; the buffer grows as bytes arrive (a false length costs no more memory
    than the bytes actually sent)."""
    body, received = bytearray(min(length, FIRST_ALLOCATION)), 0
    while received < length:
        if received == len(body):
            body += bytes(min(len(body), length - len(body)))  # doubles, up to the announced length
        recv_into(sock, memoryview(body)[received:])
        received = len(body)
    return body


def wait_readable(sock: socket.socket, timeout: float | None) -> bool:
    """Whether `sock` is readable within `timeout` seconds (0: now; None: forever). poll(), not select(),
    which fails for descriptors past FD_SETSIZE (1024)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))
