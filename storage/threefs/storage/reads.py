"""The storage service's read path: CRAQ reads, the tail version query and checksum repair.

CRAQ's apportioned queries: any serving target answers. A chunk with only a committed version is clean
and read locally. A dirty chunk (one with a pending version) costs a version query to the tail, which
answers its committed version and that version's checksum: if that is the pending version (same checksum),
the write is committed cluster-wide and the pending bytes are returned; if it is the local committed one,
those; if neither (this copy is behind or diverged), the tail serves the read. (3FS returns a status code
instead; the query is the CRAQ paper's design.) A read checks the checksums of the 4 KiB blocks it reads;
a failure checks the whole local copy and, if it is damaged, fetches the chunk from another serving
replica and replaces it. When every other serving replica answers that its copy is damaged too, the read
(or the write building on the chunk) fails at once with ``NoIntactReplica`` (EIO, not retried); while a
replica does not answer or holds another version, the retryable ``ChecksumError`` stands instead.

Settling with the tail. A pending version nobody is writing any more is a leftover: a write whose
forward failed with an unknown outcome (a lost reply: the successors may have committed) or whose local
commit failed after the tail committed. It is kept (reads ask the tail, as above) until the next write to
the chunk, or the next heartbeat, settles it (`settle_pending`): committed here if the tail committed that
very version, else dropped; a copy the tail has moved past is replaced by the tail's (`adopt_tail_copy`).

`CraqReads` holds this path for one `StorageService` (service.py), which provides the routing, stores,
chunk locks and peers it uses and exposes its public methods to peers and clients; a peer may be a
StorageService or an RPC proxy of one.
"""

from __future__ import annotations

import errno
from typing import Any

from storage.threefs.storage.chunk_id import ChunkId, ChunkMeta, as_chunk_id
from storage.threefs.errors import ChecksumError, NodeUnavailable, NoIntactReplica, TargetNotServing
from storage.threefs.mgmtd.routing import RoutingInfo, TargetState

_READABLE = (TargetState.SERVING, TargetState.LASTSRV)
_WHOLE = 1 << 62  # a length that covers any chunk


