"""One RPC per storage node for a read that spans several chunks (``StorageService.read_many``).

A read of a remote file that covers several chunks would cost one RPC per chunk; grouping its chunks by
the storage node of the replica each will be read from turns that into one ``read_many`` per node, the
nodes asked in parallel. Batches are not hedged: a batch that fails (a dead or hung node: the request's
deadline ends it), or any read in it that fails, leaves those chunks to the caller, which reads them one
by one with hedging and retries (``ChunkIO.read_chunk_into``), so the outcome is the same as unbatched,
only slower on a failure. In-process services are never batched: their ``read_into`` already writes
straight into the caller's buffer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storage.threefs.meta.layout import ChunkSpan
from storage.threefs.mgmtd.routing import RoutingInfo
from storage.threefs.storage.chunk_id import ChunkId


def group_by_node(routing: RoutingInfo, spans: list[ChunkSpan], pick: Iterator[int]) -> dict[int, list[tuple]] | None:
    """node id -> [(span, target)]: each span's replica chosen by rotation (`pick` yields ints); None when a
    chain has no serving replica (the caller's per-chunk path reports that)."""
    groups: dict[int, list[tuple]] = defaultdict(list)
    for span in spans:
        targets = routing.readable_targets(span.chain_id)
        if not targets:
            return None
        target = targets[next(pick) % len(targets)]
        groups[routing.target_node[target]].append((span, target))
    return groups


def read_batched(routing: RoutingInfo, storage: Callable[[int], Any], pool: ThreadPoolExecutor, inode_id: int,
                 spans: list[ChunkSpan], buffer: memoryview, pick: Iterator[int]) -> tuple[bool, list[ChunkSpan]]:
    """Reads `spans` of file `inode_id` into `buffer` with one ``read_many`` per node. Returns (whether some
    chunk came back short, the spans not read: the caller reads those one by one). Reads nothing, and
    returns every span, when no two spans share a node or a node's service is in this process."""
    try:
        readable = routing.readable_targets(spans[0].chain_id)
        if not readable or getattr(type(storage(routing.target_node[readable[0]])), "in_process", False):
            return False, spans  # an in-process cluster (every node is): read_into is already zero-copy
    except Exception:  # noqa: BLE001 - a node that cannot be reached: the per-chunk path retries it
        return False, spans
    groups = group_by_node(routing, spans, pick)
    if groups is None or len(groups) == len(spans):
        return False, spans

    def batch(node: int, items: list[tuple]) -> tuple[bool, list[ChunkSpan]]:
        try:
            results = storage(node).read_many([(span.chain_id, target, ChunkId(inode_id, span.chunk_index),
                                                 span.offset_in_chunk, span.length) for span, target in items])
        except Exception:  # noqa: BLE001 - dead, hung or refusing: every span goes the per-chunk way
            return False, [span for span, _ in items]
        short, failed = False, []
        for (span, _), result in zip(items, results):
            if isinstance(result, Exception):
                failed.append(span)
                continue
            target = buffer[span.buffer_offset:span.buffer_offset + span.length]
            target[:len(result)] = result
            if len(result) < span.length:
                target[len(result):] = bytes(span.length - len(result))
                short = True
        return short, failed

    outcomes = [future.result() for future in [pool.submit(batch, node, items) for node, items in groups.items()]]
    return any(short for short, _ in outcomes), [span for _, failed in outcomes for span in failed]
