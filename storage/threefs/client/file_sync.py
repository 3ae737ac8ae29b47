"""A file's fsync on storage: every replica on its chains' write paths makes what it holds durable.

A write is acknowledged once every replica of the chain's write path has it in its page cache (it
survives a kill of any process); each replica's chunk store fsyncs it by group commit a fraction of a
second later (``storage/group_commit.py``). ``ThreeFSFile.fsync`` / ``close`` close that window, as
POSIX's fsync does: `sync_chains` asks every storage node holding a target on the write path of one of
the file's chains to sync those targets (``StorageService.sync``), all nodes in parallel, and returns
once each (node, target) pair on the current write paths has synced since the call began.

Failures follow the data path's rules. A node that fails with a retryable error (down, hung past its
deadline, a target not serving) is asked again, with fresh routing, until `timeout`; while its request
is in flight (a hung node), routing is re-read every `poll` seconds, and a target that left its chain's
write path meanwhile (mgmtd marked it offline) no longer counts: it resyncs from its predecessor when it
returns, and the replicas that remain are the ones that hold the writes. Past `timeout` it raises
``TimeoutError`` (ETIMEDOUT, an OSError); a non-retryable error (an fsync that failed on the storage
node, e.g. EIO or ENOSPC) is raised at once. A chain with no writable target cannot be synced: retried,
then ETIMEDOUT.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Any

from storage.threefs.errors import TargetNotServing, timed_out
from storage.threefs.mgmtd.routing import RoutingInfo

POLL_SECONDS = 0.05  # how often routing is re-read while a node's sync is in flight
RETRY_DELAY_SECONDS = 0.05  # before a node whose sync failed is asked again


def write_path_targets(routing: RoutingInfo, chains: Iterable[int]) -> set[tuple[int, int]]:
    """(node, target) of every target on the write paths of `chains`. TargetNotServing when a chain has
    no writable target (nothing could hold its writes durably)."""
    pairs = set()
    for chain_id in chains:
        path = routing.write_path(chain_id)
        if not path:
            raise TargetNotServing(f"chain {chain_id} has no writable target to sync")
        pairs.update((routing.target_node[target], target) for target in path)
    return pairs


def sync_chains(chains: Iterable[int], routing: Any, storage: Callable[[int], Any], executor: Executor,
                timeout: float, retryable: tuple[type[BaseException], ...], what: str,
                poll: float = POLL_SECONDS) -> None:
    """Syncs every target on the write paths of `chains` (see the module docstring).

    Args:
      routing: the client's routing cache (``get``, ``invalidate``).
      storage: node id -> that node's StorageService or RPC proxy (with the bulk deadline: a sync of many
        written chunks may take long).
      executor: runs the per-node requests (a request to a hung node may outlive this call).
      timeout: seconds before giving up (ETIMEDOUT); retryable: the errors that are retried.
      what: names the file in errors.
    """
    chains = sorted(set(chains))
    deadline = time.monotonic() + timeout
    done: set[tuple[int, int]] = set()
    in_flight: dict[Future, tuple[int, list[int]]] = {}
    retry_at: dict[int, float] = {}  # node -> when it may be asked again after a failure
    error: BaseException | None = None
    while True:
        try:
            missing = write_path_targets(routing.get(), chains) - done
        except retryable as exc:  # a chain without a writable target, or no routing yet
            error, missing = exc, None
        if missing is not None and not missing:
            return
        now = time.monotonic()
        if now > deadline:
            raise timed_out(f"fsync of {what}: not every replica synced within {timeout:g} s (still "
                            f"waiting for (node, target) {sorted(missing or ())}; last error: "
                            f"{type(error).__name__ if error else 'none'}: {error})") from error
        busy = {node for node, _ in in_flight.values()}
        by_node: dict[int, list[int]] = {}
        for node, target in sorted(missing or ()):
            if node not in busy and retry_at.get(node, 0.0) <= now:
                by_node.setdefault(node, []).append(target)
        for node, targets in by_node.items():
            in_flight[executor.submit(lambda n=node, t=targets: storage(n).sync(t))] = (node, targets)
        pause = max(0.0, min(poll, deadline - now))
        if not in_flight:  # every missing node waits for its retry (or routing): nothing to wait on
            time.sleep(pause)
            continue
        finished, _ = wait(list(in_flight), timeout=pause, return_when=FIRST_COMPLETED)
        for future in finished:
            node, targets = in_flight.pop(future)
            try:
                future.result()
            except retryable as exc:
                error = exc
                retry_at[node] = time.monotonic() + RETRY_DELAY_SECONDS
                routing.invalidate()
            else:
                done.update((node, target) for target in targets)
