"""``EmbeddedCluster``: mgmtd, a metadata service and the storage nodes of a 3FS in one process.

The default: zero set-up, everything under one directory, surviving a restart::

    root/cluster.json          the cluster's shape (nodes, targets, replicas, chunk size, stripe)
    root/meta.sqlite           the KV store (3FS uses FoundationDB): the metadata, and mgmtd's chain
                               table, target states and node addresses under MGMT/
    root/node-N/target-T/      one storage target's chunks and chunk metadata

A background thread plays the heartbeats: every storage node reports its targets' local states and
resyncs the syncing targets that follow its own, mgmtd marks silent nodes offline, the meta service ends
expired write sessions (taking their files' lengths from storage) and garbage collection deletes the
chunks of removed files (``client/garbage.py``). ``stop_node`` /
``start_node`` simulate a storage server dying and coming back (its peers get ``NodeUnavailable``);
for real process kills use ``ProcessCluster``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from storage.threefs.client.chunk_io import ChunkIO, RoutingCache
from storage.threefs.client.client import Client
from storage.threefs.client.garbage import collect_garbage
from storage.threefs.cluster.shape import ClusterShape, lock_directory, target_dir
from storage.threefs.errors import NodeUnavailable
from storage.threefs.kv import open_kv
from storage.threefs.meta.layout import LayoutPolicy
from storage.threefs.meta.service import MetaService
from storage.threefs.mgmtd.manager import Manager
from storage.threefs.mgmtd.routing import TargetState
from storage.threefs.mgmtd.state import import_state_file
from storage.threefs.storage.chunk_store import ChunkStore
from storage.threefs.storage.service import StorageService

MAINTENANCE_RETRY_SECONDS = 0.5  # a length query or chunk deletion in the heartbeat round gives up after this


class EmbeddedCluster:
    """A whole 3FS in this process.

    Args:
      root: the cluster's directory (created if missing; an existing cluster is reopened).
      shape: nodes, targets, replicas, chunk size, stripe (default ``ClusterShape()``; must match an
        existing cluster's).
      heartbeat_interval: seconds between heartbeats of the background thread (None: no thread; call
        ``tick`` yourself).
      heartbeat_timeout: seconds of silence before mgmtd marks a node's targets offline.
      session_lease: seconds a client's write session lives without renewal (its clients renew every
        third of that); the heartbeats end expired sessions, as 3FS's meta does for dead clients.
      chunk_sync_interval: seconds between each target's group-commit fsyncs (0: only when asked, by a
        client's fsync/close or ``ChunkStore.sync``).
    """

    def __init__(self, root: str | Path, shape: ClusterShape | None = None, *,
                 heartbeat_interval: float | None = 0.2, heartbeat_timeout: float = 2.0,
                 session_lease: float = 30.0, chunk_sync_interval: float = 0.05) -> None:
        self.root = Path(root).expanduser().resolve()
        self._locks = [lock_directory(self.root, "EmbeddedCluster")]
        self.shape = ClusterShape.load_or_create(self.root, shape)
        self.session_lease = session_lease
        self._chunk_sync_interval = chunk_sync_interval
        self._locks += [lock_directory(self.root / f"node-{node}", "EmbeddedCluster")
                        for node in self.shape.targets()]
        self._kv = open_kv(f"sqlite:///{self.root / 'meta.sqlite'}")
        import_state_file(self._kv, self.root / "mgmtd.json")  # a cluster made before mgmtd used the KV store
        self.manager = Manager(self._kv, heartbeat_timeout=heartbeat_timeout)  # the only one: it always leads
        if not self.manager.routing().chain_table.chains:
            self.manager.create_chains(self.shape.targets(), self.shape.replicas)
        self._maintenance_pool = ThreadPoolExecutor(4, thread_name_prefix="3fs-maintenance")
        self._maintenance_io = ChunkIO(RoutingCache(self.manager.routing, ttl=0.05), self.storage,
                                       self._maintenance_pool, retry_timeout=MAINTENANCE_RETRY_SECONDS)
        self.meta = MetaService(self._kv, lambda: self.manager.routing().chain_table,
                                LayoutPolicy(self.shape.chunk_size, self.shape.stripe),
                                storage_length=lambda inode: self._maintenance_io.file_length(inode.layout,
                                                                                              inode.inode_id))
        self.services: dict[int, StorageService] = {}
        self._stopped: set[int] = set()
        self._lock = threading.RLock()
        for node in self.shape.targets():
            self.start_node(node)
        self._closing = threading.Event()
        self._heartbeats = None
        if heartbeat_interval is not None:
            self._heartbeats = threading.Thread(target=self._beat, args=(heartbeat_interval,),
                                                name="3fs-heartbeats", daemon=True)
            self._heartbeats.start()

    def __repr__(self) -> str:
        return f"EmbeddedCluster({str(self.root)!r}, {self.shape})"

    # ----------------------------------------------------------------------------- nodes

    def storage(self, node: int) -> StorageService:
        """The storage service of a running node; NodeUnavailable for a stopped one (as over RPC)."""
        with self._lock:
            if node in self._stopped or node not in self.services:
                raise NodeUnavailable(f"storage node {node} of the embedded cluster at {self.root} is down")
            return self.services[node]

    def start_node(self, node: int) -> None:
        """(Re)starts a storage node on its directories, as a restarted server process would."""
        with self._lock:
            old = self.services.get(node)
            if old is not None and node not in self._stopped:
                return
            if old is not None:
                old.close_stores()
            targets = {t: ChunkStore(target_dir(self.root, node, t), sync_interval=self._chunk_sync_interval)
                       for t in self.shape.targets()[node]}
            self.services[node] = StorageService(node, targets, self.manager.routing, self.storage,
                                                 on_successor_failure=self.manager.mark_offline)
            self.manager.register_node(node, f"embedded://{self.root}/node-{node}")
            self._stopped.discard(node)

    def stop_node(self, node: int) -> None:
        """Simulates a dead storage server: no heartbeats, every request to it fails."""
        with self._lock:
            if node not in self.services:
                raise ValueError(f"node: expected one of {sorted(self.services)}, got {node}")
            self._stopped.add(node)

    # ----------------------------------------------------------------------------- heartbeats

    def tick(self) -> None:
        """One heartbeat round: every running node heartbeats (and resyncs its syncing successors),
        then mgmtd marks nodes that stayed silent offline, expired write sessions end and one garbage
        collection round runs (each step bounded by MAINTENANCE_RETRY_SECONDS of retries)."""
        with self._lock:
            running = [s for n, s in self.services.items() if n not in self._stopped]
        for service in running:
            try:
                service.tick(self.manager)
            except NodeUnavailable:
                pass  # a peer died mid-resync: the next round retries
        self.manager.check()
        self.meta.prune_sessions(self.session_lease)
        collect_garbage(self.meta, self._maintenance_io, timeout=MAINTENANCE_RETRY_SECONDS)

    def _beat(self, interval: float) -> None:
        while not self._closing.wait(interval):
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - keep beating; a failing round is retried next interval
                if self._closing.is_set():
                    return
                logging.getLogger(__name__).warning("3FS embedded heartbeat round failed: %s", error)

    def wait_until_serving(self, timeout: float = 30.0) -> None:
        """Blocks until every target is serving (after a restart or a resync); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.manager.routing().target_states
            if all(state is TargetState.SERVING for state in states.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not serving after {timeout} s: "
                                   f"{ {t: s.value for t, s in states.items() if s is not TargetState.SERVING} }")
            if self._heartbeats is None:
                self.tick()
            time.sleep(0.05)

    # ----------------------------------------------------------------------------- clients

    def client(self, **kwargs: Any) -> Client:
        """A client of this cluster (keyword arguments go to ``Client``)."""
        kwargs.setdefault("session_renew_interval", self.session_lease / 3)
        return Client(self.meta, self.manager.routing, self.storage, **kwargs)

    def close(self) -> None:
        """Stops the heartbeats and closes every store; the data stays under `root`."""
        self._closing.set()
        if self._heartbeats is not None:
            self._heartbeats.join()
        with self._lock:
            for service in self.services.values():
                service.close_stores()
        self._maintenance_pool.shutdown(wait=True)
        self._kv.close()
        for lock in self._locks:
            lock.close()

    def __enter__(self) -> EmbeddedCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
