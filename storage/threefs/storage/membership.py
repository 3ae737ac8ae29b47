"""A storage node's side of membership: its targets' local states, the heartbeat, and what it settles then.

3FS's returning service: a target that routing shows offline, waiting or syncing must resync before it
reports up-to-date again; serving again clears that (`observe`, run on every routing a node takes). The
heartbeat (`tick`) takes the routing, sends the local states to mgmtd, settles the pending versions that
failed writes left behind (kept when the tail did not answer: `note_unsettled`), and resyncs every
syncing target whose predecessor lives on this node (``resync.py``). `NodeMembership` holds this state
for one ``StorageService`` (service.py), which provides the node id, locks and the read path.
"""

from __future__ import annotations

import threading
from typing import Any

from storage.threefs.errors import ChainVersionMismatch, NodeUnavailable, TargetNotServing
from storage.threefs.mgmtd.routing import LocalState, RoutingInfo, TargetState
from storage.threefs.storage.chunk_id import ChunkId
from storage.threefs.storage.resync import ResyncReport, resync_target


class NodeMembership:
    """Local states and heartbeat of `service`'s targets `target_ids`; `reads` is its ``CraqReads``
    (which settles leftover pending versions). Thread-safe."""

    def __init__(self, service: Any, reads: Any, target_ids: list[int]) -> None:
        self._service = service
        self._reads = reads
        self._targets = list(target_ids)
        self._recovering = {t: False for t in self._targets}  # saw itself out of the chain: needs a resync
        self._unsettled: set[tuple[int, int, ChunkId]] = set()  # (chain, target, chunk) left pending by a failure
        self._state_lock = threading.Lock()
        self._observed: RoutingInfo | None = None  # the routing `observe` saw last (seeing it again changes nothing)

    def local_states(self) -> dict[int, LocalState]:
        """Each local target's local state: online while it has to resync, else up-to-date."""
        with self._state_lock:
            return {t: LocalState.ONLINE if r else LocalState.UPTODATE for t, r in self._recovering.items()}

    def note_unsettled(self, chain_id: int, target_id: int, chunk_id: ChunkId) -> None:
        """A failed write left a pending version of the chunk on the target: the next heartbeat settles it."""
        with self._state_lock:
            self._unsettled.add((chain_id, target_id, chunk_id))

    def tick(self, manager: Any) -> list[ResyncReport]:
        """One heartbeat: take the routing (noting targets that left their chains), send local states,
        then resync every syncing target whose predecessor is on this node. Returns the resync reports."""
        service = self._service
        self.observe(manager.routing())
        routing = manager.heartbeat(service.node_id, self.local_states())
        self.observe(routing)
        self._settle_leftovers(routing)
        reports = []
        for chain_id in routing.chain_table.chain_ids:
            path = routing.write_path(chain_id)
            for previous, target in zip(path, path[1:]):
                if (routing.target_states[target] is TargetState.SYNCING
                        and routing.target_node[previous] == service.node_id):
                    try:
                        reports.append(resync_target(service, chain_id, target, manager))
                    except (NodeUnavailable, TargetNotServing, ChainVersionMismatch) as exc:
                        reports.append(ResyncReport(chain_id, target, 0, 0, 0, f"{type(exc).__name__}: {exc}"))
        return reports

    def _settle_leftovers(self, routing: RoutingInfo) -> None:
        """Settles the pending versions that failed writes left behind (kept when the tail does not answer)."""
        with self._state_lock:
            leftovers, self._unsettled = self._unsettled, set()
        for chain_id, target_id, chunk_id in leftovers:
            try:
                with self._service.chunk_lock(target_id, chunk_id):
                    self._reads.settle_pending(routing, chain_id, target_id, chunk_id)
            except Exception:  # noqa: BLE001 - the next heartbeat tries again
                self.note_unsettled(chain_id, target_id, chunk_id)

    def observe(self, routing: RoutingInfo) -> None:
        """A target that routing shows offline, waiting or syncing must resync before it reports
        up-to-date again (3FS's returning service); serving again clears that. Observing the routing
        observed last again is a no-op (routing snapshots are immutable), skipped without the lock."""
        if routing is self._observed:
            return
        with self._state_lock:
            for target in self._targets:
                state = routing.target_states.get(target)
                if state in (TargetState.OFFLINE, TargetState.WAITING, TargetState.SYNCING):
                    self._recovering[target] = True
                elif state is TargetState.SERVING:
                    self._recovering[target] = False
            self._observed = routing
