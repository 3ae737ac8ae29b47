"""A file's chunks on a storage node: removing them along the chain, and the last one (file lengths).

Both are one chunk-id range query per target (a file's chunks are one key range, ``chunk_id.py``), so
neither reads another file's rows. `remove_chunks` deletes a file's chunks from one target of a chain and
forwards the removal down the write path (a successor that does not answer is reported, as a write
does, and the removal goes to the next one; an offline target is cleaned by its resync). `last_chunk`
answers, for one chain, the last chunk of a file that holds committed bytes, from which the client or the
meta service computes a file's exact length (``ChunkIO.file_length``). `FileChunks` serves these for
one ``StorageService`` (service.py), which provides the routing, stores, locks and peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from storage.threefs.errors import NodeUnavailable, TargetNotServing
from storage.threefs.storage.chunk_id import ChunkId, as_chunk_id
from storage.threefs.storage.reads import _READABLE


class FileChunks:
    """Removal and last-chunk queries for the targets of `service`.

    Args:
      service: the node's StorageService.
      retry_timeout: seconds a removal keeps forwarding while routing settles after a failure.
      on_successor_failure: called with a successor target that did not answer (None: the removal fails).
    """

    def __init__(self, service: Any, retry_timeout: float, on_successor_failure: Callable[[int], Any] | None) -> None:
        self._service = service
        self._retry_timeout = retry_timeout
        self._on_successor_failure = on_successor_failure

    def remove_chunk(self, target_id: int, chunk_id: ChunkId) -> bool:
        """Deletes one chunk from a local target (resync removes chunks the predecessor lacks)."""
        chunk_id = as_chunk_id(chunk_id)
        store = self._service.store(target_id)
        with self._service.chunk_lock(target_id, chunk_id):
            return store.remove(chunk_id)

    def remove_chunks(self, chain_id: int, inode_id: int, target_id: int | None = None) -> int:
        """Deletes file `inode_id`'s chunks from this node's target of the chain (or `target_id`) and
        forwards the removal down the write path; returns how many chunks this target held."""
        routing = self._service.routing_info()
        target = routing.local_target(chain_id, self._service.node_id) if target_id is None else target_id
        if target is None:
            raise TargetNotServing(f"node {self._service.node_id} holds no target of chain {chain_id}")
        store = self._service.store(target)
        removed = 0
        for meta in store.inode_chunks(inode_id):  # a chunk-id range query: that inode's rows only
            with self._service.chunk_lock(target, meta.chunk_id):
                removed += store.remove(meta.chunk_id)
        deadline = time.monotonic() + self._retry_timeout
        while True:
            routing = self._service.routing_info()
            if target not in routing.write_path(chain_id):
                return removed  # an offline target is cleaned by its resync
            successor = routing.successor(chain_id, target)
            if successor is None:
                return removed
            try:
                self._service.bulk_service_of(routing, successor).remove_chunks(chain_id, inode_id, successor)
                return removed
            except NodeUnavailable:
                if self._on_successor_failure is None or time.monotonic() > deadline:
                    raise
                self._on_successor_failure(successor)

    def last_chunk(self, chain_id: int, target_id: int, inode_id: int) -> tuple[int, int] | None:
        """(chunk index, committed length) of file `inode_id`'s last chunk on a serving local target of
        the chain that holds committed bytes (an emptied chunk counts for nothing), or None: what the
        file's exact length is computed from (``ChunkIO.file_length``). One chunk-id range query."""
        routing = self._service.routing_info()
        if target_id not in routing.chain(chain_id).targets:
            raise TargetNotServing(f"target {target_id} is not in chain {chain_id}")
        store = self._service.require_state(routing, target_id, _READABLE, "report chunk lengths")
        for meta in reversed(store.inode_chunks(inode_id)):
            if meta.length > 0:
                return meta.chunk_id.chunk_index, meta.length
        return None
