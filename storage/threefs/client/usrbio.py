"""USRBIO-style batched IO: an ``IoVec`` of shared memory and an ``IoRing`` of prepared reads or writes.

3FS's USRBIO (User Space Ring Based IO) lets an application bypass FUSE's per-request limits: it
allocates an **Iov**, a large shared-memory region the FUSE daemon reads into and writes from directly
(zero copy), and an **Ior**, a small ring on which it prepares many IOs (slice of the Iov, fd, offset),
submits them together, and reaps completions (bytes transferred or ``-errno``) with their userdata.
An Ior is either for reads or for writes. ``io_depth`` controls batching: 0 issues everything submitted;
``n > 0`` issues exactly n-sized batches (fewer stay queued until more are submitted); ``n < 0`` issues
batches of up to ``-n``.

Here the same interface runs over any ``file_api.File`` (this 3FS's client or a FUSE mount): each IO is
``File.pread_into`` straight into the Iov's shared memory, or ``File.pwrite`` from a memoryview of it,
run on a thread pool. The API follows ``hf3fs_fuse.io`` (``make_iovec``/``make_ioring``/``prepare``/
``submit``/``wait``) except that ``prepare`` takes the ``File`` instead of a registered fd, and
``wait``'s timeout is in seconds. ``register_fd``/``deregister_fd`` exist so code written against
``hf3fs_fuse.io`` runs unchanged; they do nothing here.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from storage.threefs.client.file_api import File

_SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (3FS symlinks its Iovs from here too)


class IoVec(mmap.mmap):
    """A buffer of ``size`` bytes in POSIX shared memory: ``[size] uint8``.

    It is an ``mmap`` of the ``SharedMemory`` segment ``self.shm`` (``/dev/shm/<shm.name>``), so
    ``memoryview(iov)`` works and another process can attach by name. ``iov[a:b]`` is an ``IoVecSlice``
    (a view: offset ``a``, length ``b - a``, no copy); ``iov[i]`` is one byte. block_size > 0 splits the
    buffer into blocks that no single IO may cross (as 3FS requires for IB registration); 0: one block.
    ``close()`` (or leaving a ``with`` block) unmaps and unlinks the segment; it raises ``BufferError``
    while memoryviews of the buffer are still alive.
    """

    def __new__(cls, size: int, block_size: int = 0):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size={size!r}: an IoVec needs a positive number of bytes")
        if not isinstance(block_size, int) or block_size < 0:
            raise ValueError(f"block_size={block_size!r}: expected 0 (no blocks) or a positive byte count")
        shm = SharedMemory(create=True, size=size)
        try:
            fd = os.open(os.path.join(_SHM_DIR, shm.name), os.O_RDWR)
            try:
                self = super().__new__(cls, fd, size)
            finally:
                os.close(fd)
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        self.shm = shm
        self.block_size = block_size
        self._size = size
        return self

    @property
    def size(self) -> int:  # shadows mmap.size(): the IoVec's length in bytes
        return self._size

    @property
    def name(self) -> str:
        """The shared-memory segment's name (``SharedMemory(name=...)`` attaches to it)."""
        return self.shm.name

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._size)
            if step != 1:
                raise ValueError(f"IoVec slices must be contiguous, got step {step}")
            return IoVecSlice(self, start, max(0, stop - start))
        return super().__getitem__(key)

    def close(self) -> None:
        """Unmaps the buffer and unlinks the shared memory (idempotent)."""
        if self.closed:
            return
        super().close()  # BufferError if memoryviews are still exported: then nothing is unlinked
        self.shm.close()
        self.shm.unlink()

    def __enter__(self) -> IoVec:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"name={self.name!r}"
        return f"IoVec(size={self._size}, block_size={self.block_size}, {state})"


