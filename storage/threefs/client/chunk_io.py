"""The client's data path: byte ranges of a file -> chunk requests on the chains of its layout.

As in 3FS, the metadata service is off the data path: with a file's layout (chunk size, stripe, shuffled
chain ids) the client computes each chunk's id (inode, index) and chain itself. Writes go to the head of
the chain's write path (CRAQ: head to tail, acknowledged once the tail committed); reads go to any
serving replica, rotating over them and moving to the next on failure. Reads are hedged: one that a
replica has not answered within `hedge_delay` goes to the next serving replica too, and the first answer
wins, so a hung node costs a read that delay, not an RPC deadline; the RPC deadlines themselves (the
proxies' timeouts, ``cluster/deadlines.py``) end a write to a hung head, which then retries with fresh
routing. Requests of one call run in parallel on the client's IO threads. `sync_file` (a file's
fsync/close) asks every replica on the file's write paths to make its writes durable (``file_sync.py``).

Errors: the retryable ones (a stale chain version, a target that stopped serving, a dead or hung node,
one damaged replica) are retried until `retry_timeout`, then raised as ``TimeoutError`` (ETIMEDOUT);
``NoIntactReplica`` (EIO: every replica of a chunk is damaged) and argument errors are raised at once. Routing comes from mgmtd through a
short-lived cache that is refreshed whenever a request meets a stale chain version, a target that stopped
serving or a dead node, and kept while mgmtd is unreachable.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from storage.threefs.storage.chunk_store import ChunkId
from storage.threefs.storage.crc32c import crc32c
from storage.threefs.errors import (ChainVersionMismatch, ChecksumError, ChunkDiverged, NodeUnavailable,
                                    NotPrimary, TargetNotServing, timed_out)
from storage.threefs.client.batched_reads import read_batched
from storage.threefs.client.file_sync import sync_chains
from storage.threefs.meta.layout import ChunkSpan, Layout
from storage.threefs.mgmtd.routing import RoutingInfo
from storage.threefs.net.transport import ReplyBuffer

RETRYABLE = (ChainVersionMismatch, TargetNotServing, NodeUnavailable, ChecksumError, ChunkDiverged)


class RoutingCache:
    """mgmtd's routing, fetched at most every `ttl` seconds unless a request found it stale (`invalidate`).

    While mgmtd cannot be reached (a fetch raises OSError, NodeUnavailable included, or NotPrimary) the
    last routing fetched is used, and mgmtd is asked again only after another `ttl`: clients keep
    working through an mgmtd restart or failover. Only a cache that never fetched raises.
    """

    def __init__(self, fetch: Callable[[], RoutingInfo], ttl: float = 0.5) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._lock = threading.Lock()
        self._routing: RoutingInfo | None = None
        self._stale = True
        self._fetched_at = 0.0
        self._retry_after = 0.0  # after a failed fetch: no new attempt before then

    def get(self) -> RoutingInfo:
        routing = self._routing  # the common case without the lock: fresh routing, nobody invalidated it
        if routing is not None and not self._stale and time.monotonic() - self._fetched_at <= self._ttl:
            return routing
        with self._lock:
            now = time.monotonic()
            due = self._stale or now - self._fetched_at > self._ttl
            if self._routing is None or due and now >= self._retry_after:
                try:
                    self._routing = self._fetch()
                except (OSError, NotPrimary):
                    if self._routing is None:
                        raise
                    self._retry_after = time.monotonic() + self._ttl
                else:
                    self._fetched_at, self._stale = time.monotonic(), False
            return self._routing

    def invalidate(self) -> None:
        with self._lock:
            self._stale = True


class ChunkIO:
    """Chunk requests for the client.

    Args:
      routing: the routing cache (mgmtd's chain table, target states, node of each target).
      storage: node id -> that node's StorageService (in-process) or RPC proxy (whose deadline bounds
        how long one request may wait for a hung node).
      pool: the client's IO threads.
      retry_timeout: seconds one chunk request keeps retrying while the cluster reconfigures.
      hedge_delay: seconds a chunk read waits for a replica before sending the same read to the next
        serving replica as well (the first answer wins); None reads one replica at a time.
      bulk_storage: like `storage`, for chunk removal (long deadlines); default `storage`.
      hedge_threads: threads for the reads in flight (hedges run there, never in `pool`, whose threads
        wait for them).
    """

    def __init__(self, routing: RoutingCache, storage: Callable[[int], Any], pool: ThreadPoolExecutor,
                 retry_timeout: float = 20.0, hedge_delay: float | None = 0.1,
                 bulk_storage: Callable[[int], Any] | None = None, hedge_threads: int = 32) -> None:
        if hedge_delay is not None and not hedge_delay > 0:
            raise ValueError(f"hedge_delay must be > 0 seconds or None, got {hedge_delay!r}")
        self._routing = routing
        self._storage = storage
        self._bulk_storage = bulk_storage or storage
        self._pool = pool
        self._retry_timeout = retry_timeout
        self._hedge_delay = hedge_delay
        self._hedges = ThreadPoolExecutor(hedge_threads, thread_name_prefix="3fs-read")
        self._syncs = ThreadPoolExecutor(8, thread_name_prefix="3fs-sync")  # long waits, never the reads' threads
        self._rotation = itertools.count()

    def close(self) -> None:
        """Stops the read threads (reads still in flight end by their deadlines, unanswered)."""
        self._hedges.shutdown(wait=False, cancel_futures=True)
        self._syncs.shutdown(wait=False, cancel_futures=True)

    def _retrying(self, what: str, attempt: Callable[[RoutingInfo], Any], timeout: float | None = None) -> Any:
        timeout = self._retry_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                return attempt(self._routing.get())
            except RETRYABLE as exc:
                if time.monotonic() > deadline:
                    raise timed_out(f"{what}: no replica answered within {timeout:g} s "
                                    f"(last error: {type(exc).__name__}: {exc})") from exc
                self._routing.invalidate()
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _parallel(self, fn: Callable[[ChunkSpan], None], spans: list[ChunkSpan]) -> None:
        if len(spans) == 1:
            fn(spans[0])
            return
        for future in [self._pool.submit(fn, span) for span in spans]:
            future.result()

    # ----------------------------------------------------------------------------- reads

    def read_chunk(self, chain_id: int, chunk_id: ChunkId, offset: int, length: int) -> bytes:
        """Committed bytes of one chunk from a serving replica (short where the chunk is)."""
        def attempt(routing: RoutingInfo) -> bytes:
            targets = routing.readable_targets(chain_id)
            if not targets:
                raise TargetNotServing(f"chain {chain_id} has no serving target")
            first = next(self._rotation) % len(targets)

            def read_from(target: int) -> bytes:
                return self._storage(routing.target_node[target]).read(chain_id, target, chunk_id, offset, length)

            return self._first_answer(targets[first:] + targets[:first], read_from)

        return self._retrying(f"read of chunk {tuple(chunk_id)} on chain {chain_id}", attempt)

    def _first_answer(self, targets: list[int], read_from: Callable[[int], bytes]) -> bytes:
        """Hedged read: asks `targets` in order, the next one as soon as a request failed with a retryable
        error or `hedge_delay` passed without an answer; returns the first answer. A non-retryable error
        (NoIntactReplica, a bad argument) is raised at once; when every target failed, the last error."""
        if self._hedge_delay is None:
            error: Exception | None = None
            for target in targets:
                try:
                    return read_from(target)
                except RETRYABLE as exc:
                    error = exc
            assert error is not None
            raise error
        waiting = list(targets)
        in_flight: set[Future] = set()
        error = None
        to_launch = 1
        while True:
            for _ in range(min(to_launch, len(waiting))):
                in_flight.add(self._hedges.submit(read_from, waiting.pop(0)))
            if not in_flight:
                assert error is not None
                raise error
            done, in_flight = wait(in_flight, timeout=self._hedge_delay if waiting else None,
                                   return_when=FIRST_COMPLETED)
            to_launch = 1 if not done else 0  # a hedge after each silent delay, a replacement per failure
            for future in done:
                try:
                    return future.result()
                except RETRYABLE as exc:
                    error = exc
                    to_launch += 1

    def read_chunk_into(self, chain_id: int, chunk_id: ChunkId, offset: int, buffer: memoryview) -> int:
        """Committed bytes [offset, offset + len(buffer)) of one chunk, written into `buffer` by the replica
        that answers (no intermediate copy where the service allows: ``_read_into``); returns the count,
        short where the chunk is. Hedged as ``read_chunk``; once this returns or raises, no losing hedge
        writes into `buffer` again."""
        def attempt(routing: RoutingInfo) -> int:
            targets = routing.readable_targets(chain_id)
            if not targets:
                raise TargetNotServing(f"chain {chain_id} has no serving target")
            first = next(self._rotation) % len(targets)
            return self._first_answer_into(routing, targets[first:] + targets[:first], chain_id, chunk_id,
                                           offset, buffer)

        return self._retrying(f"read of chunk {tuple(chunk_id)} on chain {chain_id}", attempt)

    def _first_answer_into(self, routing: RoutingInfo, targets: list[int], chain_id: int, chunk_id: ChunkId,
                           offset: int, buffer: memoryview) -> int:
        """`_first_answer` into `buffer`. An in-process service (or hedge_delay None) is asked in the
        calling thread, one replica at a time, straight into `buffer`. Otherwise the first request
        receives into `buffer` through a revocable ``ReplyBuffer`` and each hedge into a buffer of its
        own; when a hedge wins, the first request's buffer is revoked before the winner's bytes are
        copied in, so a late loser never writes into `buffer`."""
        def service(target: int) -> Any:
            return self._storage(routing.target_node[target])

        def read_from(target: int, destination: ReplyBuffer) -> int:
            return _read_into(service(target), chain_id, target, chunk_id, offset, destination)

        try:
            inline = self._hedge_delay is None or getattr(type(service(targets[0])), "in_process", False)
        except RETRYABLE:
            inline = False
        if inline:
            error: Exception | None = None
            for target in targets:
                try:
                    return read_from(target, ReplyBuffer(buffer))
                except RETRYABLE as exc:
                    error = exc
            assert error is not None
            raise error
        guard = ReplyBuffer(buffer)
        destinations = iter([guard])  # one request gets the caller's buffer, every other one its own

        def hedged(target: int) -> tuple[ReplyBuffer, int]:
            destination = next(destinations, None) or ReplyBuffer(bytearray(len(buffer)))
            return destination, read_from(target, destination)

        winner: ReplyBuffer | None = None
        try:
            winner, count = self._first_answer(targets, hedged)
        finally:
            if winner is not guard:
                guard.revoke()  # from here on a request still receiving into `buffer` writes elsewhere
        if winner is not guard:
            buffer[:count] = winner.view[:count]
        return count

    def read(self, layout: Layout, inode_id: int, offset: int, buffer: memoryview) -> bool:
        """Fills `buffer` ([n] bytes) with the file's bytes [offset, offset + n), zeros where storage holds
        nothing. Returns whether some chunk came back short: a hole, or a file that shrank or was removed
        since the caller learnt its length (the caller tells them apart; see ``ThreeFSFile``). A read of
        one chunk runs in the calling thread; several run in parallel on the IO threads, those that share
        a remote storage node as one ``read_many`` (``batched_reads.py``)."""
        def one(span: ChunkSpan) -> bool:
            target = buffer[span.buffer_offset:span.buffer_offset + span.length]
            count = self.read_chunk_into(span.chain_id, ChunkId(inode_id, span.chunk_index), span.offset_in_chunk,
                                         target)
            if count < span.length:
                target[count:] = bytes(span.length - count)
                return True
            return False

        spans = layout.chunk_spans(offset, len(buffer))
        if len(spans) == 1:
            return one(spans[0])
        # remote nodes: one read_many per node; what a batch missed, one chunk at a time
        short, spans = read_batched(self._routing.get(), self._storage, self._pool, inode_id, spans, buffer,
                                    self._rotation)
        futures = [self._pool.submit(one, span) for span in spans]
        return any([future.result() for future in futures]) or short

    # ----------------------------------------------------------------------------- writes

    def write_chunk(self, chain_id: int, chunk_id: ChunkId, offset: int, data: bytes,
                    full_replace: bool = False, data_crc: int | None = None) -> int:
        """Writes through the chain's head; returns the committed chunk version. The CRC32C of `data`
        (`data_crc`, computed here once when None) goes with it: the head and every replica check it."""
        data_crc = crc32c(data) if data_crc is None else data_crc

        def attempt(routing: RoutingInfo) -> int:
            path = routing.write_path(chain_id)
            if not path:
                raise TargetNotServing(f"chain {chain_id} has no writable target")
            head = self._storage(routing.target_node[path[0]])
            return head.write(chain_id, routing.chain(chain_id).version, chunk_id, offset, data, full_replace,
                              data_crc)

        return self._retrying(f"write of chunk {tuple(chunk_id)} on chain {chain_id}", attempt)

    def write(self, layout: Layout, inode_id: int, offset: int, data: memoryview) -> None:
        """Writes [n] bytes at file offset `offset`, one request per chunk touched, in parallel."""
        def one(span: ChunkSpan) -> None:
            piece = bytes(data[span.buffer_offset:span.buffer_offset + span.length])
            self.write_chunk(span.chain_id, ChunkId(inode_id, span.chunk_index), span.offset_in_chunk, piece)

        self._parallel(one, layout.chunk_spans(offset, len(data)))

    def cut(self, layout: Layout, inode_id: int, new_length: int, old_length: int) -> None:
        """Drops the file's bytes past `new_length` (truncate): whole chunks become empty, the chunk
        holding the new end keeps only its prefix, so a later write past the end reads zeros between."""
        size = layout.chunk_size
        first_whole = -(-new_length // size)
        last = -(-old_length // size)
        work: list[tuple[int, bytes]] = [(index, b"") for index in range(first_whole, last)]
        if new_length % size and new_length < old_length:
            index = new_length // size
            prefix = self.read_chunk(layout.chain_of_chunk(index), ChunkId(inode_id, index), 0, new_length % size)
            work.append((index, prefix))

        def one(item: tuple[int, bytes]) -> None:
            index, content = item
            self.write_chunk(layout.chain_of_chunk(index), ChunkId(inode_id, index), 0, content, full_replace=True)

        for future in [self._pool.submit(one, item) for item in work]:
            future.result()

    def remove_file(self, layout: Layout, inode_id: int, timeout: float | None = None) -> None:
        """Deletes every chunk of a file: one removal per chain of its layout, forwarded along the chain
        (each retried for `timeout` seconds, default the client's retry timeout)."""
        def one(chain_id: int) -> None:
            def attempt(routing: RoutingInfo) -> None:
                path = routing.write_path(chain_id)
                if path:
                    self._bulk_storage(routing.target_node[path[0]]).remove_chunks(chain_id, inode_id, path[0])
            self._retrying(f"removal of file {inode_id}'s chunks on chain {chain_id}", attempt, timeout)

        for future in [self._pool.submit(one, chain) for chain in sorted(set(layout.chains))]:
            future.result()

    # ----------------------------------------------------------------------------- durability

    def sync_file(self, layout: Layout, inode_id: int, timeout: float | None = None) -> None:
        """Makes the file's acknowledged writes durable on every replica of its chains' write paths
        (``file_sync.sync_chains``: the nodes in parallel, with the bulk deadline; retried for `timeout`
        seconds, default the client's retry timeout, then ETIMEDOUT)."""
        sync_chains(layout.chains, self._routing, self._bulk_storage, self._syncs,
                    self._retry_timeout if timeout is None else timeout, RETRYABLE, f"file {inode_id}")

    # ----------------------------------------------------------------------------- lengths

    def file_length(self, layout: Layout, inode_id: int, timeout: float | None = None) -> int:
        """The file's exact length as storage holds it: the end of its last chunk with committed bytes,
        over every chain of the layout (each asked of its last serving target, then the others; one
        chunk-id range query each). Emptied chunks (a truncate) count for nothing."""
        def one(chain_id: int) -> int:
            def attempt(routing: RoutingInfo) -> int:
                targets = routing.readable_targets(chain_id)
                if not targets:
                    raise TargetNotServing(f"chain {chain_id} has no serving target")
                error: Exception | None = None
                for target in reversed(targets):  # the tail first: it commits first
                    try:
                        last = self._storage(routing.target_node[target]).last_chunk(chain_id, target, inode_id)
                    except RETRYABLE as exc:
                        error = exc
                        continue
                    return 0 if last is None else last[0] * layout.chunk_size + last[1]
                assert error is not None
                raise error
            return self._retrying(f"length of file {inode_id} on chain {chain_id}", attempt, timeout)

        chains = sorted(set(layout.chains))
        return max([one(chains[0])] + [f.result() for f in [self._pool.submit(one, c) for c in chains[1:]]])



def _read_into(service: Any, chain_id: int, target_id: int, chunk_id: ChunkId, offset: int,
               destination: ReplyBuffer) -> int:
    """One replica's ``read`` of [offset, offset + len(destination.view)) into `destination`; returns the
    count. An RPC proxy receives the reply's bytes into it (``RpcClient.call_into``), an in-process
    ``StorageService`` reads into it (``read_into``, under the destination's guard), anything else
    answers ``read`` and the bytes are copied in (under the guard). A revoked destination is left alone
    (the count is then meaningless: the caller stopped waiting for this request)."""
    length = len(destination.view)
    if hasattr(type(service), "call_into"):
        data = service.call_into(destination, "read", chain_id, target_id, chunk_id, offset, length)
        if destination.landed == len(data):
            return len(data)  # received in place
        return destination.write_with(lambda view: _copy_into(view, data))
    if getattr(type(service), "in_process", False):
        return destination.write_with(
            lambda view: service.read_into(chain_id, target_id, chunk_id, offset, view))
    data = service.read(chain_id, target_id, chunk_id, offset, length)
    return destination.write_with(lambda view: _copy_into(view, data))


def _copy_into(view: memoryview, data: bytes | memoryview) -> int:
    if len(data) > len(view):
        raise ValueError(f"a replica answered {len(data)} bytes for a read of {len(view)}")
    view[:len(data)] = data
    return len(data)
