"""A storage server's routing, held under a lease that its heartbeats to mgmtd renew (mgmtd off the data path).

A storage server never asks mgmtd anything while it serves a request: it routes by what its last
successful heartbeat returned. That routing is trusted for ``duration`` seconds from the moment that
heartbeat was *sent*; mgmtd declares a node offline only after ``heartbeat_timeout`` seconds of silence
counted from when a heartbeat *arrived*, later. With ``duration = heartbeat_timeout / 2`` (3FS: a service
exits after T/2 without mgmtd) a server stops serving well before mgmtd can have moved its chains past it:
``routing()`` then raises ``TargetNotServing`` (the server is fenced; clients retry elsewhere or later)
until a heartbeat succeeds again. Routing that mgmtd returns to other calls (``mark_offline``,
``sync_done``) is newer and is adopted, but does not extend the lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from storage.threefs.errors import TargetNotServing
from storage.threefs.mgmtd.routing import LocalState, RoutingInfo


class RoutingLease:
    """The routing a storage server serves on, and until when.

    Args:
      duration: seconds a successful heartbeat keeps the server serving (heartbeat_timeout / 2).
      clock: monotonic time shared with mgmtd's (one machine: CLOCK_MONOTONIC; tests pass a fake one).
    """

    def __init__(self, duration: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(duration, (int, float)) or duration <= 0:
            raise ValueError(f"duration must be a number of seconds > 0, got {duration!r}")
        self._duration = float(duration)
        self._clock = clock
        self._lock = threading.Lock()
        self._routing: RoutingInfo | None = None
        self._expires = float("-inf")

    def renew(self, routing: RoutingInfo, sent_at: float) -> None:
        """A heartbeat sent at `sent_at` (by this lease's clock) returned `routing`: serve on it until
        `sent_at + duration`."""
        with self._lock:
            self._adopt(routing)
            self._expires = max(self._expires, sent_at + self._duration)

    def adopt(self, routing: RoutingInfo) -> None:
        """Routing mgmtd handed back to another call: newer routing, no longer lease."""
        with self._lock:
            self._adopt(routing)

    def _adopt(self, routing: RoutingInfo) -> None:
        if self._routing is None or routing.chain_table.version >= self._routing.chain_table.version:
            self._routing = routing

    def valid(self) -> bool:
        with self._lock:
            return self._routing is not None and self._clock() < self._expires

    def routing(self) -> RoutingInfo:
        """The routing to serve on; TargetNotServing while the lease has lapsed (the server is fenced)."""
        with self._lock:
            if self._routing is None or self._clock() >= self._expires:
                raise TargetNotServing("this storage server is fenced: no heartbeat reached mgmtd within its "
                                       f"{self._duration:g} s routing lease; it serves again after the next one")
            return self._routing

    def last_routing(self) -> RoutingInfo | None:
        """The last routing known, lease or not (for finding peers' addresses)."""
        with self._lock:
            return self._routing


class LeasedManager:
    """mgmtd as ``StorageService.tick`` and resync see it: every routing mgmtd returns goes into `lease`,
    and a heartbeat renews it from the moment it was sent."""

    def __init__(self, manager: Any, lease: RoutingLease, clock: Callable[[], float] = time.monotonic) -> None:
        self._manager = manager
        self._lease = lease
        self._clock = clock

    def routing(self) -> RoutingInfo:
        routing = self._manager.routing()
        self._lease.adopt(routing)
        return routing

    def heartbeat(self, node_id: int, local_states: dict[int, LocalState]) -> RoutingInfo:
        sent_at = self._clock()
        routing = self._manager.heartbeat(node_id, local_states)
        self._lease.renew(routing, sent_at)
        return routing

    def mark_offline(self, target_id: int) -> RoutingInfo:
        routing = self._manager.mark_offline(target_id)
        self._lease.adopt(routing)
        return routing

    def sync_done(self, target_id: int) -> RoutingInfo:
        routing = self._manager.sync_done(target_id)
        self._lease.adopt(routing)
        return routing
