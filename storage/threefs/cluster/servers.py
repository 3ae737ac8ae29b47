"""The 3FS server processes: ``python -m storage.threefs serve --root DIR --role mgmtd|meta|storage [--node N]``.

The root directory is the cluster's rendezvous: ``cluster.json`` (its shape), ``timings.json`` (heartbeat
and lease settings, ``ServerTimings``), ``meta.sqlite`` (the KV store: the metadata, shared by any number
of meta servers, each also collecting garbage and asking storage for file lengths, and mgmtd's state and
leadership lease under ``MGMT/``), ``secret`` (the cluster's secret: only a process that can read it may call a
server, see ``net/auth.py``) and ``addresses/<name>.addr``,
where each server publishes its ``host:port`` once it listens; the mgmtd that wins the leadership lease
also publishes ``addresses/mgmtd-leader.addr``.

mgmtd: any number run (``--name mgmtd``, ``mgmtd-2``, ...); one leads, elected through KV transactions
(``mgmtd/election.py``), the others stand by and take over when its lease lapses. Storage servers
heartbeat to the leader and serve on the routing their last heartbeat returned, under a lease of
heartbeat_timeout / 2 (``storage/routing_lease.py``): mgmtd is off the data path, and a server that cannot
reach mgmtd fences itself before mgmtd could declare it offline. Every server and client finds the mgmtd
leader and the meta server through ``ResolvingClient`` (``net/resolving.py``), so a restarted one (new
port) or a new leader is found again. Storage servers register their address with mgmtd (a restarted
server gets a new port; peers and clients find it through routing) and call their peers with the
deadlines of ``deadlines.py`` (short on the data path, long for resync and chunk removal). ``processes.py``
launches these servers; ``connect("3fs+tcp:///DIR")`` is a client of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.threefs.client.chunk_io import RoutingCache
from storage.threefs.cluster.deadlines import RequestDeadlines
from storage.threefs.cluster.shape import ClusterShape, ServerTimings, lock_directory, target_dir
from storage.threefs.net.auth import load_or_create_secret
from storage.threefs.errors import NodeUnavailable
from storage.threefs.net.resolving import ResolvingClient
from storage.threefs.net.transport import RpcClient, RpcServer
from storage.threefs.net.wire_types import threefs_codec

GC_INTERVAL_SECONDS = 0.5         # between the meta server's garbage-collection rounds
META_STORAGE_RETRY_SECONDS = 2.0  # how long the meta server's storage requests retry (lengths, deletions)

MGMTD_LEADER = "mgmtd-leader"  # the address file of the mgmtd that holds the leadership lease
# mgmtd calls that may run twice: resent to a new leader after any transport failure
MGMTD_IDEMPOTENT = ("routing", "heartbeat", "register_node", "mark_offline", "local_state")
# what a mgmtd server exposes (not campaign/resign: leadership is its own process's business)
MGMTD_METHODS = {"routing", "heartbeat", "register_node", "mark_offline", "sync_done", "check", "local_state",
                 "create_chains"}


STORAGE_VIEW_METHODS = frozenset({"write", "update", "full_chunk_replace"})  # payloads straight from the request buffer


def address_file(root: Path, name: str) -> Path:
    return root / "addresses" / f"{name}.addr"


def publish_address(root: Path, name: str, address: str) -> None:
    path = address_file(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(address)
    os.replace(tmp, path)


def read_address(root: Path, name: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> str:
    """The published address of server `name`, waiting up to `timeout` seconds for it to appear (and
    failing at once if its `process` exits first)."""
    path, deadline = address_file(root, name), time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the {name} server exited with code {process.returncode} before listening; "
                               f"see {root / 'logs' / (name + '.log')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {name} server published its address under {root} within {timeout} s")
        time.sleep(0.02)
    return path.read_text().strip()


def cluster_client(root: Path, address: str, timeout: float | None = 30.0) -> RpcClient:
    """An RPC client of the server at `address` of the cluster at `root` (its codec and its secret)."""
    return RpcClient(address, timeout=timeout, codec=threefs_codec(), secret=load_or_create_secret(root))


def resolve_address(root: Path, name: str) -> str:
    """The address server `name` published last; NodeUnavailable if none is published (no waiting)."""
    try:
        return address_file(root, name).read_text().strip()
    except FileNotFoundError:
        raise NodeUnavailable(f"no {name} server has published its address under {root}") from None


def rpc_timeout(timings: ServerTimings) -> float:
    """Reply timeout of calls to mgmtd: half a heartbeat timeout (a hung mgmtd is given up on, and its
    standby found, before a storage server's routing lease lapses twice), at least 0.25 s."""
    return max(timings.heartbeat_timeout / 2, 0.25)


def mgmtd_client(root: Path, timings: ServerTimings) -> ResolvingClient:
    """A client of the cluster's mgmtd leader, wherever it listens now."""
    timeout = rpc_timeout(timings)
    return ResolvingClient(lambda: resolve_address(root, MGMTD_LEADER), lambda a: cluster_client(root, a, timeout),
                           idempotent=MGMTD_IDEMPOTENT)


def meta_client(root: Path) -> ResolvingClient:
    """A client of the cluster's meta server, wherever it listens now (its calls are resent only when
    they cannot have reached it)."""
    return ResolvingClient(lambda: resolve_address(root, "meta"), lambda a: cluster_client(root, a))


class Proxies:
    """One RPC client per address of the cluster at `root`, made on first use; each call may take `timeout`
    seconds (its deadline, ``deadlines.py``)."""

    def __init__(self, root: Path, timeout: float = 30.0) -> None:
        self._root = root
        self._timeout = timeout
        self._lock = threading.Lock()
        self._clients: dict[str, RpcClient] = {}

    def get(self, address: str) -> RpcClient:
        with self._lock:
            if address not in self._clients:
                self._clients[address] = cluster_client(self._root, address, self._timeout)
            return self._clients[address]

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.disconnect()
            self._clients.clear()


def storage_of(routing: Callable[[], Any], proxies: Proxies):
    """node id -> the RPC proxy of that storage node, by its address in `routing()` (mgmtd's routing)."""
    return lambda node: proxies.get(routing().node_addresses[node])


# ----------------------------------------------------------------------------- the servers


def _serve_mgmtd(root: Path, timings: ServerTimings, name: str) -> Any:
    """A mgmtd member: a standby until it wins the leadership lease (see ``_lead``)."""
    from storage.threefs.kv import open_kv
    from storage.threefs.mgmtd.election import LeaderElection
    from storage.threefs.mgmtd.manager import Manager
    from storage.threefs.mgmtd.state import import_state_file
    kv = open_kv(f"sqlite:///{root / 'meta.sqlite'}")
    import_state_file(kv, root / "mgmtd.json")  # a cluster made before mgmtd kept its state in the KV store
    election = LeaderElection(kv, f"{name}@{os.getpid()}", lease_seconds=timings.heartbeat_timeout)
    return Manager(kv, heartbeat_timeout=timings.heartbeat_timeout, election=election)


def _lead(root: Path, shape: ClusterShape, timings: ServerTimings, manager: Any, address: str) -> _Every:
    """Campaigns now and then every heartbeat interval; while leading, publishes the leader's address,
    creates the chain table of a new cluster and marks silent nodes offline. Returns the loop's thread."""
    def round_() -> None:
        if not manager.campaign(address):
            return
        leader_file = address_file(root, MGMTD_LEADER)
        if not leader_file.exists() or leader_file.read_text().strip() != address:
            publish_address(root, MGMTD_LEADER, address)
        if not manager.routing().chain_table.chains:
            manager.create_chains(shape.targets(), shape.replicas)
        manager.check()

    try:
        round_()
    except Exception as exc:  # noqa: BLE001 - the loop tries again
        print(f"mgmtd: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return _every(timings.heartbeat_interval, round_)


def _serve_meta(root: Path, shape: ClusterShape, timings: ServerTimings, mgmtd: Any) -> tuple[Any, list[_Every]]:
    """The meta service, which also asks storage for file lengths (closing and pruning sessions) and
    collects garbage in the background, so it holds a routing cache and storage proxies as clients do."""
    from concurrent.futures import ThreadPoolExecutor
    from storage.threefs.client.chunk_io import ChunkIO
    from storage.threefs.client.garbage import collect_garbage
    from storage.threefs.kv import open_kv
    from storage.threefs.meta.layout import LayoutPolicy
    from storage.threefs.meta.service import MetaService
    routing, deadlines = RoutingCache(mgmtd.routing), RequestDeadlines.from_timings(timings)
    chunk_io = ChunkIO(routing, storage_of(routing.get, Proxies(root, deadlines.data)),
                       ThreadPoolExecutor(8, thread_name_prefix="3fs-meta-io"), retry_timeout=META_STORAGE_RETRY_SECONDS,
                       bulk_storage=storage_of(routing.get, Proxies(root, deadlines.bulk)))
    meta = MetaService(open_kv(f"sqlite:///{root / 'meta.sqlite'}"), lambda: routing.get().chain_table,
                       LayoutPolicy(shape.chunk_size, shape.stripe),
                       storage_length=lambda inode: chunk_io.file_length(inode.layout, inode.inode_id))
    return meta, [_every(1.0, lambda: meta.prune_sessions(timings.session_lease)),
                  _every(GC_INTERVAL_SECONDS, lambda: collect_garbage(meta, chunk_io))]


def _serve_storage(root: Path, shape: ClusterShape, timings: ServerTimings, node: int,
                   mgmtd: Any) -> tuple[Any, Callable[[], None]]:
    """The storage service of `node` and its heartbeat (which renews its routing lease)."""
    from storage.threefs.storage.chunk_store import ChunkStore
    from storage.threefs.storage.routing_lease import LeasedManager, RoutingLease
    from storage.threefs.storage.service import StorageService
    if node not in shape.targets():
        raise ValueError(f"--node: expected one of {sorted(shape.targets())}, got {node}")
    deadlines = RequestDeadlines.from_timings(timings)
    lease = RoutingLease(timings.heartbeat_timeout / 2)
    proxies, bulk_proxies = Proxies(root, deadlines.peer), Proxies(root, deadlines.bulk)
    manager = LeasedManager(mgmtd, lease)
    targets = {t: ChunkStore(target_dir(root, node, t), sync_interval=timings.chunk_sync_interval)
               for t in shape.targets()[node]}
    service = StorageService(node, targets, lease.routing, storage_of(lease.last_routing, proxies),
                             on_successor_failure=manager.mark_offline,
                             bulk_peer=storage_of(lease.last_routing, bulk_proxies))
    return service, lambda: service.tick(manager)


class _Every(threading.Thread):
    """Runs `fn` every `interval` seconds until ``stop()`` (a failing round is reported and retried)."""

    def __init__(self, interval: float, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._interval, self._fn, self._stopping = interval, fn, threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._fn()
            except Exception as exc:  # noqa: BLE001 - a server keeps beating through transient failures
                print(f"heartbeat: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Ends the loop and waits for a round in progress (a mgmtd's campaign must not follow its resign)."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=10)


def _every(interval: float, fn: Callable[[], Any]) -> _Every:
    return _Every(interval, fn)


def serve(root: Path, role: str, node: int | None = None, name: str | None = None) -> None:
    """Runs one server in this process until SIGTERM/SIGINT (the `serve` command). `name`: a mgmtd's
    name ("mgmtd", "mgmtd-2", ...; default "mgmtd")."""
    root = root.resolve()
    shape = ClusterShape.load_or_create(root, None)
    timings = ServerTimings.load(root)
    threads: list[_Every] = []
    held = None
    if role == "mgmtd":
        name = name or "mgmtd"
        obj, allowed = _serve_mgmtd(root, timings, name), MGMTD_METHODS
    elif role == "meta":
        (obj, threads), name, allowed = _serve_meta(root, shape, timings, mgmtd_client(root, timings)), "meta", None
    elif role == "storage":
        if node is None:
            raise ValueError("--node: a storage server needs its node id")
        held = lock_directory(root / f"node-{node}", f"storage server {node}")  # for the server's lifetime
        read_address(root, MGMTD_LEADER)  # wait for a leader to be elected
        mgmtd = mgmtd_client(root, timings)
        obj, heartbeat = _serve_storage(root, shape, timings, node, mgmtd)
        name, allowed = f"storage-{node}", None
    else:
        raise ValueError(f"--role: expected mgmtd, meta or storage, got {role!r}")
    views = STORAGE_VIEW_METHODS if role == "storage" else frozenset()
    server = RpcServer(obj, allowed=allowed, codec=threefs_codec(), secret=load_or_create_secret(root),
                       view_methods=views).serve_in_thread()
    if role == "mgmtd":
        threads = [_lead(root, shape, timings, obj, server.address)]
    if role == "storage":
        _retry_until(lambda: mgmtd.register_node(node, server.address), timeout=30.0, what="register with mgmtd")
        _retry_until(heartbeat, timeout=30.0, what="send a first heartbeat")  # serve on a routing lease at once
        threads = [_every(timings.heartbeat_interval, heartbeat)]
    for thread in threads:
        thread.start()
    publish_address(root, name, server.address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for thread in threads:
        thread.stop()
    if role == "mgmtd":
        obj.resign()  # a standby takes over now, not when the lease would have run out
    server.shutdown()
    if held is not None:
        held.close()


def _retry_until(fn: Callable[[], Any], timeout: float, what: str) -> None:
    """Calls `fn` until it succeeds (a leader may be being elected); the last error after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline, then raised
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not {what} within {timeout} s") from exc
            time.sleep(0.05)
