"""Data recovery: a predecessor brings its syncing successor up to date (3FS's resync).

When a target comes back it becomes syncing: it already takes every new write, as a full-chunk replace,
while its predecessor in the chain copies what it missed:

1. dump-chunkmeta: the predecessor asks the syncing target for the metadata of all its chunks (id, chain
   version, committed and pending version numbers);
2. diff (`chunk_action`) with its own chunk metadata, chunk by chunk;
3. each chunk to transfer goes over as a full-chunk replace, taken under the predecessor's chunk lock so
   no write to that chunk interleaves (lock, read chain version + committed version + content, send,
   unlock); each chunk only the syncing target holds is removed;
4. sync-done: mgmtd makes the target serving again.

The diff follows 3FS's rules. A chunk only the predecessor holds is transferred; one only the syncing
target holds is removed; a replica written under an older chain version is transferred; equal chain
versions with different committed versions are transferred. 3FS also skips a replica whose pending version
equals the predecessor's committed one ("being updated by an in-progress write"). Here the comparison runs
under the predecessor's chunk lock, where no write to the chunk is in flight, so a remote pending version
is a leftover and the chunk is transferred.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from storage.threefs.storage.chunk_store import ChunkId, ChunkMeta, as_chunk_id
from storage.threefs.errors import TargetNotServing
from storage.threefs.mgmtd.routing import TargetState

TRANSFER, REMOVE, SKIP = "transfer", "remove", "skip"
_WHOLE = 1 << 62


class ResyncReport(NamedTuple):
    """What one resync of `target_id` (in chain `chain_id`) did; `error` says why it stopped, if it did."""

    chain_id: int
    target_id: int
    transferred: int
    removed: int
    skipped: int
    error: str | None = None


def chunk_action(local: ChunkMeta | None, remote: ChunkMeta | None) -> str:
    """TRANSFER, REMOVE or SKIP for one chunk: `local` is the predecessor's metadata, `remote` the
    syncing target's (None where that side does not hold the chunk)."""
    local_has = local is not None and local.committed_version > 0
    remote_has = remote is not None and (remote.committed_version > 0 or remote.pending_version > 0)
    if not local_has:
        return REMOVE if remote_has else SKIP
    assert local is not None
    if remote is None or not remote_has:
        return TRANSFER
    if local.chain_version != remote.chain_version:  # 3FS: local newer; an older local is odd, trust it too
        return TRANSFER
    if local.committed_version != remote.committed_version or remote.pending_version:
        return TRANSFER
    return SKIP


def resync_target(service: Any, chain_id: int, syncing_target: int, manager: Any) -> ResyncReport:
    """Run by the storage service that holds `syncing_target`'s predecessor in chain `chain_id`: copies
    the chunks the syncing target misses, removes the ones it should not hold, then reports sync-done
    to `manager`. Returns the counts."""
    routing = service.routing_info()
    path = routing.write_path(chain_id)
    if routing.target_states.get(syncing_target) is not TargetState.SYNCING or syncing_target not in path:
        raise TargetNotServing(f"target {syncing_target} of chain {chain_id} is not syncing")
    index = path.index(syncing_target)
    if index == 0:
        raise TargetNotServing(f"syncing target {syncing_target} has no predecessor in chain {chain_id}")
    predecessor = path[index - 1]
    if routing.target_node[predecessor] != service.node_id:
        raise ValueError(f"the predecessor {predecessor} of syncing target {syncing_target} is on node "
                         f"{routing.target_node[predecessor]}, not on node {service.node_id}")
    store = service.store(predecessor)
    remote_service = service.bulk_service_of(routing, syncing_target)  # a long deadline: a target's worth

    # Step 1: dump-chunkmeta
    remote = {as_chunk_id(m.chunk_id): ChunkMeta(as_chunk_id(m.chunk_id), *m[1:])
              for m in remote_service.dump_chunkmeta(syncing_target)}

    # Steps 2-3: diff and transfer, chunk by chunk under the predecessor's chunk lock
    transferred = removed = skipped = 0
    chunk_ids = {m.chunk_id for m in store.list_meta()} | set(remote)
    for chunk_id in sorted(chunk_ids, key=ChunkId.to_bytes):
        with service.chunk_lock(predecessor, chunk_id):
            local = store.meta(chunk_id)
            action = chunk_action(local, remote.get(chunk_id))
            if action == TRANSFER:
                assert local is not None
                service.repair_locked(routing, chain_id, predecessor, chunk_id)  # never spread a damaged copy
                local = store.meta(chunk_id)
                content = store.read_version(chunk_id, local.committed_version, 0, _WHOLE)
                remote_service.full_chunk_replace(syncing_target, chunk_id, content, local.committed_version,
                                                  local.chain_version)
                transferred += 1
            elif action == REMOVE:
                remote_service.remove_chunk(syncing_target, chunk_id)
                removed += 1
            else:
                skipped += 1

    # Step 4: sync-done
    try:
        manager.sync_done(syncing_target)
    except ValueError as exc:  # it left the syncing state meanwhile (went offline again)
        return ResyncReport(chain_id, syncing_target, transferred, removed, skipped, str(exc))
    return ResyncReport(chain_id, syncing_target, transferred, removed, skipped)