@dataclasses.dataclass(frozen=True)
class IoVecSlice:
    """Bytes ``[offset, offset + length)`` of an ``IoVec``: the unit an IO reads into or writes from."""

    iov: IoVec
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> IoVecSlice:
        if not isinstance(key, slice):
            raise TypeError("IoVecSlice supports only slicing; index the IoVec for single bytes")
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError(f"IoVec slices must be contiguous, got step {step}")
        return IoVecSlice(self.iov, self.offset + start, max(0, stop - start))

    def memoryview(self) -> memoryview:
        """A ``[length] uint8`` view of the shared memory; ``release()`` it before closing the IoVec."""
        with memoryview(self.iov) as whole:
            return whole[self.offset:self.offset + self.length]

    def __bytes__(self) -> bytes:
        view = self.memoryview()
        try:
            return bytes(view)
        finally:
            view.release()


@dataclasses.dataclass(frozen=True)
class IoCompletion:
    """One finished IO: ``index`` from ``prepare``, ``result`` = bytes transferred (short only at end of
    file) or ``-errno`` (``-errno.EIO``, ``-errno.ENOENT``, ``-errno.EBADF``, ...), the ``userdata`` given."""

    index: int
    result: int
    userdata: Any


@dataclasses.dataclass(frozen=True)
class _PreparedIo:
    index: int
    target: IoVecSlice
    read: bool
    file: File
    offset: int
    userdata: Any


