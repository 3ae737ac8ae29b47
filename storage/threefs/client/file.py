"""An open 3FS file: a position, the layout the client stripes by, and the write session.

Read-only opens are not tracked by the metadata service (training jobs open many files); a write open
holds a file session. The file's length in metadata is only as exact as the last report: the client
reports the end of its writes periodically (``report_length``, from the client's lease thread), on
``fsync`` and on ``close``, where the meta service also asks storage for the exact length; the service
keeps the larger (see ``meta/lengths.py``; a report from before another client's truncate is ignored).
Appends (mode ``ab``) reserve their range in the meta service, so concurrent appenders keep every record.
Writes are synchronous (acknowledged by every replica of the chain before ``pwrite`` returns), so
``flush`` has nothing to do.

Durability is POSIX's: an acknowledged write is in every replica's page cache (it survives the death of
any process) and on their disks within a fraction of a second (group commit); ``fsync`` and the
``close`` of a handle that wrote make it durable before they return, on every replica of the write
paths of the file's chains (``ChunkIO.sync_file``; a replica that left its chain meanwhile no longer
counts). A sync that fails (ETIMEDOUT after the client's retry timeout, or an fsync error on a storage
node) makes ``fsync`` raise; ``close`` still closes the handle and its write session (the length is
reported), then raises that error, as POSIX's close may report a deferred write error: the data is
acknowledged but its durability is not known. ``Client.close`` logs such an error instead.

A read never invents bytes. A handle keeps the length it learnt; when storage returns less than that
(chunks shorter than asked), the handle asks metadata again: a removed file raises ``StaleFileHandle``
(ESTALE), a file that another client truncated (``wb``, ``truncate``) reads short at its new end, and
only a file still that long has a real hole (zeros). A removed file's bytes stay readable through a
handle opened before the removal until garbage collection deletes its chunks (3FS allows either).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

from storage.threefs.client.chunk_io import ChunkIO
from storage.threefs.client.file_api import OpenMode
from storage.threefs.client.stream_file import StreamFile
from storage.threefs.errors import StaleFileHandle, os_error
from storage.threefs.meta.schema import Inode


class ThreeFSFile(StreamFile):
    """A binary, seekable file of a 3FS client (the ``File`` protocol of ``file_api``).

    Args:
      meta: the metadata service (or its RPC proxy); chunk_io: the client's data path.
      inode, session_id: what ``meta.open`` / ``meta.create`` returned (session None for a read open).
      on_close: called with this file once, as it closes (the client forgets it).
    """

    def __init__(self, meta: Any, chunk_io: ChunkIO, path: str, mode: str, open_mode: OpenMode, inode: Inode,
                 session_id: str | None, on_close: Callable[[ThreeFSFile], None]) -> None:
        assert inode.layout is not None, "files always carry a layout"
        self._meta = meta
        self._chunk_io = chunk_io
        self._on_close = on_close
        self.path = path
        self.mode = mode
        self._open_mode = open_mode
        self._inode_id = inode.inode_id
        self._layout = inode.layout
        self._session_id = session_id
        self._length = inode.length  # what this handle knows: metadata's length, then its own writes
        self._written_end = 0  # end of this handle's writes, reported periodically and on fsync/close
        self._reported_end = 0  # what the last periodic report sent
        self._unsynced = False  # written (or cut) since the last storage sync
        self._truncations = inode.truncations  # the file's truncation count this handle knows
        self._ends_lock = threading.Lock()  # _length, _written_end, _reported_end, _truncations change together
        self._position = inode.length if open_mode.append else 0
        self.closed = False

    def __repr__(self) -> str:
        return f"ThreeFSFile({self.path!r}, mode={self.mode!r}, inode={self._inode_id})"

    @property
    def inode_id(self) -> int:
        return self._inode_id

    def _on_inode(self, method: str, *args: Any) -> Inode:
        """Calls meta's `method` on this file's inode; StaleFileHandle (ESTALE) once the inode is gone
        (removed by another client, and collected)."""
        try:
            return getattr(self._meta, method)(self._inode_id, *args)
        except FileNotFoundError:
            raise os_error(StaleFileHandle, errno.ESTALE, self.path) from None

    def _stat(self) -> Inode:
        """The file's inode now (ESTALE once removed and collected)."""
        return self._on_inode("stat_inode")

    def _known_length(self, wanted_end: int) -> int:
        """The file length, asking metadata again when a read reaches past what this handle knows
        (another client may have appended since the open)."""
        if wanted_end > self._length:
            self._length = max(self._length, self._stat().length)
        return self._length

    def _recheck_short_read(self, offset: int, count: int) -> int:
        """After a read of [offset, offset + count) met chunks shorter than asked: how many of those bytes
        are the file's. Storage holding less than this handle's length means a hole (a sparse file: the
        zeros are real), or a file another client truncated (``wb``, ``truncate``) or removed since this
        handle learnt its length. Metadata tells which: removed raises ESTALE, shorter clips the read (and
        this handle's length) at the new end (the end of this handle's own writes, if further)."""
        length = max(self._stat().length, self._written_end)
        if length < self._length:
            self._length = length
        return max(0, min(count, length - offset))

    # ----------------------------------------------------------------------------- positional IO

    def pread_into(self, buffer, offset: int) -> int:
        """Reads up to len(buffer) bytes at `offset` into `buffer` (a writable bytes-like); returns the
        count, short only at the end of the file."""
        self._check_io(writing=False)
        self._check_offset(offset)
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._known_length(offset + len(view)) - offset))
        if count and self._chunk_io.read(self._layout, self._inode_id, offset, view[:count]):
            count = self._recheck_short_read(offset, count)
        return count

    def pwrite(self, data, offset: int) -> int:
        """Writes all of `data` (bytes-like) at `offset`; returns its length once every replica has it."""
        self._check_io(writing=True)
        self._check_offset(offset)
        view = memoryview(data).cast("B")
        if len(view):
            self._unsynced = True  # before the write: a failed write may have reached some replicas
            self._chunk_io.write(self._layout, self._inode_id, offset, view)
            with self._ends_lock:  # IoRing workers write one file from several threads
                self._written_end = max(self._written_end, offset + len(view))
                self._length = max(self._length, offset + len(view))
        return len(view)

    def _report(self) -> tuple[int, int]:
        """(this handle's write end, the truncation count it was written under), read together: a report
        never pairs an end from before a truncate with the count from after it."""
        with self._ends_lock:
            return self._written_end, self._truncations

    def _end(self) -> int:
        """The file's current length (metadata's, which other writers' fsyncs update, or this handle's)."""
        return self._known_length(self._length + 1)

    def truncate(self, size: int | None = None) -> int:
        """Sets the length to `size` (default: the position); bytes past it are dropped from storage."""
        self._check_io(writing=True)
        size = self._position if size is None else size
        self._check_offset(size, "size")
        old = max(self._length, self._stat().length,
                  self._chunk_io.file_length(self._layout, self._inode_id))  # unreported writes too
        if size < old:
            self._unsynced = True
            self._chunk_io.cut(self._layout, self._inode_id, size, old)
        truncations = self._on_inode("truncate_inode", size).truncations
        with self._ends_lock:
            self._truncations = truncations
            self._length = size
            self._written_end = min(self._written_end, size)
            self._reported_end = min(self._reported_end, size)
        return size

    def fsync(self) -> None:
        """Makes every write to the file so far durable on every replica of its write paths (see the
        module docstring; OSError when that fails), then metadata's length exact (stat sees every byte
        written through this handle)."""
        self._check_io(writing=True)
        self._sync_storage()
        self._on_inode("sync", *self._report())

    def _sync_storage(self) -> None:
        """``ChunkIO.sync_file`` of this file; a failure leaves the handle unsynced (close tries again)."""
        self._unsynced = False
        try:
            self._chunk_io.sync_file(self._layout, self._inode_id)
        except BaseException:
            self._unsynced = True
            raise

    def _append_position(self, size: int) -> int:
        """An append's own range, reserved in the meta service (other clients may append concurrently)."""
        return self._meta.reserve_append(self._inode_id, size)

    def report_length(self) -> None:
        """Reports this handle's write end if it grew since the last report (the client's lease thread
        calls this periodically, so a length is known before close)."""
        end, truncations = self._report()
        if not self.closed and self._session_id is not None and end > self._reported_end:
            self._meta.sync(self._inode_id, end, truncations)
            self._reported_end = end

    def close(self) -> None:
        """Makes this handle's writes durable (if it wrote since its last fsync), ends its write session
        (reporting its length) and closes it; raises the sync's error, if any, once closed (see the
        module docstring)."""
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        sync_error = None
        if self._session_id is not None and self._unsynced:
            try:
                self._sync_storage()
            except Exception as exc:  # noqa: BLE001 - raised once the session is closed
                sync_error = exc
        try:
            self._end_session()
        finally:
            if sync_error is not None:
                raise sync_error

    def _end_session(self) -> None:
        if self._session_id is not None:
            try:
                self._meta.close(self._inode_id, self._session_id, *self._report())
            except (ValueError, FileNotFoundError):  # the session's lease ran out (this client was paused)
                try:
                    self._meta.sync(self._inode_id, *self._report())  # the length still counts
                except FileNotFoundError:
                    pass  # removed meanwhile, and collected once the lease ended
