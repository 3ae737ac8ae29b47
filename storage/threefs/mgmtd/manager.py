"""mgmtd, the cluster manager: chain table, target states, heartbeats and node addresses.

Storage services heartbeat to mgmtd with the local state of each of their targets (up-to-date, online,
offline); a node silent for longer than `heartbeat_timeout` has all its targets' local states set to
offline. After every such event mgmtd scans the chains and moves each target's public state with 3FS's
state-transition table (`next_public_state`, keyed by local state, current public state and the state of
the target before it in the chain). Each chain is then reordered serving (and lastsrv) first, syncing,
waiting, offline last, and any change bumps the chain's version and the chain table's version.

The cycle of a storage node that dies and comes back:
  serving --node silent--> offline (moved to the chain's end) or lastsrv (when it was the chain's last
  serving target: it keeps the newest data, and the chain can only come back through it)
  offline --heartbeat "online"--> waiting --its predecessor is serving--> syncing (takes writes as
  full-chunk replaces while its predecessor copies what it missed) --sync-done--> serving.

The chain table, public states, target placement and node addresses are persisted in the cluster's KV
store (`state.py`, one transaction per change) and loaded when a manager starts leading; local states
and heartbeat times live in memory only, as in 3FS: a new leader starts with every node just heard from.

Leadership (`election.py`): with an `election`, a manager is a standby until `campaign` wins the lease
in the KV store; a standby answers every call with NotPrimary naming the leader, and each state write
checks in its own transaction that the writer still holds the lease. Without one (an embedded cluster's
single manager) it always leads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from storage.threefs.errors import NotPrimary
from storage.threefs.kv.store import KVStore, Transaction
from storage.threefs.mgmtd.election import LeaderElection
from storage.threefs.mgmtd.routing import Chain, ChainTable, LocalState, RoutingInfo, TargetState
from storage.threefs.mgmtd.state import PersistentState, load_state, save_state

_CHAIN_ORDER = {TargetState.SERVING: 0, TargetState.LASTSRV: 0, TargetState.SYNCING: 1,
                TargetState.WAITING: 2, TargetState.OFFLINE: 3}


def next_public_state(local: LocalState, current: TargetState, predecessor: TargetState | None,
                      other_serving: bool) -> TargetState:
    """3FS's state-transition table: a target's next public state.

    Args:
      local: the target's local state (what its storage service reports, offline when silent).
      current: its public state now.
      predecessor: public state of the target before it in chain order (None for the first).
      other_serving: whether another target of the chain is serving; a serving target that goes
        offline becomes lastsrv when none is (3FS: "has no predecessor").
    """
    if local is LocalState.OFFLINE:
        if current is TargetState.SERVING:
            return TargetState.OFFLINE if other_serving else TargetState.LASTSRV
        if current is TargetState.LASTSRV:
            return TargetState.LASTSRV
        return TargetState.OFFLINE
    # the target's service is alive (up-to-date or online)
    if current in (TargetState.SERVING, TargetState.LASTSRV):
        return TargetState.SERVING
    if current is TargetState.OFFLINE:
        return TargetState.WAITING
    if local is LocalState.UPTODATE:
        # a syncing target reports up-to-date after sync-done; a waiting one has synced nothing yet
        return TargetState.SERVING if current is TargetState.SYNCING else TargetState.WAITING
    # online, syncing or waiting: sync only behind a serving predecessor
    return TargetState.SYNCING if predecessor is TargetState.SERVING else TargetState.WAITING


def place_chains(nodes: dict[int, list[int]], replicas: int) -> list[tuple[int, ...]]:
    """Groups all targets into chains of `replicas` targets on distinct nodes.

    Greedy: each chain takes one target from each of the `replicas` nodes with the most targets left,
    which succeeds whenever any placement does (no node may hold more than one target per chain).
    Heads rotate over the chain's nodes so reads and writes spread.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    left = {node: list(targets) for node, targets in sorted(nodes.items()) if targets}
    total = sum(len(t) for t in left.values())
    if total == 0:
        raise ValueError("nodes hold no targets")
    if len(left) < replicas:
        raise ValueError(f"replicas={replicas} needs at least {replicas} nodes with targets, got {len(left)}")
    if total % replicas:
        raise ValueError(f"{total} targets do not split into chains of replicas={replicas}")
    busiest = max(len(t) for t in left.values())
    if busiest > total // replicas:
        raise ValueError(f"replicas={replicas}: a node holds {busiest} targets but there are only "
                         f"{total // replicas} chains, so two replicas of a chain would share that node")
    chains = []
    for index in range(total // replicas):
        picked = sorted(left, key=lambda n: (-len(left[n]), n))[:replicas]
        members = [left[n].pop(0) for n in sorted(picked)]
        shift = index % replicas
        chains.append(tuple(members[shift:] + members[:shift]))
        left = {n: t for n, t in left.items() if t}
    return chains


class Manager:
    """The cluster manager. Thread-safe.

    Args:
      kv: the KV store its persistent state lives in (None: memory only).
      heartbeat_timeout: seconds of silence after which `check` marks a node's targets offline.
      clock: monotonic time source for heartbeats (tests pass a fake one).
      election: this manager's side of the leadership election on `kv` (None: it always leads).
    """

    def __init__(self, kv: KVStore | None = None, heartbeat_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, election: LeaderElection | None = None) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}")
        if election is not None and kv is None:
            raise ValueError("election needs kv: the leader's state lives in the KV store it is elected in")
        self._kv = kv
        self._election = election
        self._timeout = heartbeat_timeout
        self._clock = clock
        self._lock = threading.RLock()
        self._state = PersistentState()
        self._local: dict[int, LocalState] = {}     # memory only
        self._last_seen: dict[int, float] = {}      # node -> clock() of its last heartbeat
        self._snapshot: RoutingInfo | None = None
        self._leading = election is None             # a standby loads the state when it wins
        if self._leading and kv is not None:
            self._load()

    # ----------------------------------------------------------------------------- leadership and persistence

    def campaign(self, address: str) -> bool:
        """Takes or renews the leadership lease, announcing `address`; True while this manager leads.
        On winning it loads the state from the KV store and treats every node as just heard from."""
        if self._election is None:
            return True
        with self._lock:
            unbroken = self._leading and self._election.holds()  # renewing a lease held without a break
            won = self._election.campaign(address)
            if won and not unbroken:  # taking over: another leader may have changed the state meanwhile
                self._load()
                self._local = {}
                self._leading = True
            elif not won:
                self._leading = False
            return won

    def resign(self) -> None:
        """Stops leading and frees the lease at once (a clean shutdown)."""
        if self._election is not None:
            with self._lock:
                self._leading = False
                self._election.resign()

    def _require_leader(self) -> None:
        """Raises NotPrimary (naming the leader) unless this manager holds the lease now."""
        if self._election is None or (self._leading and self._election.holds()):
            return
        self._leading = False
        leader = self._election.leader()
        raise NotPrimary(f"mgmtd {self._election.member} is a standby; the leader is "
                         f"{leader.member + ' at ' + leader.address if leader else 'not elected yet'}",
                         leader.address if leader else "")

    def _load(self) -> None:
        assert self._kv is not None
        self._state = self._kv.transact(load_state, read_only=True) or PersistentState()
        self._snapshot = None
        now = self._clock()
        self._last_seen = {n: now for n in {*self._state.target_node.values(), *self._state.addresses}}

    def _save(self) -> None:
        """Writes the persistent state in one transaction that first checks this manager still leads;
        drops the snapshot. A manager whose write failed (it lost the lease, or the store failed) stops
        leading until its next campaign, which reloads the stored state."""
        self._snapshot = None
        if self._kv is None:
            return

        def write(txn: Transaction) -> None:
            if self._election is not None:
                self._election.check_in(txn)
            save_state(txn, self._state)

        try:
            self._kv.transact(write)
        except BaseException:  # the state in memory is ahead of the store's: reload it before leading again
            self._leading = False
            raise

    # ----------------------------------------------------------------------------- setup

    def create_chains(self, nodes: dict[int, list[int]], replicas: int, table_id: int = 1) -> ChainTable:
        """Builds the chain table from `nodes` (node id -> its target ids), `replicas` targets per chain
        on distinct nodes, every target serving, versions 1. Calling it again with the same placement
        (say after a restart that loaded the state) returns the existing table."""
        with self._lock:
            self._require_leader()
            target_node = {t: n for n, targets in nodes.items() for t in targets}
            if sum(len(t) for t in nodes.values()) != len(target_node):
                raise ValueError(f"a target id appears twice in nodes={nodes}")
            if self._state.chains:
                if target_node == self._state.target_node and table_id == self._state.table_id and all(
                        len(c.targets) == replicas for c in self._state.chains.values()):
                    return self.routing().chain_table
                raise ValueError(f"chain table {self._state.table_id} already exists with another placement")
            placed = place_chains(nodes, replicas)
            self._state.table_id, self._state.table_version = table_id, 1
            self._state.chains = {i + 1: Chain(i + 1, 1, targets) for i, targets in enumerate(placed)}
            self._state.states = {t: TargetState.SERVING for t in target_node}
            self._state.target_node = target_node
            now = self._clock()
            for node in nodes:
                self._last_seen.setdefault(node, now)
            self._save()
            return self.routing().chain_table

    def register_node(self, node_id: int, address: str) -> None:
        """Records a node's address (for clients and peers); counts as a heartbeat.

        A node that registers again after it was heard from is a restarted server: it may have lost
        pending versions and missed writes while mgmtd had not yet noticed it was gone, so its targets are
        taken offline now and come back through a resync (3FS does not trust a returning service until
        its targets are offline). A chain's last serving target stays (as lastsrv, then serving)."""
        with self._lock:
            self._require_leader()
            returning = any(self._state.target_node.get(t) == node_id for t in self._local)
            self._last_seen[node_id] = self._clock()
            if self._state.addresses.get(node_id) != address:
                self._state.addresses[node_id] = address
                self._save()
            if returning:
                for target, node in self._state.target_node.items():
                    if node == node_id:
                        self._local[target] = LocalState.OFFLINE
                self._update()

    # ----------------------------------------------------------------------------- events

    def heartbeat(self, node_id: int, local_states: dict[int, LocalState]) -> RoutingInfo:
        """A storage node's heartbeat: renews its lease, records its targets' local states, applies
        the transitions and returns the current routing."""
        with self._lock:
            self._require_leader()
            for target, local in local_states.items():
                if self._state.target_node.get(target) != node_id:
                    raise ValueError(f"node {node_id} reported target {target}, which is placed on node "
                                     f"{self._state.target_node.get(target)}")
                self._local[target] = LocalState(local)
            self._last_seen[node_id] = self._clock()
            self._update()
            return self.routing()

    def check(self) -> RoutingInfo:
        """Marks the targets of nodes silent for more than `heartbeat_timeout` offline."""
        with self._lock:
            self._require_leader()
            now = self._clock()
            for target, node in self._state.target_node.items():
                if now - self._last_seen.get(node, now) > self._timeout:
                    self._local[target] = LocalState.OFFLINE
            self._update()
            return self.routing()

    def mark_offline(self, target_id: int) -> RoutingInfo:
        """Marks one target offline now (its medium failed, or its predecessor cannot reach it)."""
        with self._lock:
            self._require_leader()
            if target_id not in self._state.target_node:
                raise ValueError(f"target_id {target_id} is not in the chain table")
            self._local[target_id] = LocalState.OFFLINE
            self._update()
            return self.routing()

    def sync_done(self, target_id: int) -> RoutingInfo:
        """The predecessor finished resyncing `target_id`: it is up to date and becomes serving."""
        with self._lock:
            self._require_leader()
            if target_id not in self._state.target_node:
                raise ValueError(f"target_id {target_id} is not in the chain table")
            if self._state.states[target_id] is not TargetState.SYNCING:
                raise ValueError(f"target {target_id} is {self._state.states[target_id].value}, not syncing")
            self._local[target_id] = LocalState.UPTODATE
            self._update()
            return self.routing()

    def _update(self) -> None:
        """Runs the transition table over every chain until nothing moves; bumps versions and saves."""
        changed = False
        for chain_id, chain in sorted(self._state.chains.items()):
            targets, states = list(chain.targets), {t: self._state.states[t] for t in chain.targets}
            moved, rounds = True, 0
            while moved and rounds <= 2 * len(targets):  # offline -> waiting -> syncing: two steps
                moved, rounds = False, rounds + 1
                for i, target in enumerate(targets):
                    local = self._local.get(target)
                    if local is None:  # not heard from since mgmtd started: leave it be
                        continue
                    others = any(states[t] is TargetState.SERVING for t in targets if t != target)
                    new = next_public_state(local, states[target], states[targets[i - 1]] if i else None, others)
                    if new is not states[target]:
                        states[target], moved = new, True
                targets.sort(key=lambda t: _CHAIN_ORDER[states[t]])
            if tuple(targets) != chain.targets or any(states[t] is not self._state.states[t] for t in targets):
                self._state.chains[chain_id] = Chain(chain_id, chain.version + 1, tuple(targets))
                self._state.states.update(states)
                changed = True
        if changed:
            self._state.table_version += 1
            self._save()

    # ----------------------------------------------------------------------------- queries

    def routing(self) -> RoutingInfo:
        """The current routing snapshot (immutable; a new object after every change)."""
        with self._lock:
            self._require_leader()
            if self._snapshot is None:
                state = self._state
                self._snapshot = RoutingInfo(ChainTable(state.table_id, state.table_version, dict(state.chains)),
                                             dict(state.states), dict(state.target_node), dict(state.addresses))
            return self._snapshot

    def local_state(self, target_id: int) -> LocalState | None:
        """The last local state mgmtd holds for a target (None before its first heartbeat)."""
        with self._lock:
            self._require_leader()
            return self._local.get(target_id)
