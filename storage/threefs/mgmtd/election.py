"""Which mgmtd leads: a leadership lease kept in the cluster's KV store and taken through its transactions.

Any number of mgmtd processes may run on one KV store; one leads, the others stand by. The lease is one
key, ``MGMT/leader`` -> ``{"member", "address", "expires"}`` (``expires`` in wall-clock seconds, the
``clock`` every member shares). ``campaign`` is one serializable transaction: a member takes or renews
the lease when the key is absent, expired, or already its own, and otherwise learns who leads. So two
members never hold it at once: a standby takes over only once the old lease's ``expires`` has passed, and
the old leader believes itself leader only until that same instant (``holds``). Every write of mgmtd's
state calls ``check_in`` inside its own transaction, so a leader that lost the lease while it was paused
cannot overwrite its successor's state (fencing).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

from storage.threefs.errors import NotPrimary
from storage.threefs.kv.store import KVStore, Transaction

LEADER_KEY = b"MGMT/leader"


@dataclasses.dataclass(frozen=True)
class Leadership:
    """Who holds the lease, where it serves, and until when (wall-clock seconds)."""

    member: str
    address: str
    expires: float


def read_leadership(txn: Transaction) -> Leadership | None:
    raw = txn.get(LEADER_KEY)
    return None if raw is None else Leadership(**json.loads(raw))


class LeaderElection:
    """One member's side of the election.

    Args:
      kv: the cluster's KV store (shared by every mgmtd).
      member: this member's id, unique per process (a restarted mgmtd is a new member: it waits for the
        lease it held before to expire rather than trust that its old self is gone).
      lease_seconds: how long one campaign holds the lease; renew well within it.
      clock: wall-clock time shared by all members (tests pass a fake one).
    """

    def __init__(self, kv: KVStore, member: str, lease_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(member, str) or not member:
            raise ValueError(f"member must be a non-empty str, got {member!r}")
        if not isinstance(lease_seconds, (int, float)) or lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be a number of seconds > 0, got {lease_seconds!r}")
        self._kv = kv
        self.member = member
        self._lease = float(lease_seconds)
        self._clock = clock
        self._expires = 0.0  # this member holds the lease until then (0: not at all)

    def campaign(self, address: str) -> bool:
        """Takes or renews the lease (announcing `address`) if it is free, expired or ours; True if we
        hold it now."""
        def attempt(txn: Transaction) -> float:
            now = self._clock()
            current = read_leadership(txn)
            if current is not None and current.member != self.member and now < current.expires:
                return 0.0
            expires = now + self._lease
            txn.set(LEADER_KEY, json.dumps(dataclasses.asdict(Leadership(self.member, address, expires))).encode())
            return expires

        self._expires = self._kv.transact(attempt)
        return self._expires > 0.0

    def holds(self) -> bool:
        """Whether this member holds the lease now, by its own clock (no KV access)."""
        return self._clock() < self._expires

    def check_in(self, txn: Transaction) -> None:
        """Inside a state-writing transaction: raises NotPrimary unless this member still holds the lease."""
        current = read_leadership(txn)
        if current is None or current.member != self.member or self._clock() >= current.expires:
            self._expires = 0.0
            raise NotPrimary(f"mgmtd {self.member} lost its leadership lease; the leader is "
                             f"{current.member + ' at ' + current.address if current else 'not elected yet'}",
                             current.address if current and current.member != self.member else "")

    def leader(self) -> Leadership | None:
        """The current lease holder, if its lease has not expired."""
        current = self._kv.transact(read_leadership, read_only=True)
        return current if current is not None and self._clock() < current.expires else None

    def resign(self) -> None:
        """Gives the lease up at once (a clean shutdown), so a standby need not wait for it to expire."""
        def attempt(txn: Transaction) -> None:
            current = read_leadership(txn)
            if current is not None and current.member == self.member:
                txn.clear(LEADER_KEY)

        self._expires = 0.0
        self._kv.transact(attempt)
