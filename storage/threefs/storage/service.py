"""The storage service: CRAQ writes and reads for the targets of one storage node.

Writes (3FS's version of CRAQ). A client sends a write to the chain's head. Each target on the write
path takes its per-chunk lock (so writes to one chunk are serialized at the head), checks the request's
chain version, applies the update as the chunk's pending version and forwards it to its successor; the
tail commits first and the acknowledgements flow back, each target committing its pending version as the
ack passes. A syncing successor gets the whole new chunk (a full-chunk replace) since it may have missed
earlier versions. When a successor does not answer, the target reports it (`on_successor_failure`, wired
to mgmtd, which moves it to the chain's end) and forwards to the new successor, or commits as the new
tail.

Checksums are CRC32C. The client computes the CRC32C of the bytes it writes once; the head checks it on
arrival and every replica checks the payload it receives (`check_payload`: ChecksumError, which the
client retries), so damage on the way is caught before anything is applied. Every forwarded update also
carries the new version's checksum (`block_checksums.version_checksum`), so no two replicas ever commit
the same version number with different bytes. A successor that already committed that version answers
success only for the same checksum (a re-forward); otherwise, or when it committed a later one, it takes
nothing and raises ChunkDiverged: the head's copy is stale (a write whose outcome it lost track of), so
the head replaces it with the tail's (full-chunk replace) and applies the client's write again on top, as
the next version. A successor that missed a version, or builds other bytes, gets the whole chunk instead.
A forward that fails with an unknown outcome (a lost reply) keeps its pending version unless the tail
says what became of it; the next write or heartbeat settles it (`settle_pending` in reads.py).

File lengths come from storage: `last_chunk` answers, for one chain, the last chunk of a file that holds
committed bytes (a chunk-id range query), from which the meta service computes a file's exact length;
it and the removal of a file's chunks along the chain are `FileChunks` in `file_chunks.py`.

Durability: a replica acknowledges a write once it is in its page cache (a SIGKILL loses nothing); its
chunk store makes it durable by group commit (``group_commit.py``) within a fraction of a second, and at
once when asked: `sync` is what a client's fsync/close calls on every node of the file's write paths.

Reads (CRAQ's apportioned queries, with the tail version query and checksum repair) are `CraqReads`
in `reads.py`; `StorageService` serves them (`read`, `committed_state`, `read_chunk`, ...).

`tick(manager)` is the heartbeat: report local states, take the routing, and resync every syncing target
whose predecessor lives here (``NodeMembership`` in `membership.py`; the transfers are `resync.py`). Every method takes and returns plain values the wire
codec carries (net/wire_types.py), so a peer may be this object or an RPC proxy of it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from storage.threefs.storage.chunk_id import ChunkId, ChunkMeta, as_chunk_id
from storage.threefs.storage.chunk_store import ChunkStore
from storage.threefs.errors import (ChainVersionMismatch, ChecksumError, ChunkDiverged, NodeUnavailable,
                                    TargetNotServing)
from storage.threefs.storage.resync import ResyncReport
from storage.threefs.mgmtd.routing import LocalState, RoutingInfo, TargetState
from storage.threefs.storage.reads import _READABLE, _WHOLE, CraqReads
from storage.threefs.storage.chunk_locks import ChunkLocks
from storage.threefs.storage.file_chunks import FileChunks
from storage.threefs.storage.membership import NodeMembership
from storage.threefs.storage.crc32c import crc32c

_REWRITES = 3  # times a write adopts the tail's copy and applies again when the successors are past it


def check_payload(data: bytes, data_crc: int | None, what: str) -> int:
    """The CRC32C of `data`, which must equal `data_crc` when given. Raises ChecksumError (retryable:
    the sender sends again) when the bytes were damaged on the way."""
    actual = crc32c(data)
    if data_crc is not None and actual != data_crc:
        raise ChecksumError(f"{what}: the payload of {len(data)} bytes has crc32c {actual:#010x}, "
                            f"the sender computed {data_crc:#010x} (damaged on the way)")
    return actual


class StorageService:
    """CRAQ for the targets of storage node `node_id`.

    Args:
      node_id: this node's id in the chain table.
      targets: target id -> its ChunkStore, for the targets placed on this node.
      routing: returns the latest RoutingInfo (mgmtd's, or this node's cached copy).
      peer: node id -> the StorageService (or RPC proxy) of that node; raises NodeUnavailable when dead.
      on_successor_failure: called with a successor target that did not answer (the cluster wires
        Manager.mark_offline); None makes such a write fail instead.
      retry_timeout: seconds a write keeps re-forwarding while routing settles after a failure.
      bulk_peer: like `peer`, for maintenance calls that may take long (resync transfers, chunk removal);
        `peer` then serves the data path with a deadline shorter than the heartbeat timeout, so a hung
        successor is reported and routed around (``cluster/deadlines.py``). Default `peer`.
    """

    in_process = True  # a client may hand `read_into` its own buffer (ChunkIO does, for services in its process)

    def __init__(self, node_id: int, targets: dict[int, ChunkStore], routing: Callable[[], RoutingInfo],
                 peer: Callable[[int], Any], on_successor_failure: Callable[[int], Any] | None = None,
                 retry_timeout: float = 10.0, bulk_peer: Callable[[int], Any] | None = None) -> None:
        self.node_id = node_id
        self._targets = dict(targets)
        self._routing_source = routing
        self._peer = peer
        self._bulk_peer = bulk_peer or peer
        self._on_successor_failure = on_successor_failure
        self._retry_timeout = retry_timeout
        self._locks = ChunkLocks()
        self._reads = CraqReads(self)
        self._membership = NodeMembership(self, self._reads, list(self._targets))
        self._file_chunks = FileChunks(self, retry_timeout, on_successor_failure)

    def close_stores(self) -> None:
        """Closes this node's chunk stores (the service is unusable afterwards)."""
        for store in self._targets.values():
            store.close()

    def __repr__(self) -> str:
        return f"StorageService(node_id={self.node_id}, targets={sorted(self._targets)})"

    # ----------------------------------------------------------------------------- local plumbing

    def routing_info(self) -> RoutingInfo:
        """The latest routing; notes any of this node's targets that left the chain (they must resync)."""
        routing = self._routing_source()
        self._membership.observe(routing)
        return routing

    def store(self, target_id: int) -> ChunkStore:
        """The ChunkStore of a target on this node."""
        try:
            return self._targets[target_id]
        except KeyError:
            raise TargetNotServing(f"target {target_id} is not on storage node {self.node_id} "
                                   f"(it holds {sorted(self._targets)})") from None

    def chunk_lock(self, target_id: int, chunk_id: ChunkId) -> contextlib.AbstractContextManager[None]:
        """The per-chunk lock of a local target (writes, resync transfers and repairs hold it)."""
        return self._locks.hold(target_id, as_chunk_id(chunk_id))

    def service_of(self, routing: RoutingInfo, target_id: int) -> Any:
        """The StorageService (self, or a peer) that holds `target_id`."""
        node = routing.target_node[target_id]
        return self if node == self.node_id else self._peer(node)

    def bulk_service_of(self, routing: RoutingInfo, target_id: int) -> Any:
        """Like `service_of`, for maintenance calls (resync, chunk removal): a peer with a long deadline."""
        node = routing.target_node[target_id]
        return self if node == self.node_id else self._bulk_peer(node)

    def require_state(self, routing: RoutingInfo, target_id: int, allowed: tuple[TargetState, ...],
                       what: str) -> ChunkStore:
        store = self.store(target_id)
        state = routing.target_states.get(target_id)
        if state not in allowed:
            raise TargetNotServing(f"target {target_id} on node {self.node_id} is "
                                   f"{state.value if state else 'unknown'}; it cannot {what}")
        return store

    # ----------------------------------------------------------------------------- reads (reads.py)

    def read(self, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int, length: int) -> bytes:
        """Committed bytes [offset, offset + length) of a chunk from a serving target (``CraqReads.read``)."""
        return self._reads.read(chain_id, target_id, chunk_id, offset, length)

    def read_into(self, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int, buffer) -> int:
        """``read`` of [offset, offset + len(buffer)) into `buffer` (a writable bytes-like, in this
        process): the count of bytes written, short past the end of the chunk (``CraqReads.read_into``)."""
        return self._reads.read_into(chain_id, target_id, chunk_id, offset, buffer)

    def read_many(self, reads: list[tuple[int, int, ChunkId, int, int]]) -> list[bytes | Exception]:
        """Several ``read`` requests in one call (one RPC for several chunks of this node), each
        ``(chain_id, target_id, chunk_id, offset, length)``. Returns, in order, each read's bytes or the
        exception it raised (one failing read does not fail the others)."""
        results: list[bytes | Exception] = []
        for chain_id, target_id, chunk_id, offset, length in reads:
            try:
                results.append(self._reads.read(chain_id, target_id, chunk_id, offset, length))
            except Exception as exc:  # noqa: BLE001 - travels back as this read's result
                results.append(exc)
        return results

    def committed_version(self, target_id: int, chunk_id: ChunkId) -> int:
        """The committed version of a chunk on a local target (0 when it holds none)."""
        return self._reads.committed_version(target_id, chunk_id)

    def committed_state(self, target_id: int, chunk_id: ChunkId) -> tuple[int, int]:
        """(committed version, its version checksum) of a chunk on a local target ((0, 0): none)."""
        return self._reads.committed_state(target_id, chunk_id)

    def read_chunk(self, target_id: int, chunk_id: ChunkId) -> tuple[bytes, int, int]:
        """(content, committed version, chain version) of a whole chunk on a serving local target."""
        return self._reads.read_chunk(target_id, chunk_id)

    def repair_locked(self, routing: RoutingInfo, chain_id: int, target_id: int, chunk_id: ChunkId) -> None:
        """With the chunk lock held: replaces a damaged local committed copy with an intact replica's."""
        self._reads.repair_locked(routing, chain_id, target_id, chunk_id)

    def dump_chunkmeta(self, target_id: int) -> list[ChunkMeta]:
        """Metadata of every chunk on a local target (what a predecessor diffs against in a resync)."""
        return self._reads.dump_chunkmeta(target_id)

    # ----------------------------------------------------------------------------- writes

    def write(self, chain_id: int, chain_version: int, chunk_id: ChunkId, offset: int, data: bytes,
              full_replace: bool = False, data_crc: int | None = None) -> int:
        """A client write at the chain's head; returns the version committed along the chain. `data_crc`:
        the CRC32C the client computed of `data`, checked here on arrival (ChecksumError: the payload was
        damaged on the way; the client retries) and carried along the chain (computed here when None)."""
        chunk_id = as_chunk_id(chunk_id)
        data_crc = check_payload(data, data_crc, f"a write of chunk {chunk_id} arriving at node {self.node_id}")
        routing = self.routing_info()
        chain = routing.chain(chain_id)
        if chain_version != chain.version:
            raise ChainVersionMismatch(f"chain {chain_id} is at version {chain.version}, the write carries "
                                       f"{chain_version}: refresh routing and retry")
        path = routing.write_path(chain_id)
        if not path or routing.target_node[path[0]] != self.node_id:
            raise TargetNotServing(f"node {self.node_id} does not hold the head of chain {chain_id} "
                                   f"(write path {path})")
        head = path[0]
        store = self.store(head)
        with self._locks.hold(head, chunk_id):
            self._reads.settle_pending(routing, chain_id, head, chunk_id)  # under the lock, a pending version is left over
            for _ in range(_REWRITES + 1):
                version = self._apply(routing, chain_id, head, chunk_id,
                                      lambda: store.apply_write(chunk_id, offset, data, chain.version, full_replace,
                                                                data_crc=data_crc))
                try:
                    self._forward_and_commit(chain_id, head, chunk_id, offset, data, full_replace, version,
                                             store.pending_state(chunk_id)[1], data_crc)
                    return version
                except ChunkDiverged as exc:  # the successors are past this copy: build on the tail's instead
                    diverged = exc
                    self._reads.adopt_tail_copy(self.routing_info(), chain_id, head, chunk_id)
            raise diverged

    def update(self, chain_id: int, chain_version: int, target_id: int, chunk_id: ChunkId, offset: int,
               data: bytes, full_replace: bool, version: int, checksum: int | None = None,
               data_crc: int | None = None) -> int:
        """A write forwarded by `target_id`'s predecessor, carrying the head's `version`, that version's
        checksum (`checksum`; None skips the content checks) and the CRC32C of `data` (`data_crc`,
        checked on arrival: ChecksumError when the payload was damaged on the way); returns the version
        once committed here (after everything downstream committed). Raises ChunkDiverged, taking
        nothing, when the update does not fit this copy (see the module docstring)."""
        chunk_id = as_chunk_id(chunk_id)
        data_crc = check_payload(data, data_crc, f"an update of chunk {chunk_id} arriving at target {target_id}")
        routing = self.routing_info()
        chain = routing.chain(chain_id)
        if chain_version != chain.version:
            raise ChainVersionMismatch(f"chain {chain_id} is at version {chain.version} on node {self.node_id}, "
                                       f"the forwarded write carries {chain_version}")
        if target_id not in routing.write_path(chain_id):
            raise TargetNotServing(f"target {target_id} is not on the write path of chain {chain_id}")
        store = self.store(target_id)
        with self._locks.hold(target_id, chunk_id):
            if routing.target_states[target_id] is TargetState.SYNCING:
                if not full_replace:
                    raise TargetNotServing(f"target {target_id} is syncing and takes full-chunk replaces only")
                store.replace(chunk_id, data, version, chain.version)  # recovery: committed at once
                self._forward_and_commit(chain_id, target_id, chunk_id, 0, data, True, version, checksum, data_crc)
                return version
            meta = store.meta(chunk_id)
            committed = meta.committed_version if meta else 0
            if meta is not None and committed >= version:
                if committed == version and checksum in (None, meta.checksum):
                    return version  # a re-forward of this very write, committed here already
                raise ChunkDiverged(f"target {target_id} has committed version {committed} of chunk {chunk_id}"
                                    f"{' with other content' if committed == version else ''}: the forwarded "
                                    f"version {version} builds on a stale copy", committed)
            store.abort_pending(chunk_id)  # a leftover: the predecessor's pending version supersedes it
            if not full_replace and committed != version - 1:
                raise ChunkDiverged(f"target {target_id} holds version {committed} of chunk {chunk_id}, not the "
                                    f"base of the forwarded version {version}: send the whole chunk", committed)
            self._apply(routing, chain_id, target_id, chunk_id, lambda: store.apply_write(
                chunk_id, offset, data, chain.version, full_replace, version=version, data_crc=data_crc))
            if checksum is not None and store.pending_state(chunk_id) != (version, checksum):
                store.abort_pending(chunk_id)
                raise ChunkDiverged(f"version {version} of chunk {chunk_id} built on target {target_id} differs "
                                    f"from its predecessor's (their versions {committed} differ): send the "
                                    f"whole chunk", committed)
            self._forward_and_commit(chain_id, target_id, chunk_id, offset, data, full_replace, version, checksum,
                                     data_crc)
            return version

    def _apply(self, routing: RoutingInfo, chain_id: int, target_id: int, chunk_id: ChunkId,
               apply: Callable[[], int]) -> int:
        """Runs an apply_write; if the committed base it builds on is damaged, repairs it and retries."""
        try:
            return apply()
        except ChecksumError:
            self._reads.repair_locked(routing, chain_id, target_id, chunk_id)
            return apply()

    def _forward_and_commit(self, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int, data: bytes,
                            full_replace: bool, version: int, checksum: int, data_crc: int) -> None:
        """Forwards the pending `version` (version checksum `checksum`, payload CRC32C `data_crc`) to the successor until one acks
        (or this target is the tail), then commits it here. A pending version whose fate stays unknown
        after a failure is kept, and noted for the next heartbeat to settle."""
        store = self.store(target_id)
        try:
            chain_version = self._forward(chain_id, target_id, chunk_id, offset, data, full_replace, version,
                                          checksum, data_crc)
            store.commit(chunk_id, version, chain_version)
        except BaseException:
            if store.pending_state(chunk_id)[0] == version:
                self._membership.note_unsettled(chain_id, target_id, chunk_id)
            raise

    def _forward(self, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int, data: bytes,
                 full_replace: bool, version: int, checksum: int, data_crc: int) -> int:
        """The forwarding of `_forward_and_commit`; returns the chain version to commit under."""
        store = self.store(target_id)
        deadline = time.monotonic() + self._retry_timeout
        forwarded = whole = False
        try:
            while True:
                routing = self.routing_info()
                chain_version = routing.chain(chain_id).version
                path = routing.write_path(chain_id)
                if target_id not in path:
                    raise TargetNotServing(f"target {target_id} left the write path of chain {chain_id} during "
                                           f"a write of chunk {chunk_id}")
                successor = routing.successor(chain_id, target_id)
                if successor is None:
                    return chain_version  # the tail: commit first
                full = full_replace or whole or routing.target_states[successor] is TargetState.SYNCING
                payload = store.read_version(chunk_id, version, 0, _WHOLE) if full and not full_replace else data
                if payload is None:
                    raise TargetNotServing(f"version {version} of chunk {chunk_id} vanished from target {target_id}")
                forwarded = True
                try:
                    self.service_of(routing, successor).update(chain_id, chain_version, successor, chunk_id,
                                                               0 if full else offset, payload, full, version,
                                                               checksum, data_crc if payload is data else None)
                    return chain_version
                except ChunkDiverged as exc:
                    if full or exc.committed_version >= version:
                        raise
                    whole = True  # the successor missed a version or holds other bytes: send the whole chunk
                except NodeUnavailable:
                    if self._on_successor_failure is None or time.monotonic() > deadline:
                        raise
                    self._on_successor_failure(successor)
                except (ChainVersionMismatch, TargetNotServing):
                    if time.monotonic() > deadline:  # the successor's routing is behind or ahead of ours
                        raise
                    time.sleep(0.01)
        except ChunkDiverged:
            store.abort_pending(chunk_id)  # nothing downstream took this version
            raise
        except Exception as exc:
            routing = self._reads.settle_failed_forward(chain_id, target_id, chunk_id, version, checksum, forwarded, exc)
            if routing is None:
                raise
            return routing.chain(chain_id).version

    def full_chunk_replace(self, target_id: int, chunk_id: ChunkId, content: bytes, version: int,
                           chain_version: int) -> None:
        """Installs a whole chunk as committed `version` (resync's transfer)."""
        chunk_id = as_chunk_id(chunk_id)
        store = self.require_state(self.routing_info(), target_id,
                                    (TargetState.SYNCING, *_READABLE), "take a full-chunk replace")
        with self._locks.hold(target_id, chunk_id):
            store.replace(chunk_id, content, version, chain_version)

    # ----------------------------------------------------------------------------- a file's chunks (file_chunks.py)

    def remove_chunk(self, target_id: int, chunk_id: ChunkId) -> bool:
        """Deletes one chunk from a local target (resync removes chunks the predecessor lacks)."""
        return self._file_chunks.remove_chunk(target_id, chunk_id)

    def remove_chunks(self, chain_id: int, inode_id: int, target_id: int | None = None) -> int:
        """Deletes file `inode_id`'s chunks from this node's target of the chain (or `target_id`) and
        forwards the removal down the write path; returns how many chunks this target held."""
        return self._file_chunks.remove_chunks(chain_id, inode_id, target_id)

    def last_chunk(self, chain_id: int, target_id: int, inode_id: int) -> tuple[int, int] | None:
        """(chunk index, committed length) of file `inode_id`'s last chunk with committed bytes on a
        serving local target of the chain, or None (``FileChunks.last_chunk``)."""
        return self._file_chunks.last_chunk(chain_id, target_id, inode_id)

    # ----------------------------------------------------------------------------- durability

    def sync(self, target_ids: list[int] | None = None) -> int:
        """Makes durable what the local targets `target_ids` (default: all of this node's) wrote and
        committed so far (``ChunkStore.sync``: fsyncs what was written since their last sync, nothing
        when clean); returns how many slot files it fsynced. A client's fsync/close calls this on every
        node of its file's write paths. TargetNotServing for a target not on this node; OSError when an
        fsync fails (what it did not make durable stays to sync)."""
        targets = sorted(self._targets) if target_ids is None else list(target_ids)
        return sum(store.sync() for store in [self.store(t) for t in targets])

    def unsynced(self, target_id: int) -> tuple[list[str], bool]:
        """(names of the slot files written since the last sync, whether the metadata changed since) of a
        local target: what a power loss could still lose there."""
        store = self.store(target_id)
        return store.unsynced_files(), store.metadata_unsynced()

    # ----------------------------------------------------------------------------- membership (membership.py)

    def local_states(self) -> dict[int, LocalState]:
        """Each local target's local state: online while it has to resync, else up-to-date."""
        return self._membership.local_states()

    def tick(self, manager: Any) -> list[ResyncReport]:
        """One heartbeat (``NodeMembership.tick``): routing in, local states out, leftovers settled, syncing
        successors of local targets resynced. Returns the resync reports."""
        return self._membership.tick(manager)
