"""storage: the storage service (3FS's storage nodes): chunk stores on disk and CRAQ over chains.

Roles: `chunk_id.py` (the 16-byte chunk id that sorts by inode), `crc32c.py` (CRC32C of any buffer),
`block_checksums.py` (a CRC32C per 4 KiB block, verified reads), `chunk_store.py` (`ChunkStore`: one target's
chunks in two slot files each, committed + pending versions, crash safe; with `chunk_state.py`,
`version_writer.py`, `chunk_meta_db.py`, `fd_cache.py`, and `group_commit.py`: fsync by group commit,
and on demand), `reads.py` (CRAQ reads, the tail version query, checksum repair), `service.py`
(`StorageService`: CRAQ writes head to tail, `sync` for a client's fsync/close; with `chunk_locks.py`,
`file_chunks.py`: a file's chunks removed along the chain and its last chunk, `membership.py`: local
states and the heartbeat), `resync.py` (a predecessor brings a returning target up to date),
`routing_lease.py` (the routing a server serves on, renewed by heartbeats; fenced after T/2 without).
Contract: a write is acknowledged only once every replica on the chain's write path committed it; a
read returns committed bytes only. One file's chunks are one chunk-id key range on a target (removal
and length queries never scan other files' chunks).
"""

from storage.threefs.storage.chunk_id import ChunkId, ChunkMeta
from storage.threefs.storage.chunk_store import ChunkStore
from storage.threefs.storage.service import StorageService

__all__ = ["ChunkId", "ChunkMeta", "ChunkStore", "StorageService"]