def _negative_errno(exc: BaseException) -> int:
    """The ``-errno`` a USRBIO completion reports for an exception raised by a File."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int) and code > 0:
        return -code
    if isinstance(exc, ValueError):  # closed file, or io.UnsupportedOperation (wrong direction)
        return -errno.EBADF
    return -errno.EIO


class IoRing:
    """A ring of up to ``entries`` prepared IOs, all reads (``for_read=True``) or all writes.

    io_depth: 0 issues every submitted IO at once; ``n > 0`` issues exactly n-sized batches (a remainder
    waits for a later ``submit``); ``n < 0`` issues batches of at most ``-n``. workers: threads running the
    IOs (default ``default_workers()``: about the core count, since more threads only contend for the
    GIL; each worker keeps its own connection per storage node, so that many requests per node are in
    flight). One thread should prepare and submit; another may wait (as in 3FS).
    """

    def __init__(self, entries: int, for_read: bool = True, io_depth: int = 0, workers: int | None = None):
        workers = default_workers() if workers is None else workers
        if not isinstance(entries, int) or entries <= 0:
            raise ValueError(f"entries={entries!r}: expected a positive ring size")
        if not isinstance(io_depth, int):
            raise TypeError(f"io_depth={io_depth!r}: expected an int")
        if not isinstance(workers, int) or workers <= 0:
            raise ValueError(f"workers={workers!r}: expected a positive thread count")
        self.entries = entries
        self.for_read = bool(for_read)
        self.io_depth = io_depth
        self.issued_batches: list[int] = []  # size of every batch issued so far, in order
        self._prepared: list[_PreparedIo] = []
        self._queued: collections.deque[_PreparedIo] = collections.deque()  # submitted, not yet issued
        self._done: collections.deque[IoCompletion] = collections.deque()
        self._in_flight = 0
        self._next_index = 0
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ioring")
        self._closed = False

    def prepare(self, iov_slice: IoVecSlice | IoVec, read: bool, file: File, offset: int,
                userdata: Any = None) -> int:
        """Queues one IO of ``len(iov_slice)`` bytes at file ``offset``; returns its index.

        read must equal the ring's ``for_read`` (``ValueError``). More than ``entries`` IOs prepared and not
        yet submitted: ``BlockingIOError`` (EAGAIN, the ring is full; submit first).
        """
        if isinstance(iov_slice, IoVec):
            iov_slice = iov_slice[:]
        if not isinstance(iov_slice, IoVecSlice):
            raise TypeError(f"iov_slice must be an IoVec or IoVecSlice, got {type(iov_slice).__name__}")
        if bool(read) != self.for_read:
            kind = "read" if self.for_read else "write"
            raise ValueError(f"read={read!r} on a {kind} ring (for_read={self.for_read}): an IoRing is one-way")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset={offset!r}: expected a non-negative file offset")
        if iov_slice.iov.closed:
            raise ValueError("iov_slice belongs to a closed IoVec")
        block = iov_slice.iov.block_size
        if block and iov_slice.length and (
                iov_slice.offset // block != (iov_slice.offset + iov_slice.length - 1) // block):
            raise ValueError(f"iov_slice [{iov_slice.offset}, {iov_slice.offset + iov_slice.length}) crosses a "
                             f"block boundary of the IoVec (block_size={block})")
        with self._cond:
            self._check_open()
            if len(self._prepared) >= self.entries:
                raise BlockingIOError(errno.EAGAIN, f"IoRing full: {self.entries} IOs prepared and not "
                                                    "submitted; call submit() first")
            index = self._next_index
            self._next_index += 1
            self._prepared.append(_PreparedIo(index, iov_slice, self.for_read, file, offset, userdata))
        return index

    def submit(self) -> IoRing:
        """Hands the prepared IOs to the workers (batched by ``io_depth``); returns self."""
        with self._cond:
            self._check_open()
            self._queued.extend(self._prepared)
            self._prepared.clear()
            while self._queued:
                if self.io_depth == 0:
                    size = len(self._queued)
                elif self.io_depth > 0:
                    if len(self._queued) < self.io_depth:
                        break  # an exact batch is not full yet
                    size = self.io_depth
                else:
                    size = min(-self.io_depth, len(self._queued))
                batch = [self._queued.popleft() for _ in range(size)]
                self.issued_batches.append(size)
                self._in_flight += size
                for io in batch:
                    self._pool.submit(self._run, io)
        return self

    def wait(self, max_results: int = 0, min_results: int = 0, timeout: float | None = None) -> list[IoCompletion]:
        """Returns completed IOs, in completion order.

        Blocks until ``min_results`` completions are ready (0: every IO issued so far) or ``timeout``
        seconds pass (None: no limit; 0: just poll). Returns at most ``max_results`` (0: all ready).
        Waiting without a timeout for more IOs than were issued is a ``ValueError`` (it would never end;
        with ``io_depth > 0``, submitted IOs of an incomplete batch are not issued).
        """
        if not isinstance(max_results, int) or max_results < 0:
            raise ValueError(f"max_results={max_results!r}: expected 0 (no limit) or a positive count")
        if not isinstance(min_results, int) or min_results < 0:
            raise ValueError(f"min_results={min_results!r}: expected 0 (all issued) or a positive count")
        if max_results and min_results > max_results:
            raise ValueError(f"min_results={min_results} exceeds max_results={max_results}")
        with self._cond:
            self._check_open()
            reachable = len(self._done) + self._in_flight
            target = min_results or reachable
            if max_results:
                target = min(target, max_results)
            if target > reachable and timeout is None:
                raise ValueError(f"min_results={min_results} but only {reachable} IOs are issued and unreaped "
                                 f"({len(self._queued)} queued for a full io_depth={self.io_depth} batch); "
                                 "this wait would never finish")
            self._cond.wait_for(lambda: len(self._done) >= target, timeout)
            count = len(self._done) if not max_results else min(max_results, len(self._done))
            return [self._done.popleft() for _ in range(count)]

    def close(self) -> None:
        """Drops unsubmitted IOs, waits for running ones, and stops the workers (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._prepared.clear()
            self._queued.clear()
        self._pool.shutdown(wait=True)
        self._done.clear()

    def __enter__(self) -> IoRing:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("IoRing is closed")

    def _run(self, io: _PreparedIo) -> None:
        try:
            with memoryview(io.target.iov) as whole, whole[io.target.offset:io.target.offset + io.target.length] \
                    as view:
                if io.read:
                    result = io.file.pread_into(view, io.offset)
                else:
                    result = io.file.pwrite(view, io.offset)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes -errno in the completion
            result = _negative_errno(exc)
        with self._cond:
            self._done.append(IoCompletion(io.index, int(result), io.userdata))
            self._in_flight -= 1
            self._cond.notify_all()


def default_workers() -> int:
    """An IoRing's worker threads when not told: the cores this process may run on, at least 2 (one IO
    waits on storage while another copies), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


def register_fd(file: File | int, flags: int = 0) -> None:
    """Compatibility with ``hf3fs_fuse.io.register_fd``: nothing to register when IO goes through File."""


def deregister_fd(file: File | int) -> None:
    """Compatibility with ``hf3fs_fuse.io.deregister_fd``: a no-op here."""
