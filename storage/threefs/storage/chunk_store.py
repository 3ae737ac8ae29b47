"""The chunk engine: one storage target's chunks on local disk, copy-on-write, with checksums.

In 3FS every storage target keeps its chunks in a chunk engine: content in data files and chunk metadata
in RocksDB, cached in memory. A chunk holds at most two versions, the committed one `v` and a pending one
`u = v + 1` that a CRAQ write has applied but not yet committed. An update never touches the committed
bytes: it writes the whole new version to a new block (copy-on-write) and a metadata transaction makes it
pending; commit is a second metadata transaction that swaps pending in as committed (recording the chain
version), after which the old block is freed.

Here that block is a file per (chunk, version) under `<directory>/chunks/`; the metadata lives in
`<directory>/chunkmeta.sqlite` (a row per chunk: the committed and pending versions' files, lengths,
CRC32s of the whole content and CRC32s per 4 KiB piece). The order of effects makes a kill at any point
safe: a content file is written and fsynced before any metadata names it, and an old file is deleted only
after the transaction that stops naming it. Opening a store drops pending versions (their writes never
completed) and deletes files no metadata names, so a reopened store reads exactly the last committed
versions. The rows are keyed by the 16-byte chunk id, so one file's chunks are one key range
(`inode_chunks`: garbage collection and length queries never scan other files' rows). A read loads and checks only the 4 KiB pieces that overlap its range; reading a whole version
(repair, resync, the base of an update) checks all of it (`block_checksums.py`; ids: `chunk_id.py`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from storage.threefs.storage.block_checksums import block_checksums, read_blocks
from storage.threefs.storage.chunk_id import ChunkId, ChunkMeta, as_chunk_id, inode_key_range  # re-exported
from storage.threefs.errors import ChecksumError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    committed_version INTEGER NOT NULL, committed_file TEXT, length INTEGER NOT NULL,
    checksum INTEGER NOT NULL, chain_version INTEGER NOT NULL,
    pending_version INTEGER NOT NULL, pending_file TEXT, pending_length INTEGER NOT NULL,
    pending_checksum INTEGER NOT NULL, pending_chain_version INTEGER NOT NULL,
    block_checksums BLOB NOT NULL, pending_block_checksums BLOB NOT NULL
) WITHOUT ROWID
"""
_SCHEMA_VERSION = 2  # PRAGMA user_version; 2 added the per-block checksums


class ChunkStoreFormatError(RuntimeError):
    """The metadata database on disk was written in another format than this code reads."""


class PendingVersionExists(RuntimeError):
    """A chunk already holds a pending version; a target holds at most one (u = v + 1)."""


class ChunkVersionMismatch(RuntimeError):
    """An update carries a version that does not follow this target's committed version of the chunk."""


class _Record(NamedTuple):
    """One metadata row: the committed version's file and the pending one's (None when absent)."""

    committed_version: int
    committed_file: str | None
    length: int
    checksum: int
    chain_version: int
    pending_version: int = 0
    pending_file: str | None = None
    pending_length: int = 0
    pending_checksum: int = 0
    pending_chain_version: int = 0
    block_checksums: bytes = b""
    pending_block_checksums: bytes = b""

    def without_pending(self) -> _Record:
        return self._replace(pending_version=0, pending_file=None, pending_length=0, pending_checksum=0,
                             pending_chain_version=0, pending_block_checksums=b"")


class _Opened(NamedTuple):
    """An open content file (a descriptor) with the length and CRC32s its metadata records."""

    fd: int
    name: str
    length: int
    checksum: int
    block_checksums: bytes


