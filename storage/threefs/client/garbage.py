"""Garbage collection: deleting the chunks of files that left the namespace, off the client's path.

A removed file (no link and no open write session left) is listed by the meta service
(``MetaService.garbage``) until someone deletes its chunks and releases it (``release_garbage``). That
someone is a background collector, as in 3FS: the meta server process runs ``collect_garbage`` on a
timer thread, ``EmbeddedCluster`` in its heartbeat round; ``Client.remove`` / ``rename`` only change the
namespace and return. For each file, every chain of its layout deletes that inode's chunks along its
write path (``StorageService.remove_chunks``: one chunk-id range query per target, so other files'
chunks are never scanned). A target that was offline then is cleaned up by its resync.

Contract: best effort and idempotent. A file whose chunks could not all be deleted (a chain without a
writable target answering, a collector that died half-way) stays listed for the next round; deleting
twice is harmless. A round stops at the first such failure, so a dead chain delays a round by at most
`timeout` seconds, not that times the number of files.
"""

from __future__ import annotations

import logging
from typing import Any

from storage.threefs.client.chunk_io import ChunkIO

GC_RETRY_SECONDS = 2.0  # how long one file's deletion retries on a chain before the round gives up


def collect_garbage(meta: Any, chunk_io: ChunkIO, limit: int = 1024, timeout: float = GC_RETRY_SECONDS) -> int:
    """Deletes the chunks of up to `limit` removed files and releases them; returns how many were
    collected (see the module docstring)."""
    collected = []
    try:
        for inode in meta.garbage(limit):
            if inode.layout is not None:
                chunk_io.remove_file(inode.layout, inode.inode_id, timeout=timeout)
            collected.append(inode.inode_id)
    except (TimeoutError, OSError) as error:
        logging.getLogger(__name__).warning("3FS garbage collection: round stopped, the rest is kept for "
                                            "later: %s", error)
    if collected:
        meta.release_garbage(collected)
    return len(collected)
