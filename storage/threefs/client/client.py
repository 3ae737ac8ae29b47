"""``Client``: the 3FS file API (``file_api.FileClient``) over meta, mgmtd and storage services.

Namespace operations are single calls to a (stateless) metadata service; data moves between the client
and the storage services directly (``chunk_io.py``), striped by each file's layout. The services may be
in-process objects (``EmbeddedCluster``) or RPC proxies to server processes (``ProcessCluster``,
``python -m storage.threefs serve``): the client cannot tell.

Removing a file takes it out of the namespace at once and touches no storage; its chunks are deleted
by background garbage collection (``garbage.py``: the meta server, or an ``EmbeddedCluster``'s heartbeat
thread, runs it; ``collect_garbage`` runs one round now). Chunks of a target that was offline at the time
are cleaned up by that target's resync. While writing, the client's lease thread also reports the write
end of each file it has open for writing (``ThreeFSFile.report_length``).

Example::

    client = storage.threefs.connect("3fs+embedded:///tmp/my-cluster")
    with client.open("/data/part-0.bin", "wb") as f:
        f.write(payload)
    client.stat("/data/part-0.bin").size
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storage.threefs.client.chunk_io import ChunkIO, RoutingCache
from storage.threefs.client.file import ThreeFSFile
from storage.threefs.client.file_api import FileStat, parse_mode
from storage.threefs.client.garbage import GC_RETRY_SECONDS, collect_garbage
from storage.threefs.meta.schema import Inode, InodeType
from storage.threefs.mgmtd.routing import RoutingInfo
from storage.threefs.client.usrbio import IoRing, IoVec

CLOSE_WAIT_SECONDS = 1.0  # close waits this long for the session-renewal thread to stop


class Client:
    """A 3FS client.

    Args:
      meta: a MetaService (or RPC proxy to one).
      routing: returns mgmtd's current RoutingInfo (``Manager.routing`` or its proxy).
      storage: node id -> that node's StorageService or RPC proxy.
      client_id: names this client's write sessions (default: a fresh UUID).
      io_threads: chunk requests in flight at once.
      retry_timeout: seconds a chunk request keeps retrying while the cluster reconfigures.
      on_close: called once by ``close`` (a cluster releases what it opened for this client).
      session_renew_interval: seconds between renewals of this client's write-session leases (shorter than
        the cluster's lease; None: never, as a dead client would).
      hedge_delay: seconds a chunk read waits for one replica before asking the next as well (None: one
        at a time); see ``chunk_io.ChunkIO``.
      bulk_storage: like `storage`, for chunk removal (garbage collection), which may take longer than
        a data request's deadline; default `storage`.
    """

    def __init__(self, meta: Any, routing: Callable[[], RoutingInfo], storage: Callable[[int], Any], *,
                 client_id: str | None = None, io_threads: int = 8, retry_timeout: float = 20.0,
                 on_close: Callable[[], None] | None = None, session_renew_interval: float | None = 10.0,
                 hedge_delay: float | None = 0.1, bulk_storage: Callable[[int], Any] | None = None) -> None:
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        self.meta = meta
        self.client_id = client_id or f"client-{uuid.uuid4()}"
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="3fs-io")
        self.routing = RoutingCache(routing)
        self.chunk_io = ChunkIO(self.routing, storage, self._pool, retry_timeout, hedge_delay=hedge_delay,
                                bulk_storage=bulk_storage, hedge_threads=4 * io_threads)
        self._on_close = on_close
        self._closed = False
        self._lock = threading.Lock()
        self._open_files: set[ThreeFSFile] = set()  # closed with the client (their write sessions too)
        self._stopping = threading.Event()
        self._renewer = None
        if session_renew_interval is not None:
            self._renewer = threading.Thread(target=self._renew_sessions, args=(session_renew_interval,),
                                             name="3fs-session-leases", daemon=True)
            self._renewer.start()

    def __repr__(self) -> str:
        return f"Client({self.client_id!r})"

    # ----------------------------------------------------------------------------- files

    def open(self, path: str, mode: str = "rb") -> ThreeFSFile:
        """Opens a file in a binary mode: rb, r+b, wb, w+b, ab, a+b or xb."""
        self._require_open()
        open_mode = parse_mode(mode)
        if not open_mode.create:
            inode, session = self.meta.open(path, self.client_id, write=open_mode.write)
        else:
            previous = self._stat_or_none(path) if open_mode.truncate else None
            if previous is not None and previous.type is InodeType.FILE:
                # "wb" over an existing file: its chunks go before its length, so stale bytes can never
                # reappear past a new end (if this fails, open raises; the old content is partly gone)
                self.chunk_io.remove_file(previous.layout, previous.inode_id)
            inode, session = self.meta.create(path, self.client_id, exclusive=open_mode.exclusive,
                                              truncate=open_mode.truncate)
        try:
            if inode.type is not InodeType.FILE:
                raise IsADirectoryError(21, "Is a directory", path)
            file = ThreeFSFile(self.meta, self.chunk_io, path, mode, open_mode, inode, session, self.forget)
        except BaseException:
            if session is not None:
                self.meta.close(inode.inode_id, session, None)
            raise
        with self._lock:
            closed_meanwhile = self._closed
            if not closed_meanwhile:
                self._open_files.add(file)
        if closed_meanwhile:
            file.close()
            self._require_open()
        return file

    def _renew_sessions(self, interval: float) -> None:
        """Keeps this client's write sessions alive (the cluster ends the sessions of dead clients) and
        reports the write end of each file open for writing."""
        while not self._stopping.wait(interval):
            with self._lock:
                writing = [f for f in self._open_files if f.writable()]
            if not writing:
                continue
            log = logging.getLogger(__name__)
            try:
                self.meta.renew_sessions(self.client_id)
            except Exception as error:  # noqa: BLE001 - a meta server that is down: retried next interval
                log.warning("3FS session renewal failed: %s", error)
                continue
            for file in writing:  # one file's failed report (removed meanwhile, ...) does not stop the others
                try:
                    file.report_length()
                except Exception as error:  # noqa: BLE001 - reported again next interval, and on close
                    log.warning("3FS length report of %s failed: %s", file.path, error)

    def forget(self, file: ThreeFSFile) -> None:
        """Called by a file as it closes."""
        with self._lock:
            self._open_files.discard(file)

    def _stat_or_none(self, path: str) -> Inode | None:
        try:
            return self.meta.stat(path)
        except FileNotFoundError:
            return None

    def iovec(self, size: int, block_size: int = 0) -> IoVec:
        """A shared-memory buffer for batched IO (USRBIO's Iov)."""
        self._require_open()
        return IoVec(size, block_size)

    def ioring(self, entries: int, for_read: bool = True, io_depth: int = 0) -> IoRing:
        """A batch of reads or writes over this client's files (USRBIO's Ior)."""
        self._require_open()
        return IoRing(entries, for_read=for_read, io_depth=io_depth)

    # ----------------------------------------------------------------------------- namespace

    def stat(self, path: str) -> FileStat:
        self._require_open()
        inode = self.meta.stat(path)
        return FileStat(path=path, size=inode.length if inode.type is InodeType.FILE else 0,
                        type=inode.type.value, mtime=inode.mtime, inode_id=inode.inode_id)

    def listdir(self, path: str) -> list[str]:
        self._require_open()
        return [entry.name for entry in self.meta.listdir(path)]

    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        self._require_open()
        self.meta.mkdir(path, parents=True, exist_ok=exist_ok)

    def mkdir(self, path: str) -> None:
        self._require_open()
        self.meta.mkdir(path)

    def rename(self, src: str, dst: str, replace: bool = True) -> None:
        """Atomic: one metadata transaction; replaces a file or an empty directory at `dst` (replace=False:
        FileExistsError instead)."""
        self._require_open()
        self.meta.rename(src, dst, replace)  # a replaced file's chunks go by garbage collection

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file or symlink; a directory when empty, or with everything in it when `recursive`."""
        self._require_open()
        self.meta.remove(path, recursive)  # one metadata transaction; chunks are collected in the background

    def exists(self, path: str) -> bool:
        self._require_open()
        return self._stat_or_none(path) is not None

    def symlink(self, target: str, path: str) -> None:
        self._require_open()
        self.meta.symlink(target, path)

    def readlink(self, path: str) -> str:
        self._require_open()
        return self.meta.readlink(path)

    def collect_garbage(self, limit: int = 1024) -> int:
        """Runs one garbage-collection round now (``garbage.collect_garbage``: deletes the chunks of up
        to `limit` removed files, then forgets them); returns how many files were collected. The
        cluster collects in the background anyway; this is for tools and tests."""
        self._require_open()
        return collect_garbage(self.meta, self.chunk_io, limit, GC_RETRY_SECONDS)

    def close(self) -> None:
        """Closes the files still open through this client (ending their write sessions), then the client.

        Always finishes and never raises: every file is marked closed, session renewal stops, the IO
        threads are released and ``on_close`` runs, whatever fails on the way. A file whose close could
        not reach the metadata service (down, hung) is logged as a warning; its write session then ends
        by its lease (its bytes are on every replica already). Idempotent; afterwards every method of the
        client raises ``ValueError``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            files = list(self._open_files)
        log = logging.getLogger(__name__)
        self._stopping.set()  # first, so a renewal stuck on a hung meta server does not keep us waiting
        for file in files:
            try:
                file.close()
            except Exception as error:  # noqa: BLE001 - the file is closed; its session ends by lease
                log.warning("3FS client %s: closing %r failed (its write session ends by lease): %s",
                            self.client_id, file, error)
        if self._renewer is not None:
            self._renewer.join(timeout=CLOSE_WAIT_SECONDS)  # a daemon thread: one stuck in an RPC just ends later
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.chunk_io.close()
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception as error:  # noqa: BLE001 - closing must finish
                log.warning("3FS client %s: releasing its connections failed: %s", self.client_id, error)

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError(f"3FS client {self.client_id} is closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