class CraqReads:
    """Reads, version queries and repairs of one storage node; see the module docstring.

    Args:
      service: the node's StorageService (``routing_info``, ``store``, ``chunk_lock``, ``service_of``,
        ``require_state``).
    """

    def __init__(self, service: Any) -> None:
        self._service = service

    def read(self, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int, length: int) -> bytes:
        """Committed bytes [offset, offset + length) of a chunk from a serving target (short past the end,
        b"" for a hole). A dirty chunk asks the tail which version is committed."""
        chunk_id = as_chunk_id(chunk_id)
        return self._committed_read(
            chain_id, target_id, chunk_id, offset, length, b"",
            lambda store, version: store.read_version(chunk_id, version, offset, length),
            lambda routing, tail: self._read_at_tail(routing, chain_id, tail, chunk_id, offset, length))

    def read_into(self, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int, buffer) -> int:
        """`read` of [offset, offset + len(buffer)) written into `buffer` (a writable bytes-like, filled
        by the chunk store itself when the bytes are local); returns how many bytes were written (short
        past the end of the chunk, 0 for a hole). Bytes past that count are left as they were."""
        chunk_id = as_chunk_id(chunk_id)
        view = memoryview(buffer).cast("B")

        def at_tail(routing: RoutingInfo, tail: int) -> int:
            data = self._read_at_tail(routing, chain_id, tail, chunk_id, offset, len(view))
            view[:len(data)] = data
            return len(data)

        return self._committed_read(chain_id, target_id, chunk_id, offset, len(view), 0,
                                    lambda store, version: store.read_into(chunk_id, version, offset, view), at_tail)

    def _committed_read(self, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int, length: int,
                        hole: Any, local: Any, at_tail: Any) -> Any:
        """CRAQ's read (see the module docstring): `hole` for a chunk this target does not hold,
        `local(store, version)` for the committed version read here (None: that version is gone, look
        again), `at_tail(routing, tail)` when the tail must serve it."""
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got offset={offset}, length={length}")
        for _ in range(16):
            routing = self._service.routing_info()
            if target_id not in routing.chain(chain_id).targets:
                raise TargetNotServing(f"target {target_id} is not in chain {chain_id}")
            store = self._service.require_state(routing, target_id, _READABLE, "serve reads")
            meta = store.meta(chunk_id)
            if meta is None:
                return hole
            version = meta.committed_version
            if meta.pending_version:
                tail, state = self._tail_state(routing, chain_id, target_id, chunk_id)
                if state == store.pending_state(chunk_id):
                    version = meta.pending_version
                elif state != (meta.committed_version, meta.checksum):
                    return at_tail(routing, tail)
            if version == 0:
                return hole
            try:
                result = local(store, version)
            except ChecksumError:
                with self._service.chunk_lock(target_id, chunk_id):
                    self.repair_locked(routing, chain_id, target_id, chunk_id)
                continue
            if result is not None:
                return result
            # that version was committed over or aborted meanwhile: look again
        raise TargetNotServing(f"chunk {chunk_id} on target {target_id} kept changing during a read; retry")

    @staticmethod
    def _tail(routing: RoutingInfo, chain_id: int) -> int:
        readable = routing.readable_targets(chain_id)
        if not readable:
            raise TargetNotServing(f"chain {chain_id} has no serving target to answer for its chunks")
        return readable[-1]

    def _tail_state(self, routing: RoutingInfo, chain_id: int, target_id: int,
                    chunk_id: ChunkId) -> tuple[int, tuple[int, int]]:
        """CRAQ's version query: (the chain's tail, (its committed version of the chunk, that version's
        checksum)). A tail's own pending version is not committed yet."""
        tail = self._tail(routing, chain_id)
        if tail == target_id:
            return tail, self.committed_state(tail, chunk_id)
        try:
            return tail, tuple(self._service.service_of(routing, tail).committed_state(tail, chunk_id))
        except NodeUnavailable:
            raise TargetNotServing(f"the tail {tail} of chain {chain_id} did not answer the version query for "
                                   f"chunk {chunk_id} (dirty on target {target_id}); retry after routing "
                                   f"changes") from None

    def _read_at_tail(self, routing: RoutingInfo, chain_id: int, tail: int, chunk_id: ChunkId, offset: int,
                      length: int) -> bytes:
        try:
            return self._service.service_of(routing, tail).read(chain_id, tail, chunk_id, offset, length)
        except NodeUnavailable:
            raise TargetNotServing(f"the tail {tail} of chain {chain_id} did not answer a read of chunk "
                                   f"{chunk_id}; retry after routing changes") from None

    def settle_pending(self, routing: RoutingInfo, chain_id: int, target_id: int, chunk_id: ChunkId) -> None:
        """Local only, with the chunk lock held: settles a leftover pending version with the tail (see the
        module docstring). Raises TargetNotServing, keeping it, when the tail does not answer."""
        store = self._service.store(target_id)
        pending = store.pending_state(chunk_id)
        meta = store.meta(chunk_id)
        if not pending[0] or meta is None:
            return
        tail, state = self._tail_state(routing, chain_id, target_id, chunk_id)
        if tail != target_id and state == pending:
            store.commit(chunk_id, pending[0])  # the tail committed this very version: so is it here
            return
        store.abort_pending(chunk_id)  # not committed at the tail: that write failed
        if tail != target_id and state != (meta.committed_version, meta.checksum):
            self.adopt_tail_copy(routing, chain_id, target_id, chunk_id)

    def settle_failed_forward(self, chain_id: int, target_id: int, chunk_id: ChunkId, version: int,
                               checksum: int, forwarded: bool, error: Exception) -> RoutingInfo | None:
        """After forwarding pending `version` failed with `error`: the routing to commit it under if the tail
        committed it after all (its answer was lost), else None. The pending version is dropped when its
        fate is known (never forwarded; or the successor answered, so nothing is in flight, and the tail
        does not hold it) and kept otherwise (a lost answer: the forward may still land)."""
        store = self._service.store(target_id)
        if not forwarded:
            store.abort_pending(chunk_id)
            return None
        try:
            routing = self._service.routing_info()
            tail, state = self._tail_state(routing, chain_id, target_id, chunk_id)
        except Exception:  # noqa: BLE001 - the tail cannot tell now: settle_pending will ask again
            return None
        if tail != target_id and state == (version, checksum):
            return routing
        if not isinstance(error, (ConnectionError, TimeoutError)):
            store.abort_pending(chunk_id)
        return None

    def adopt_tail_copy(self, routing: RoutingInfo, chain_id: int, target_id: int, chunk_id: ChunkId) -> None:
        """Local only, with the chunk lock held and no pending version: replaces this target's committed
        copy of the chunk with the tail's (full-chunk replace), the tail being the chain's truth."""
        tail = self._tail(routing, chain_id)
        if tail == target_id:
            return
        try:
            content, version, chain_version = self._service.service_of(routing, tail).read_chunk(tail, chunk_id)
        except NodeUnavailable:
            raise TargetNotServing(f"the tail {tail} of chain {chain_id} did not hand over chunk {chunk_id}; "
                                   f"retry after routing changes") from None
        if version:
            self._service.store(target_id).replace(chunk_id, content, version, chain_version)
        else:
            self._service.store(target_id).remove(chunk_id)

    def repair_locked(self, routing: RoutingInfo, chain_id: int, target_id: int, chunk_id: ChunkId) -> None:
        """Local only, with the chunk lock held (`chunk_lock`): if the local committed copy fails its
        checksum, replaces it with an intact copy of the same version from another serving replica."""
        store = self._service.store(target_id)
        meta = store.meta(chunk_id)
        if meta is None or meta.committed_version == 0:
            return
        try:
            store.read_version(chunk_id, meta.committed_version, 0, _WHOLE)  # checks the whole copy
            return  # intact (repaired meanwhile, or only a pending version was damaged)
        except ChecksumError as exc:
            damage = exc
        undecided = False  # some replica did not say whether it holds the version intact
        for other in routing.readable_targets(chain_id):
            if other == target_id:
                continue
            try:
                content, version, chain_version = self._service.service_of(routing, other).read_chunk(other, chunk_id)
            except ChecksumError:
                continue
            except (NodeUnavailable, TargetNotServing):
                undecided = True
                continue
            if version == meta.committed_version:
                store.replace(chunk_id, content, version, chain_version)
                return
            undecided = True
        message = (f"chunk {chunk_id} version {meta.committed_version} is damaged on target {target_id} "
                   f"({store.directory}) and no other replica of chain {chain_id} holds it intact")
        if undecided:  # retryable: a replica that did not answer, or holds another version, may be intact
            raise ChecksumError(f"{message} (yet): {damage}") from damage
        raise NoIntactReplica(errno.EIO, f"{message}: {damage}") from damage

    def committed_version(self, target_id: int, chunk_id: ChunkId) -> int:
        """The committed version of a chunk on a local target (0 when it holds none)."""
        meta = self._service.store(target_id).meta(as_chunk_id(chunk_id))
        return meta.committed_version if meta else 0

    def committed_state(self, target_id: int, chunk_id: ChunkId) -> tuple[int, int]:
        """(committed version, its version checksum) of a chunk on a local target ((0, 0): none)."""
        meta = self._service.store(target_id).meta(as_chunk_id(chunk_id))
        return (meta.committed_version, meta.checksum) if meta else (0, 0)

    def read_chunk(self, target_id: int, chunk_id: ChunkId) -> tuple[bytes, int, int]:
        """(content, committed version, chain version) of a whole chunk on a serving target (b"", 0, 0
        when it holds none); the content passed its checksum."""
        chunk_id = as_chunk_id(chunk_id)
        store = self._service.require_state(self._service.routing_info(), target_id, _READABLE, "serve reads")
        for _ in range(16):
            meta = store.meta(chunk_id)
            if meta is None or meta.committed_version == 0:
                return b"", 0, 0
            content = store.read_version(chunk_id, meta.committed_version, 0, _WHOLE)
            if content is not None:
                return content, meta.committed_version, meta.chain_version
        raise TargetNotServing(f"chunk {chunk_id} on target {target_id} kept changing during a read; retry")

    def dump_chunkmeta(self, target_id: int) -> list[ChunkMeta]:
        """Metadata of every chunk on a local target (what a predecessor diffs against in a resync)."""
        return self._service.store(target_id).list_meta()
