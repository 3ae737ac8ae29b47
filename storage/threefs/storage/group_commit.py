"""Group-commit durability for one chunk store: what was written since the last sync, and the sync itself.

A chunk store's writes return once their bytes are in the page cache (pwrite, no fsync) and its commits
once their metadata row is in SQLite's WAL: both survive a SIGKILL, not a power loss. `GroupCommit`
remembers which slot files were written (`wrote`) and whether the metadata changed (`metadata_changed`)
since the last `sync`, which fsyncs those files, then the chunks directory (new names), then the
metadata (the store's `checkpoint`). A sync runs every `interval` seconds in a background thread and
whenever called: a client's ``fsync`` / ``close`` reaches it through ``StorageService.sync``, so what a
client synced is durable on every replica when that returns. A sync with nothing written since the last
one touches no disk (``cheap when clean``).

Contract: when `sync()` returns, every file `wrote` named before `sync()` was called, and every metadata
change made before it, is durable (fsynced), unless `sync()` raised. Syncs are serialized: one that
starts while another runs waits for it and then syncs what is left.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from storage.threefs.storage.fd_cache import FdCache


class GroupCommit:
    """The durability bookkeeping of one store. Thread-safe.

    Args:
      chunks_dir: the directory holding the slot files (fsynced when a sync saw new files).
      fds: the store's descriptor cache (a sync fsyncs through it).
      checkpoint: makes the store's metadata durable (called with nothing else of this object locked;
        it may raise when the store is closed: that metadata is then synced by the close itself).
      enabled: False makes every sync a no-op (a store opened without fsync).
      interval: seconds between background syncs (None or <= 0: no background thread).
      name: names the background thread.
    """

    def __init__(self, chunks_dir: Path, fds: FdCache, checkpoint: Callable[[], None], *, enabled: bool,
                 interval: float | None, name: str) -> None:
        self._chunks_dir = chunks_dir
        self._fds = fds
        self._checkpoint = checkpoint
        self.enabled = enabled
        self._lock = threading.Lock()  # guards the bookkeeping below (never held during IO)
        self._sync_lock = threading.Lock()  # serializes syncs
        self._dirty: set[str] = set()  # slot files written since the last sync
        self._metadata_dirty = False
        self._stopped = threading.Event()
        self._thread = None
        if enabled and interval is not None and interval > 0:
            self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True,
                                            name=f"chunk-sync {name}")
            self._thread.start()

    # ----------------------------------------------------------------------------- bookkeeping

    def wrote(self, path: str) -> None:
        """`path` (a slot file) was written: the next sync fsyncs it."""
        if self.enabled:
            with self._lock:
                self._dirty.add(path)

    def forgot(self, path: str) -> None:
        """`path` was deleted: nothing of it to sync any more."""
        with self._lock:
            self._dirty.discard(path)

    def metadata_changed(self) -> None:
        """A metadata statement ran: the next sync checkpoints the metadata."""
        if self.enabled:
            with self._lock:
                self._metadata_dirty = True

    def unsynced_files(self) -> list[str]:
        """The slot files written since the last sync, sorted (empty once synced, or without fsync)."""
        with self._lock:
            return sorted(self._dirty)

    def metadata_unsynced(self) -> bool:
        """Whether a metadata change since the last sync is not durable yet."""
        with self._lock:
            return self._metadata_dirty

    # ----------------------------------------------------------------------------- syncing

    def sync(self) -> int:
        """Makes everything written so far durable (see the module docstring); returns how many slot
        files it fsynced. Raises OSError when an fsync fails (those files stay to sync again)."""
        if not self.enabled:
            return 0
        with self._sync_lock:
            with self._lock:
                dirty, self._dirty = self._dirty, set()
                metadata, self._metadata_dirty = self._metadata_dirty, False
            try:
                for path in sorted(dirty):
                    try:
                        with self._fds.use(path) as fd:
                            os.fsync(fd)
                    except FileNotFoundError:
                        pass  # removed meanwhile
                if dirty:
                    dir_fd = os.open(self._chunks_dir, os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
                if metadata:
                    self._checkpoint()
            except BaseException:
                with self._lock:  # not durable: the next sync tries again
                    self._dirty |= dirty
                    self._metadata_dirty |= metadata
                raise
            return len(dirty)

    def exclusive(self) -> threading.Lock:
        """The lock syncs hold: held, no sync runs (a closing store closes its metadata under it, so no
        checkpoint runs on a closed database)."""
        return self._sync_lock

    def _loop(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            if self._dirty or self._metadata_dirty:
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - a closed store or a full disk: the next round retries
                    pass

    def stop(self) -> None:
        """Stops the background thread (after its current sync); `sync` still works."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
