"""``FuseServer``: the request loop on a ``/dev/fuse`` connection.

``threads`` worker threads each read one request at a time from the device into their own buffer
(the kernel hands every request to exactly one reader, as libfuse's multi-threaded loop relies on),
run the operation and write the reply in one ``writev``. A request's data (WRITE) is passed to the
operation as a view of that buffer, and a READ's reply is written from the buffer the file read into:
no copies beyond the kernel's. Blocking device reads and writes release the GIL.

Errors: an operation's ``OSError`` is answered with its errno; anything else (a bug, an argument
error) with EIO, and logged. The loop ends when the device says the file system is gone (ENODEV:
unmounted, or the connection aborted); ``wait`` returns then.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from storage.threefs.fuse import protocol as p
from storage.threefs.fuse.operations import FuseOperations

RETRY_READ_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.ENOENT})  # ENOENT: the request was interrupted
GONE_ERRNOS = frozenset({errno.ENODEV, errno.ECONNABORTED, errno.EBADF})


def errno_of(error: BaseException) -> int:
    """The errno to answer a failed request with."""
    if isinstance(error, io.UnsupportedOperation):  # an OSError without an errno: wrong open mode
        return errno.EBADF
    if isinstance(error, OSError) and error.errno:
        return error.errno
    if isinstance(error, TimeoutError):
        return errno.ETIMEDOUT
    if isinstance(error, ValueError):  # a closed file or client, an argument the client refused
        return errno.EINVAL
    return errno.EIO


class FuseServer:
    """Serves `operations` on the FUSE connection `fd` (an open ``/dev/fuse`` that a mount refers to).

    Args:
      fd: the device file descriptor (the caller closes it after ``wait``).
      operations: the file system (``FuseOperations``).
      threads: worker threads reading the device (requests served at once).
    """

    def __init__(self, fd: int, operations: FuseOperations, threads: int = 4) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.fd = fd
        self.operations = operations
        self._handlers: dict[int, Callable[[p.Header, memoryview], Any]] = operations.handlers()
        self._threads = [threading.Thread(target=self._serve, name=f"fuse-{i}", daemon=True) for i in range(threads)]
        self._max_background = 4 * threads
        self.initialized = threading.Event()
        self.log = logging.getLogger(__name__)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def running(self) -> bool:
        """True while any worker still serves (False once the file system is unmounted)."""
        return any(thread.is_alive() for thread in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` seconds in all for every worker to end; True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.running()

    # ----------------------------------------------------------------------------- the loop

    def _serve(self) -> None:
        buffer = bytearray(p.READ_BUFFER_SIZE)
        view = memoryview(buffer)
        while True:
            try:
                count = os.readv(self.fd, [buffer])
            except OSError as error:
                if error.errno in RETRY_READ_ERRNOS:
                    continue
                if error.errno not in GONE_ERRNOS:
                    self.log.error("reading the FUSE device failed: %s", error)
                return
            if count == 0:
                return
            self._handle(view[:count])

    def _handle(self, request: memoryview) -> None:
        header = p.parse_header(request)
        body = request[p.IN_HEADER.size:header.length]
        if header.opcode == p.Opcode.INIT:
            self._answer_init(header, body)
            return
        handler = self._handlers.get(header.opcode)
        try:
            if handler is None:
                raise OSError(errno.ENOSYS, "not supported by this file system")
            payload = handler(header, body)
        except Exception as error:  # noqa: BLE001 - every failure becomes the request's errno
            code = errno_of(error)
            if code == errno.EIO or not isinstance(error, OSError):
                self.log.warning("FUSE %s on node %d failed: %r", _name(header.opcode), header.nodeid, error,
                                 exc_info=not isinstance(error, OSError))
            if header.opcode not in p.NO_REPLY:
                self._reply(header.unique, code, [])
            return
        if header.opcode not in p.NO_REPLY:
            self._reply(header.unique, 0, [payload] if isinstance(payload, (bytes, memoryview)) else payload)

    def _answer_init(self, header: p.Header, body: memoryview) -> None:
        try:
            payload = p.init_reply(body, self._max_background)
        except ValueError as error:
            self.log.error("%s", error)
            self._reply(header.unique, errno.EPROTO, [])
            return
        self._reply(header.unique, 0, [payload])
        self.initialized.set()

    def _reply(self, unique: int, error: int, payload: list) -> None:
        length = sum(len(part) for part in payload)
        try:
            os.writev(self.fd, [p.out_header(unique, error, length), *payload])
        except OSError as failure:
            if failure.errno not in (errno.ENOENT, *GONE_ERRNOS):  # ENOENT: the request was interrupted
                self.log.error("replying to FUSE request %d failed: %s", unique, failure)


def _name(opcode: int) -> str:
    try:
        return p.Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"
