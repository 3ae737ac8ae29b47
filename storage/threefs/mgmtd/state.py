"""mgmtd's persistent state in the cluster's KV store: the chain table, public target states, target
placement and node addresses, as one JSON document under ``MGMT/state`` (written in the same transaction
that checks the writer's leadership, see ``election.py``). Local target states and heartbeat times are
not persisted: as in 3FS, a new leader starts from fresh heartbeats.

The document is the format of the ``mgmtd.json`` file earlier versions kept; ``import_state_file`` moves
such a file's content into the KV store once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from storage.threefs.kv.store import KVStore, Transaction
from storage.threefs.mgmtd.routing import Chain, TargetState

STATE_KEY = b"MGMT/state"


@dataclasses.dataclass
class PersistentState:
    """What mgmtd keeps across restarts and leader changes."""

    table_id: int = 1
    table_version: int = 0
    chains: dict[int, Chain] = dataclasses.field(default_factory=dict)
    states: dict[int, TargetState] = dataclasses.field(default_factory=dict)
    target_node: dict[int, int] = dataclasses.field(default_factory=dict)
    addresses: dict[int, str] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({
            "table_id": self.table_id, "table_version": self.table_version,
            "chains": [{"chain_id": c.chain_id, "version": c.version, "targets": list(c.targets)}
                       for c in sorted(self.chains.values(), key=lambda c: c.chain_id)],
            "target_states": {str(t): s.value for t, s in sorted(self.states.items())},
            "target_node": {str(t): n for t, n in sorted(self.target_node.items())},
            "node_addresses": {str(n): a for n, a in sorted(self.addresses.items())},
        }, indent=1).encode()

    @staticmethod
    def decode(raw: bytes) -> PersistentState:
        state = json.loads(raw)
        return PersistentState(
            table_id=state["table_id"], table_version=state["table_version"],
            chains={c["chain_id"]: Chain(c["chain_id"], c["version"], tuple(c["targets"])) for c in state["chains"]},
            states={int(t): TargetState(s) for t, s in state["target_states"].items()},
            target_node={int(t): n for t, n in state["target_node"].items()},
            addresses={int(n): a for n, a in state["node_addresses"].items()})


def load_state(txn: Transaction) -> PersistentState | None:
    raw = txn.get(STATE_KEY)
    return None if raw is None else PersistentState.decode(raw)


def save_state(txn: Transaction, state: PersistentState) -> None:
    txn.set(STATE_KEY, state.encode())


def import_state_file(kv: KVStore, path: Path) -> bool:
    """Moves an old ``mgmtd.json`` into the KV store when the store holds no mgmtd state yet; True if it did.
    The file is left in place (renamed ``.imported``) so nothing is lost if the store is later replaced."""
    path = Path(path)
    if not path.exists():
        return False
    state = PersistentState.decode(path.read_bytes())  # validates before anything is written

    def attempt(txn: Transaction) -> bool:
        if txn.get(STATE_KEY) is not None:
            return False
        save_state(txn, state)
        return True

    imported = kv.transact(attempt)
    path.rename(path.with_name(path.name + ".imported"))
    return imported