def _check_nonnegative(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class ChunkStore:
    """The chunks of one storage target, under `directory` (created if missing). Thread-safe.

    Args:
      directory: the target's root; holds `chunks/` (content files) and `chunkmeta.sqlite`.
      fsync: fsync content files, their directory and the metadata database (on by default).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self._chunks_dir = self.directory / "chunks"
        self._chunks_dir.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.directory / "chunkmeta.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found != _SCHEMA_VERSION and (found or self._db.execute("SELECT 1 FROM sqlite_master").fetchone()):
            self._db.close()
            raise ChunkStoreFormatError(f"{self.directory / 'chunkmeta.sqlite'} has metadata format {found}; "
                                        f"this code reads format {_SCHEMA_VERSION} only: move that target away")
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")  # first: a kill in between is harmless
        self._db.execute(_SCHEMA)
        self._cache: dict[ChunkId, _Record] = {}
        self._recover()

    # ----------------------------------------------------------------------------- open / close

    def _recover(self) -> None:
        """Loads the metadata, drops pending versions (their writes never finished) and orphan files."""
        rows = self._db.execute("SELECT * FROM chunks").fetchall()
        with self._transaction():
            for row in rows:
                chunk_id, record = ChunkId.from_bytes(row[0]), _Record(*row[1:])
                if record.pending_version:
                    record = record.without_pending()
                    if record.committed_version:
                        self._put(chunk_id, record)
                    else:
                        self._db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id.to_bytes(),))
                        continue
                self._cache[chunk_id] = record
        named = {r.committed_file for r in self._cache.values()}
        for path in self._chunks_dir.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Closes the metadata database; the store is unusable afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.directory)!r})"

    # ----------------------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on the autocommit connection."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _put(self, chunk_id: ChunkId, record: _Record) -> None:
        """Writes one row (inside a transaction) and the cache."""
        self._db.execute("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (chunk_id.to_bytes(), *record))
        self._cache[chunk_id] = record

    def _delete(self, chunk_id: ChunkId) -> None:
        self._db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id.to_bytes(),))
        self._cache.pop(chunk_id, None)

    def _write_file(self, chunk_id: ChunkId, version: int, content: bytes) -> str:
        """Writes a new content file (never an existing one) and makes it durable; returns its name."""
        name = f"{chunk_id.hex()}.v{version}.{uuid.uuid4().hex[:12]}"
        path = self._chunks_dir / name
        with open(path, "xb") as f:
            f.write(content)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        if self._fsync:
            dir_fd = os.open(self._chunks_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return name

    def _unlink(self, *names: str | None) -> None:
        for name in names:
            if name:
                (self._chunks_dir / name).unlink(missing_ok=True)

    def _read_verified(self, chunk_id: ChunkId, version: int, opened: _Opened, offset: int = 0,
                       length: int | None = None) -> bytes:
        """Reads [offset, offset + length) (default: all) and checks its blocks; closes the file."""
        end = opened.length if length is None else min(offset + length, opened.length)
        where = f"chunk {chunk_id} version {version} on target {self.directory}: file {opened.name}"
        try:
            return read_blocks(opened.fd, min(offset, end), end, opened.length, opened.block_checksums,
                               opened.checksum, where)
        finally:
            os.close(opened.fd)

    def _open_version(self, chunk_id: ChunkId, version: int) -> _Opened | None:
        """Under the lock: an open handle on `version` of the chunk (committed or pending), or None."""
        r = self._cache.get(chunk_id)
        if r is None or version <= 0:
            return None
        if r.committed_version == version and r.committed_file:
            name, *fields = r.committed_file, r.length, r.checksum, r.block_checksums
        elif r.pending_version == version and r.pending_file:
            name, *fields = r.pending_file, r.pending_length, r.pending_checksum, r.pending_block_checksums
        else:
            return None
        try:
            return _Opened(os.open(self._chunks_dir / name, os.O_RDONLY), name, *fields)
        except FileNotFoundError:
            raise ChecksumError(f"chunk {chunk_id} version {version} on target {self.directory}: "
                                f"content file {name} is missing") from None

    # ----------------------------------------------------------------------------- queries

    def meta(self, chunk_id: ChunkId) -> ChunkMeta | None:
        """The chunk's metadata, or None when this target does not hold it."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            record = self._cache.get(chunk_id)
        if record is None:
            return None
        return ChunkMeta(chunk_id, record.committed_version, record.pending_version, record.chain_version,
                         record.length, record.checksum)

    def list_meta(self) -> list[ChunkMeta]:
        """All chunks' metadata in chunk id order (3FS's dump-chunkmeta)."""
        with self._lock:
            ids = sorted(self._cache, key=ChunkId.to_bytes)
        return [m for m in map(self.meta, ids) if m is not None]

    def inode_chunks(self, inode_id: int) -> list[ChunkMeta]:
        """Metadata of file `inode_id`'s chunks in chunk index order: one range query over the chunk-id
        keys (they sort by inode, then index), so no other inode's rows are read."""
        begin, end = inode_key_range(inode_id)
        with self._lock:
            rows = self._db.execute("SELECT id FROM chunks WHERE id >= ? AND id < ? ORDER BY id",
                                    (begin, end)).fetchall()
        return [m for m in (self.meta(ChunkId.from_bytes(row[0])) for row in rows) if m is not None]

    def pending_state(self, chunk_id: ChunkId) -> tuple[int, int]:
        """(pending version, CRC32 of its whole content) of the chunk; (0, 0) when none is pending."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            record = self._cache.get(chunk_id)
        if record is None or not record.pending_version:
            return 0, 0
        return record.pending_version, record.pending_checksum

    def content_path(self, chunk_id: ChunkId) -> Path | None:
        """The file that holds the committed content of the chunk, or None."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            record = self._cache.get(chunk_id)
        if record is None or not record.committed_file:
            return None
        return self._chunks_dir / record.committed_file

    def read(self, chunk_id: ChunkId, offset: int, length: int, pending: bool = False) -> bytes:
        """Bytes [offset, offset + length) of the committed version (the pending one if `pending` and the
        chunk has one). Short past the end; b"" for a chunk this target does not hold (a hole).

        Raises ChecksumError (naming the chunk, this target's directory and the block) when a block of
        content read does not match the checksum recorded when it was written; only the blocks that
        overlap the range are read and checked (a read of the whole chunk checks them all).
        """
        chunk_id = as_chunk_id(chunk_id)
        _check_nonnegative("offset", offset), _check_nonnegative("length", length)
        while True:
            with self._lock:
                record = self._cache.get(chunk_id)
            if record is None:
                return b""
            version = record.pending_version if pending and record.pending_version else record.committed_version
            data = self.read_version(chunk_id, version, offset, length)
            if data is not None or version == 0:
                return data or b""
            # committed over or aborted between the lookup and the read: look again

    def read_version(self, chunk_id: ChunkId, version: int, offset: int, length: int) -> bytes | None:
        """Like `read`, for one version number: None once this target holds that version no longer."""
        chunk_id = as_chunk_id(chunk_id)
        _check_nonnegative("offset", offset)
        _check_nonnegative("length", length)
        with self._lock:
            opened = self._open_version(chunk_id, version)
        if opened is None:
            return None
        return self._read_verified(chunk_id, version, opened, offset, length)

    # ----------------------------------------------------------------------------- updates

    def apply_write(self, chunk_id: ChunkId, offset: int, data: bytes, chain_version: int,
                    full_replace: bool = False, *, version: int | None = None) -> int:
        """Writes a new version of the chunk as its pending version and returns that version number.

        The new content is the committed content with [offset, offset + len(data)) replaced (zero-filled
        when `offset` is past the end), or `data` alone when `full_replace`. `version` defaults to
        committed + 1; a partial update must carry exactly that, a full replace any larger number.

        Raises PendingVersionExists when the chunk already has a pending version (abort or commit it
        first), ChunkVersionMismatch for a `version` that does not fit.
        """
        chunk_id = as_chunk_id(chunk_id)
        _check_nonnegative("offset", offset)
        _check_nonnegative("chain_version", chain_version)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        if full_replace and offset != 0:
            raise ValueError(f"a full-chunk replace writes at offset 0, got offset {offset}")
        with self._lock:
            base = self._cache.get(chunk_id)
            if base is not None and base.pending_version:
                raise PendingVersionExists(
                    f"chunk {chunk_id} on target {self.directory} already has pending version "
                    f"{base.pending_version} (committed {base.committed_version})")
            committed = base.committed_version if base else 0
            new_version = committed + 1 if version is None else version
            if new_version != committed + 1 and not (full_replace and new_version > committed):
                raise ChunkVersionMismatch(
                    f"chunk {chunk_id} on target {self.directory}: update version {new_version} does not "
                    f"follow committed version {committed}")
            opened = None if full_replace or base is None else self._open_version(chunk_id, committed)
        if opened is not None:
            old = self._read_verified(chunk_id, committed, opened)
            end = offset + len(data)
            content = b"".join((old[:offset], bytes(max(0, offset - len(old))), data, old[end:]))
        else:
            content = bytes(data) if full_replace else bytes(offset) + bytes(data)
        name = self._write_file(chunk_id, new_version, content)
        with self._lock:
            current = self._cache.get(chunk_id)
            if current != base:
                self._unlink(name)
                raise PendingVersionExists(f"chunk {chunk_id} on target {self.directory} changed during a write")
            record = (base or _Record(0, None, 0, 0, 0))._replace(
                pending_version=new_version, pending_file=name, pending_length=len(content),
                pending_checksum=zlib.crc32(content), pending_chain_version=chain_version,
                pending_block_checksums=block_checksums(content))
            with self._transaction():
                self._put(chunk_id, record)
        return new_version

    def commit(self, chunk_id: ChunkId, version: int, chain_version: int | None = None) -> None:
        """Atomically makes pending `version` the committed one (storing `chain_version`, by default the
        one given to `apply_write`), then frees the old content. Committing the already committed
        version again is a no-op."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            record = self._cache.get(chunk_id)
            if record is not None and record.committed_version == version and not record.pending_version:
                return
            if record is None or record.pending_version != version:
                held = "nothing" if record is None else (
                    f"committed {record.committed_version}, pending {record.pending_version}")
                raise ChunkVersionMismatch(
                    f"cannot commit version {version} of chunk {chunk_id} on target {self.directory}: "
                    f"it holds {held}")
            new = _Record(version, record.pending_file, record.pending_length, record.pending_checksum,
                          record.pending_chain_version if chain_version is None else chain_version,
                          block_checksums=record.pending_block_checksums)
            with self._transaction():
                self._put(chunk_id, new)
            old_file = record.committed_file
        self._unlink(old_file)

    def abort_pending(self, chunk_id: ChunkId) -> bool:
        """Drops the chunk's pending version; True when there was one."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            record = self._cache.get(chunk_id)
            if record is None or not record.pending_version:
                return False
            with self._transaction():
                if record.committed_version:
                    self._put(chunk_id, record.without_pending())
                else:
                    self._delete(chunk_id)
            pending_file = record.pending_file
        self._unlink(pending_file)
        return True

    def replace(self, chunk_id: ChunkId, content: bytes, committed_version: int, chain_version: int) -> None:
        """Installs `content` as the committed `committed_version` directly, dropping any pending version
        (the full-chunk replace that recovery and repair use)."""
        chunk_id = as_chunk_id(chunk_id)
        if not isinstance(committed_version, int) or committed_version < 1:
            raise ValueError(f"committed_version must be an int >= 1, got {committed_version!r}")
        _check_nonnegative("chain_version", chain_version)
        content = bytes(content)
        name = self._write_file(chunk_id, committed_version, content)
        with self._lock:
            old = self._cache.get(chunk_id)
            with self._transaction():
                self._put(chunk_id, _Record(committed_version, name, len(content), zlib.crc32(content),
                                            chain_version, block_checksums=block_checksums(content)))
        if old is not None:
            self._unlink(old.committed_file, old.pending_file)

    def remove(self, chunk_id: ChunkId) -> bool:
        """Deletes the chunk (all versions); True when this target held it."""
        chunk_id = as_chunk_id(chunk_id)
        with self._lock:
            record = self._cache.get(chunk_id)
            if record is None:
                return False
            with self._transaction():
                self._delete(chunk_id)
        self._unlink(record.committed_file, record.pending_file)
        return True

    def remove_inode(self, inode_id: int) -> int:
        """Deletes every chunk of file `inode_id` (found by `inode_chunks`' range query); returns how many
        there were."""
        return sum(self.remove(m.chunk_id) for m in self.inode_chunks(inode_id))

    # ----------------------------------------------------------------------------- reads into a buffer

    def read_into(self, chunk_id: ChunkId, version: int, offset: int, buffer) -> int | None:
        """Like `read_version` for [offset, offset + len(buffer)), written into `buffer` (a writable
        bytes-like): the number of bytes written (short past the end of the chunk), None once this target
        holds that version no longer. Raises ChecksumError as `read` does (the buffer may then hold part
        of the range). This is the simple form (read, then copy); the chunk engine may read in place."""
        view = memoryview(buffer).cast("B")
        data = self.read_version(chunk_id, version, offset, len(view))
        if data is None:
            return None
        view[:len(data)] = data
        return len(data)
