"""How long each kind of request may take before its caller gives up on the server and moves on.

A hung server (SIGSTOP, a stalled disk) keeps its connections open and answers nothing, so only a
deadline ends the wait. mgmtd marks a silent node offline after the heartbeat timeout; data-path
deadlines are shorter than that, so an IO never waits longer for a hung node than routing would take to
route around it:

  data   client -> storage reads and writes: half the heartbeat timeout. A write whose head hangs fails
         after it, and the client retries with fresh routing (the node goes offline after the heartbeat
         timeout); a write whose successor hangs costs the head one `peer` deadline (it reports the
         successor and forwards to the next), which fits inside `data`.
  peer   storage -> storage on the data path (forwarded updates, the tail version query, reads at the
         tail, repairs): a quarter of the heartbeat timeout.
  bulk   maintenance (resync's dump-chunkmeta and full-chunk transfers, chunk removal): long, since their
         size grows with the target's chunk count.
  hedge_delay   a client read not answered within it is sent to the next serving replica as well, and
         the first answer wins: a hung replica costs a read this delay, not a deadline.
"""

from __future__ import annotations

import dataclasses

from storage.threefs.cluster.shape import ServerTimings

BULK_SECONDS = 30.0
HEDGE_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class RequestDeadlines:
    """Per-request deadlines in seconds (see the module docstring); all must be > 0."""

    data: float
    peer: float
    bulk: float = BULK_SECONDS
    hedge_delay: float = HEDGE_SECONDS

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field.name} must be a number of seconds > 0, got {value!r}")

    @staticmethod
    def from_timings(timings: ServerTimings) -> RequestDeadlines:
        """The deadlines of a cluster with these heartbeat settings."""
        data = timings.heartbeat_timeout / 2
        return RequestDeadlines(data=data, peer=timings.heartbeat_timeout / 4,
                                bulk=max(BULK_SECONDS, timings.heartbeat_timeout),
                                hedge_delay=min(HEDGE_SECONDS, data / 4))
