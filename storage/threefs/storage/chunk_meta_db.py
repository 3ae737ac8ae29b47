"""The chunk engine's metadata on disk: one SQLite row per chunk, holding its committed version only.

Format 3 (`PRAGMA user_version`): a row per chunk keyed by the 16-byte chunk id (so one file's chunks are
one key range), with the committed version number, the chain version it was committed under, the slot
file holding its content (0 or 1), its length, the CRC32C of the whole content (NULL when unknown), the
version checksum and the packed per-block CRC32Cs. Pending versions are never written here: a restarted
store drops them anyway, so a CRAQ write costs one metadata statement, at commit.

Durability: WAL with `synchronous=NORMAL`. Every statement reaches the WAL file (the page cache) when it
returns, so a killed process loses nothing; `checkpoint()` fsyncs the WAL (and the database), after
which a power loss loses nothing either. The checkpoint runs on a connection of its own, so it never
waits for, or holds up, the statements of the writes (a WAL checkpoint runs alongside writers). A store in another format (format 2 wrote a file per chunk
version, CRC32s and a row with pending columns) is refused with ChunkStoreFormatError.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

FORMAT = 3  # 2: a file per chunk version, zlib CRC32s; 3: two slot files per chunk, CRC32C, committed rows only

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    version INTEGER NOT NULL, chain_version INTEGER NOT NULL, slot INTEGER NOT NULL,
    length INTEGER NOT NULL, whole_crc INTEGER, checksum INTEGER NOT NULL, block_crcs BLOB NOT NULL
) WITHOUT ROWID
"""


class ChunkStoreFormatError(RuntimeError):
    """The metadata database on disk was written in another format than this code reads."""


class CommittedRow(NamedTuple):
    """A chunk's committed version as stored."""

    version: int
    chain_version: int
    slot: int
    length: int
    whole_crc: int | None
    checksum: int
    block_crcs: bytes


class ChunkMetaDb:
    """The `chunks` table of `path` (created if missing). Not thread-safe: the store serializes calls,
    except `checkpoint`, which may run alongside any other call but `close`.

    Args:
      durable: WAL + synchronous=NORMAL with fsyncs at `checkpoint()`; False never fsyncs.
    """

    def __init__(self, path: Path, durable: bool) -> None:
        self.path = path
        self._synchronous = 'NORMAL' if durable else 'OFF'
        self._checkpointer: sqlite3.Connection | None = None  # checkpoint's own connection, opened on first use
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self._synchronous}")
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found != FORMAT and (found or self._db.execute("SELECT 1 FROM sqlite_master").fetchone()):
            self._db.close()
            raise ChunkStoreFormatError(f"{path} has metadata format {found}; this code reads format {FORMAT} "
                                        f"only: move that target away (its replicas resync it)")
        self._db.execute(f"PRAGMA user_version = {FORMAT}")  # first: a kill in between is harmless
        self._db.execute(_SCHEMA)

    def load(self) -> list[tuple[bytes, CommittedRow]]:
        """Every row: (chunk id bytes, its committed version)."""
        return [(row[0], CommittedRow(*row[1:])) for row in self._db.execute("SELECT * FROM chunks")]

    def ids_in(self, begin: bytes, end: bytes) -> list[bytes]:
        """The chunk ids in [begin, end), in order (a range query on the primary key)."""
        return [row[0] for row in self._db.execute("SELECT id FROM chunks WHERE id >= ? AND id < ? ORDER BY id",
                                                   (begin, end))]

    def put(self, chunk_id: bytes, row: CommittedRow) -> None:
        """Writes one chunk's row (one statement: its own transaction)."""
        self._db.execute("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?,?,?,?)", (chunk_id, *row))

    def delete(self, chunk_ids: Iterable[bytes]) -> None:
        """Deletes rows, all in one transaction."""
        ids = [(c,) for c in chunk_ids]
        if len(ids) == 1:
            self._db.execute("DELETE FROM chunks WHERE id = ?", ids[0])
        elif ids:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM chunks WHERE id = ?", ids)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def checkpoint(self) -> None:
        """Makes every statement so far durable (fsyncs the WAL, copies it into the database), on a
        connection of its own: statements of other threads go on meanwhile."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._checkpointer.execute(f"PRAGMA synchronous={self._synchronous}")
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()
