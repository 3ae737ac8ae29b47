"""The chunk engine: one storage target's chunks on local disk, two slot files per chunk, CRC32C.

In 3FS every storage target keeps its chunks in a chunk engine: content in data files and chunk metadata
in RocksDB, cached in memory. A chunk holds at most two versions, the committed one `v` and a pending one
`u = v + 1` that a CRAQ write has applied but not yet committed; the committed bytes are never touched
until the pending version replaces them.

Here each chunk has two slot files, `<directory>/chunks/<chunk id hex>.0` and `.1`: one holds the
committed version, the other (the spare) is where the next version is built, in place. The store
remembers which blocks of the spare differ from the committed content (the blocks the last write
changed), so a write copies into the spare only those stale blocks and the 4 KiB blocks it changes
itself (`version_writer.py`): a 4 KiB write copies two blocks, not a chunk; a write that covers the
chunk reads nothing old. Pending versions live in memory only; commit is one metadata statement
(`chunk_meta_db.py`: a row per chunk, the committed version), after which the old committed slot is the
spare. A reopened store drops pending versions and spare files and reads the last committed versions.

Durability (group commit, `group_commit.py`). A write returns once its bytes are in the page cache
(pwrite, no fsync) and a commit once its row is in SQLite's WAL; both survive a SIGKILL of the process,
so nothing a replica acknowledged is lost by a kill. `sync()` fsyncs every slot file written since the
last sync and then the metadata; it runs every `sync_interval` seconds in a background thread and
whenever called (a client's fsync/close, through ``StorageService.sync``); `unsynced_files()` says
what a sync would still have to make durable. A power loss (or kernel crash) can lose what was written
since the last sync: such a chunk may come back at an older committed version, or with blocks that
fail their CRC32C (a ChecksumError: repaired from another replica, else EIO), never as wrong bytes.

Reads take a cached open descriptor (`fd_cache.py`) and one pread/preadv, checking only the blocks that
overlap the range (`block_checksums.py`); `read_into` reads straight into the caller's buffer. Rows are
keyed by the 16-byte chunk id, so one file's chunks are one key range (`inode_chunks`, `remove_inode`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from storage.threefs.errors import ChecksumError
from storage.threefs.storage.block_checksums import read_blocks, read_blocks_into
from storage.threefs.storage.chunk_id import ChunkId, ChunkMeta, as_chunk_id, inode_key_range  # re-exported
from storage.threefs.storage.chunk_meta_db import ChunkMetaDb, ChunkStoreFormatError, CommittedRow  # re-exported
from storage.threefs.storage.chunk_state import ChunkState as _Chunk, LocatedVersion as _Located
from storage.threefs.storage.chunk_state import ChunkVersionMismatch, PendingVersionExists  # re-exported
from storage.threefs.storage.chunk_state import check_nonnegative as _check_nonnegative
from storage.threefs.storage.fd_cache import FdCache
from storage.threefs.storage.group_commit import GroupCommit
from storage.threefs.storage.version_writer import Version, build_version, install_content

__all__ = ["ChunkId", "ChunkMeta", "ChunkStore", "ChunkStoreFormatError", "ChunkVersionMismatch", "PendingVersionExists"]


class _Where:
    """A read's "where" for error messages (chunk, version, target, file), formatted only when a
    message is built: a read that passes its checks never pays for the string."""

    __slots__ = ("chunk_id", "version", "directory", "path")

    def __init__(self, chunk_id: ChunkId, version: int, directory: Path, path: str) -> None:
        self.chunk_id, self.version, self.directory, self.path = chunk_id, version, directory, path

    def __str__(self) -> str:
        return (f"chunk {self.chunk_id} version {self.version} on target {self.directory}: "
                f"file {os.path.basename(self.path)}")

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class ChunkStore:
    """The chunks of one storage target, under `directory` (created if missing). Thread-safe.

    Args:
      directory: the target's root; holds `chunks/` (slot files) and `chunkmeta.sqlite`.
      fsync: make writes durable by group commit (`sync`); False never fsyncs (tests, scratch).
      sync_interval: seconds between background syncs of what was written (with `fsync`; 0: only when
        `sync` is called).
      open_files: descriptors kept open for reads and writes (an LRU).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True, sync_interval: float = 0.05,
                 open_files: int = 256) -> None:
        self.directory = Path(directory)
        self._chunks_dir = self.directory / "chunks"
        self._chunks_dir.mkdir(parents=True, exist_ok=True)
        self._chunks_prefix = os.path.join(str(self._chunks_dir), "")  # slot paths: prefix + name (no pathlib per IO)
        self._lock = threading.RLock()
        self._db = ChunkMetaDb(self.directory / "chunkmeta.sqlite", durable=fsync)
        self._fds = FdCache(open_files)
        self._chunks: dict[ChunkId, _Chunk] = {}
        self._writing: set[ChunkId] = set()  # chunks whose spare slot a write is filling
        self._closed = threading.Event()
        self._recover()
        self._durability = GroupCommit(self._chunks_dir, self._fds, self._checkpoint, enabled=fsync,
                                       interval=sync_interval, name=self.directory.name)

    # ----------------------------------------------------------------------------- open / close / sync

    def _recover(self) -> None:
        """Loads the committed versions; deletes every file that is not a committed slot (spares, leftovers
        of pending versions, files of another format)."""
        for raw_id, row in self._db.load():
            self._chunks[ChunkId.from_bytes(raw_id)] = _Chunk(Version(*row))
        named = {self._slot_name(c, chunk.committed.slot) for c, chunk in self._chunks.items()}
        for path in self._chunks_dir.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)

    def sync(self) -> int:
        """Makes everything written and committed so far durable: fsyncs the slot files written since the
        last sync and the chunks directory, then the metadata (a no-op without `fsync`, and when nothing
        was written since the last sync). Returns how many slot files it fsynced."""
        return self._durability.sync()

    def unsynced_files(self) -> list[str]:
        """Names of the slot files written since the last sync (what a power loss could lose), sorted."""
        return [Path(path).name for path in self._durability.unsynced_files()]

    def metadata_unsynced(self) -> bool:
        """Whether a metadata change (a commit, a removal) since the last sync is not durable yet."""
        return self._durability.metadata_unsynced()

    def _checkpoint(self) -> None:
        if not self._closed.is_set():  # close() closes the database holding the durability lock too
            self._db.checkpoint()  # its own connection: writes and reads go on meanwhile

    def close(self) -> None:
        """Syncs, then closes the metadata database and the descriptors; the store is unusable afterwards."""
        if self._closed.is_set():
            return
        try:
            self._durability.stop()
            self.sync()
        finally:
            with self._durability.exclusive(), self._lock:  # no sync's checkpoint meets a closed database
                self._closed.set()
                self._db.close()
            self._fds.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.directory)!r})"

    # ----------------------------------------------------------------------------- internals

    @staticmethod
    def _slot_name(chunk_id: ChunkId, slot: int) -> str:
        return f"{chunk_id.hex()}.{slot}"

    def _slot_path(self, chunk_id: ChunkId, slot: int) -> str:
        return f"{self._chunks_prefix}{chunk_id.hex()}.{slot}"

    def _unlink_slot(self, chunk_id: ChunkId, slot: int) -> None:
        path = self._slot_path(chunk_id, slot)
        self._fds.forget(path)
        self._durability.forgot(path)
        Path(path).unlink(missing_ok=True)

    def _locate(self, chunk_id: ChunkId, version: int) -> _Located | None:
        """Under the lock: where `version` of the chunk (committed or pending) lives, or None."""
        chunk = self._chunks.get(chunk_id)
        if chunk is None or version <= 0:
            return None
        for held in (chunk.committed, chunk.pending):
            if held is not None and held.version == version:
                paths = chunk.paths
                if paths is None:
                    paths = chunk.paths = (self._slot_path(chunk_id, 0), self._slot_path(chunk_id, 1))
                return _Located(paths[held.slot], held, chunk.epoch)
        return None

    def _read_located(self, chunk_id: ChunkId, located: _Located, read) -> object:
        """Runs `read(fd, version)` on the located version's slot. A ChecksumError or a missing file while
        the version moved on (committed over, aborted, its slot reused) answers None instead."""
        try:
            try:
                with self._fds.use(located.path) as fd:
                    return read(fd, located.version)
            except FileNotFoundError:
                raise ChecksumError(f"chunk {chunk_id} version {located.version.version} on target "
                                    f"{self.directory}: content file {Path(located.path).name} is missing") from None
        except ChecksumError:
            with self._lock:
                if self._locate(chunk_id, located.version.version) != located:
                    return None
            raise

    def _where(self, chunk_id: ChunkId, located: _Located) -> _Where:
        return _Where(chunk_id, located.version.version, self.directory, located.path)

    # ----------------------------------------------------------------------------- queries

    def meta(self, chunk_id: ChunkId) -> ChunkMeta | None:
        """The chunk's metadata, or None when this target does not hold it."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if chunk is None:
                return None
            c, p = chunk.committed, chunk.pending
        if c is None:
            return ChunkMeta(chunk_id, 0, p.version if p else 0, 0, 0, 0)
        return ChunkMeta(chunk_id, c.version, p.version if p else 0, c.chain_version, c.length, c.checksum)

    def list_meta(self) -> list[ChunkMeta]:
        """All chunks' metadata in chunk id order (3FS's dump-chunkmeta)."""
        with self._lock:
            ids = sorted(self._chunks, key=ChunkId.to_bytes)
        return [m for m in map(self.meta, ids) if m is not None]

    def inode_chunks(self, inode_id: int) -> list[ChunkMeta]:
        """Metadata of file `inode_id`'s committed chunks in chunk index order: one range query over the
        chunk-id keys (they sort by inode, then index), so no other inode's rows are read."""
        with self._lock:
            ids = self._db.ids_in(*inode_key_range(inode_id))
        return [m for m in (self.meta(ChunkId.from_bytes(raw)) for raw in ids) if m is not None]

    def pending_state(self, chunk_id: ChunkId) -> tuple[int, int]:
        """(pending version, its version checksum) of the chunk; (0, 0) when none is pending."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            pending = chunk.pending if chunk else None
        return (pending.version, pending.checksum) if pending else (0, 0)

    def content_path(self, chunk_id: ChunkId) -> Path | None:
        """The slot file that holds the committed content of the chunk, or None."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if chunk is None or chunk.committed is None:
                return None
            return Path(self._slot_path(chunk_id, chunk.committed.slot))

    def read(self, chunk_id: ChunkId, offset: int, length: int, pending: bool = False) -> bytes:
        """Bytes [offset, offset + length) of the committed version (the pending one if `pending` and the
        chunk has one). Short past the end; b"" for a chunk this target does not hold (a hole).

        Raises ChecksumError (naming the chunk, this target's directory and the block) when a block of
        content read does not match the CRC32C recorded when it was written; only the blocks that
        overlap the range are read and checked.
        """
        chunk_id = as_chunk_id(chunk_id)
        _check_nonnegative("offset", offset), _check_nonnegative("length", length)
        while True:
            with self._lock:
                chunk = self._chunks.get(chunk_id)
                held = None if chunk is None else (chunk.pending if pending and chunk.pending else chunk.committed)
            if held is None:
                return b""
            data = self.read_version(chunk_id, held.version, offset, length)
            if data is not None:
                return data
            # committed over or aborted between the lookup and the read: look again

    def read_version(self, chunk_id: ChunkId, version: int, offset: int, length: int) -> bytes | None:
        """Like `read`, for one version number: None once this target holds that version no longer."""
        chunk_id = as_chunk_id(chunk_id)
        _check_nonnegative("offset", offset), _check_nonnegative("length", length)
        with self._lock:
            located = self._locate(chunk_id, version)
        if located is None:
            return None
        where = self._where(chunk_id, located)

        def read(fd: int, v: Version) -> bytes:
            end = min(offset + length, v.length)
            return read_blocks(fd, min(offset, end), end, v.length, v.block_crcs, v.whole_crc, where)

        return self._read_located(chunk_id, located, read)

    def read_into(self, chunk_id: ChunkId, version: int, offset: int, buffer: memoryview) -> int | None:
        """Reads bytes [offset, offset + len(buffer)) of `version` of the chunk straight into `buffer`
        (one preadv) after checking the CRC32C of every block it touches; returns the number of bytes
        read (short past the version's end), or None when this target holds that version no longer.
        Raises ChecksumError like `read` (the buffer then holds unchecked bytes)."""
        chunk_id = as_chunk_id(chunk_id)
        _check_nonnegative("offset", offset)
        with self._lock:
            located = self._locate(chunk_id, version)
        if located is None:
            return None
        where = self._where(chunk_id, located)
        return self._read_located(chunk_id, located, lambda fd, v: read_blocks_into(
            fd, buffer, offset, v.length, v.block_crcs, v.whole_crc, where))

    # ----------------------------------------------------------------------------- updates

    def apply_write(self, chunk_id: ChunkId, offset: int, data: bytes, chain_version: int,
                    full_replace: bool = False, *, version: int | None = None, data_crc: int | None = None) -> int:
        """Writes a new version of the chunk as its pending version and returns that version number.

        The new content is the committed content with [offset, offset + len(data)) replaced (zero-filled
        when `offset` is past the end), or `data` alone when `full_replace`. `version` defaults to
        committed + 1; a partial update must carry exactly that, a full replace any larger number.
        `data_crc`, the CRC32C of `data` if the caller checked it already, saves computing it again.

        Raises PendingVersionExists when the chunk already has a pending version (abort or commit it
        first) or another write to it is under way, ChunkVersionMismatch for a `version` that does not
        fit, ChecksumError when a committed block the write builds on is damaged.
        """
        chunk_id = as_chunk_id(chunk_id)
        _check_nonnegative("offset", offset)
        _check_nonnegative("chain_version", chain_version)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        if full_replace and offset != 0:
            raise ValueError(f"a full-chunk replace writes at offset 0, got offset {offset}")
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if chunk_id in self._writing or chunk is not None and chunk.pending is not None:
                raise PendingVersionExists(
                    f"chunk {chunk_id} on target {self.directory} already has pending version "
                    f"{chunk.pending.version if chunk and chunk.pending else '(being written)'} "
                    f"(committed {chunk.committed.version if chunk and chunk.committed else 0})")
            base = chunk.committed if chunk else None
            committed = base.version if base else 0
            new_version = committed + 1 if version is None else version
            if new_version != committed + 1 and not (full_replace and new_version > committed):
                raise ChunkVersionMismatch(
                    f"chunk {chunk_id} on target {self.directory}: update version {new_version} does not "
                    f"follow committed version {committed}")
            stale = chunk.stale if chunk else None
            if chunk is not None:
                chunk.epoch += 1
            self._writing.add(chunk_id)
        slot = 1 - base.slot if base else 0
        try:
            base_path = self._slot_path(chunk_id, base.slot) if base else None
            where = f"chunk {chunk_id} version {committed} on target {self.directory}"
            with self._fds.use(self._slot_path(chunk_id, slot), create=True) as fd:
                pending = build_version(fd, self._fds, base, base_path, stale, offset, data, full_replace,
                                        new_version, slot, chain_version, data_crc, where)
        except FileNotFoundError as exc:  # the committed slot file is gone: a damaged copy, as reads say
            self._forget_spare(chunk_id)
            raise ChecksumError(f"{where}: its slot file is missing ({exc})") from exc
        except BaseException:
            self._forget_spare(chunk_id)
            raise
        finally:
            with self._lock:
                self._writing.discard(chunk_id)
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if (chunk.committed if chunk else None) is not base:
                raise PendingVersionExists(f"chunk {chunk_id} on target {self.directory} changed during a write")
            if chunk is None:
                chunk = self._chunks[chunk_id] = _Chunk(None)
            chunk.pending = pending
            self._durability.wrote(self._slot_path(chunk_id, slot))
        return new_version

    def _forget_spare(self, chunk_id: ChunkId) -> None:
        """After a write into the spare slot failed part-way: its content is unknown, so the next write
        copies every committed block into it (never builds on the failed write's bytes)."""
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if chunk is not None:
                chunk.stale = None

    def commit(self, chunk_id: ChunkId, version: int, chain_version: int | None = None) -> None:
        """Makes pending `version` the committed one (storing `chain_version`, by default the one given to
        `apply_write`) with one metadata statement. Committing the committed version again is a no-op."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if chunk is not None and chunk.pending is None and chunk.committed and chunk.committed.version == version:
                return
            if chunk is None or chunk.pending is None or chunk.pending.version != version:
                held = "nothing" if chunk is None else (
                    f"committed {chunk.committed.version if chunk.committed else 0}, "
                    f"pending {chunk.pending.version if chunk.pending else 0}")
                raise ChunkVersionMismatch(
                    f"cannot commit version {version} of chunk {chunk_id} on target {self.directory}: "
                    f"it holds {held}")
            new = chunk.pending if chain_version is None else chunk.pending._replace(chain_version=chain_version)
            self._db.put(chunk_id.to_bytes(), CommittedRow(*new[:7]))
            self._durability.metadata_changed()
            had_base = chunk.committed is not None
            chunk.committed, chunk.pending = new, None
            chunk.stale = set(range(*new.changed)) if new.changed is not None and had_base else None

    def abort_pending(self, chunk_id: ChunkId) -> bool:
        """Drops the chunk's pending version; True when there was one."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if chunk is None or chunk.pending is None:
                return False
            pending, chunk.pending = chunk.pending, None
            if chunk.committed is not None:  # the spare now holds the pending content: its changed blocks differ
                chunk.stale = set(range(*pending.changed)) if pending.changed is not None else None
                return True
            del self._chunks[chunk_id]
        self._unlink_slot(chunk_id, pending.slot)
        return True

    def replace(self, chunk_id: ChunkId, content: bytes, committed_version: int, chain_version: int) -> None:
        """Installs `content` as the committed `committed_version` directly, dropping any pending version
        (the full-chunk replace that recovery and repair use); the previous slot file is deleted."""
        chunk_id = as_chunk_id(chunk_id)
        if not isinstance(committed_version, int) or committed_version < 1:
            raise ValueError(f"committed_version must be an int >= 1, got {committed_version!r}")
        _check_nonnegative("chain_version", chain_version)
        with self._lock:
            if chunk_id in self._writing:
                raise PendingVersionExists(f"chunk {chunk_id} on target {self.directory} is being written")
            chunk = self._chunks.get(chunk_id)
            old = chunk.committed if chunk else None
            if chunk is not None:
                chunk.pending = None
                chunk.epoch += 1
            self._writing.add(chunk_id)
        slot = 1 - old.slot if old else 0
        try:
            with self._fds.use(self._slot_path(chunk_id, slot), create=True) as fd:
                new = install_content(fd, content, committed_version, slot, chain_version)
        except BaseException:
            self._forget_spare(chunk_id)
            raise
        finally:
            with self._lock:
                self._writing.discard(chunk_id)
        with self._lock:
            self._db.put(chunk_id.to_bytes(), CommittedRow(*new[:7]))
            self._durability.metadata_changed()
            self._chunks[chunk_id] = _Chunk(new)
            self._durability.wrote(self._slot_path(chunk_id, slot))
        if old is not None:
            self._unlink_slot(chunk_id, old.slot)

    def remove(self, chunk_id: ChunkId) -> bool:
        """Deletes the chunk (all versions); True when this target held it."""
        return bool(self._remove_all([as_chunk_id(chunk_id)]))

    def remove_inode(self, inode_id: int) -> int:
        """Deletes every chunk of file `inode_id` (found by one key-range query, deleted in one metadata
        transaction); returns how many there were."""
        with self._lock:
            ids = [ChunkId.from_bytes(raw) for raw in self._db.ids_in(*inode_key_range(inode_id))]
        return self._remove_all(ids)

    def _remove_all(self, chunk_ids: list[ChunkId]) -> int:
        with self._lock:
            held = [(c, self._chunks.pop(c)) for c in chunk_ids if c in self._chunks]
            self._db.delete(c.to_bytes() for c, chunk in held if chunk.committed is not None)
            self._durability.metadata_changed()
            for _, chunk in held:
                chunk.epoch += 1
        for chunk_id, _ in held:
            self._unlink_slot(chunk_id, 0)
            self._unlink_slot(chunk_id, 1)
        return len(held)
