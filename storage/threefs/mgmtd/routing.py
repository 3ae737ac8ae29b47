"""Routing: the chain table and target states that mgmtd owns and hands out as one immutable snapshot.

3FS replicates each chunk on a chain of storage targets. A chain lists its targets in order: serving
targets first (head ... tail), then syncing ones (they receive writes as the new tail but serve no reads),
and offline ones last. Every membership or state change bumps the chain's version.
"""

from __future__ import annotations

import dataclasses
import enum


class TargetState(enum.Enum):
    """Public target states, as mgmtd publishes them with the chain table."""

    SERVING = "serving"    # reads and writes
    SYNCING = "syncing"    # writes only, while its predecessor copies the chunks it missed
    WAITING = "waiting"    # back online, waiting for its turn to sync
    LASTSRV = "lastsrv"    # the last serving target of a chain that lost all others
    OFFLINE = "offline"    # neither


class LocalState(enum.Enum):
    """What a storage service reports about its own target in a heartbeat."""

    UPTODATE = "up-to-date"
    ONLINE = "online"
    OFFLINE = "offline"


@dataclasses.dataclass(frozen=True)
class Chain:
    """One replication chain: `targets` in chain order, `version` bumped on every change."""

    chain_id: int
    version: int
    targets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ChainTable:
    """The chains files are striped over; `version` bumps when any chain changes."""

    table_id: int
    version: int
    chains: dict[int, Chain]

    @property
    def chain_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.chains))


@dataclasses.dataclass(frozen=True)
class RoutingInfo:
    """Everything a client or service needs to route a chunk request, as of one mgmtd version.

    A snapshot: never mutated once built, so the paths derived from it (`write_path`,
    `readable_targets`) are computed once per chain and remembered (`_paths`, not a wire field).
    """

    chain_table: ChainTable
    target_states: dict[int, TargetState]
    target_node: dict[int, int]
    node_addresses: dict[int, str]
    _paths: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def chain(self, chain_id: int) -> Chain:
        try:
            return self.chain_table.chains[chain_id]
        except KeyError:
            raise KeyError(f"chain_id {chain_id} is not in chain table {self.chain_table.table_id}") from None

    def write_path(self, chain_id: int) -> tuple[int, ...]:
        """[targets] that take a write, head to tail: serving then syncing ones."""
        key = ("w", chain_id)
        path = self._paths.get(key)
        if path is None:
            writable = (TargetState.SERVING, TargetState.SYNCING, TargetState.LASTSRV)
            path = self._paths[key] = tuple(t for t in self.chain(chain_id).targets
                                            if self.target_states[t] in writable)
        return path

    def readable_targets(self, chain_id: int) -> tuple[int, ...]:
        """[targets] that may serve a read: serving ones only."""
        key = ("r", chain_id)
        path = self._paths.get(key)
        if path is None:
            readable = (TargetState.SERVING, TargetState.LASTSRV)
            path = self._paths[key] = tuple(t for t in self.chain(chain_id).targets
                                            if self.target_states[t] in readable)
        return path

    def successor(self, chain_id: int, target_id: int) -> int | None:
        """The target after `target_id` on the chain's write path, or None when `target_id` is its tail."""
        path = self.write_path(chain_id)
        if target_id not in path:
            raise KeyError(f"target_id {target_id} is not on the write path of chain {chain_id}: {path}")
        index = path.index(target_id)
        return path[index + 1] if index + 1 < len(path) else None

    def chain_of(self, target_id: int) -> int:
        """The chain id that `target_id` belongs to (each target is in exactly one chain)."""
        for chain in self.chain_table.chains.values():
            if target_id in chain.targets:
                return chain.chain_id
        raise KeyError(f"target_id {target_id} is in no chain of table {self.chain_table.table_id}")

    def local_target(self, chain_id: int, node_id: int) -> int | None:
        """The target of `chain_id` that sits on node `node_id`, or None (a chain has at most one per node)."""
        for target in self.chain(chain_id).targets:
            if self.target_node.get(target) == node_id:
                return target
        return None
