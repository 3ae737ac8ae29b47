"""The 3FS server processes: ``python -m storage.threefs serve --root DIR --role mgmtd|meta|storage [--node N]``.

The root directory is the cluster's rendezvous: ``cluster.json`` (its shape), ``timings.json`` (heartbeat
and lease settings, ``ServerTimings``), ``mgmtd.json`` (mgmtd's state), ``meta.sqlite`` (the metadata KV,
shared by any number of meta servers) and ``addresses/<name>.addr``, where each server publishes its
``host:port`` once it listens. Storage servers heartbeat to mgmtd, resync their syncing successors, and
register their address with mgmtd (a restarted server gets a new port; peers and clients find it through
routing). Storage servers call their peers with the deadlines of ``deadlines.py`` (short on the data
path, long for resync and chunk removal). ``processes.py`` launches these servers; ``connect("3fs+tcp:///DIR")`` is a client of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from storage.threefs.client.chunk_io import RoutingCache
from storage.threefs.cluster.deadlines import RequestDeadlines
from storage.threefs.cluster.shape import ClusterShape, ServerTimings, lock_directory, target_dir
from storage.threefs.net.transport import RpcClient, RpcServer


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


class Proxies:
    """One RPC client per address, made on first use; each call may take `timeout` seconds (its deadline,
    ``deadlines.py``)."""

    def __init__(self, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._clients: dict[str, RpcClient] = {}

    def get(self, address: str) -> RpcClient:
        with self._lock:
            if address not in self._clients:
                self._clients[address] = RpcClient(address, self._timeout)
            return self._clients[address]

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.disconnect()
            self._clients.clear()


def storage_of(routing: RoutingCache, proxies: Proxies):
    """node id -> the RPC proxy of that storage node, by its address in mgmtd's routing."""
    return lambda node: proxies.get(routing.get().node_addresses[node])


# ----------------------------------------------------------------------------- the servers


def _serve_mgmtd(root: Path, shape: ClusterShape, timings: ServerTimings) -> tuple[Any, list[threading.Thread]]:
    from storage.threefs.mgmtd.manager import Manager
    manager = Manager(root / "mgmtd.json", heartbeat_timeout=timings.heartbeat_timeout)
    if not manager.routing().chain_table.chains:
        manager.create_chains(shape.targets(), shape.replicas)
    return manager, [_every(timings.heartbeat_interval, manager.check)]


def _serve_meta(root: Path, shape: ClusterShape, timings: ServerTimings, mgmtd: RpcClient) -> tuple[Any, list[threading.Thread]]:
    from storage.threefs.kv import open_kv
    from storage.threefs.meta.layout import LayoutPolicy
    from storage.threefs.meta.service import MetaService
    routing = RoutingCache(mgmtd.routing)
    meta = MetaService(open_kv(f"sqlite:///{root / 'meta.sqlite'}"), lambda: routing.get().chain_table,
                       LayoutPolicy(shape.chunk_size, shape.stripe))
    return meta, [_every(1.0, lambda: meta.prune_sessions(timings.session_lease))]


def _serve_storage(root: Path, shape: ClusterShape, timings: ServerTimings, node: int, mgmtd: RpcClient) -> tuple[Any, list]:
    from storage.threefs.storage.chunk_store import ChunkStore
    from storage.threefs.storage.service import StorageService
    if node not in shape.targets():
        raise ValueError(f"--node: expected one of {sorted(shape.targets())}, got {node}")
    deadlines = RequestDeadlines.from_timings(timings)
    routing, proxies = RoutingCache(mgmtd.routing, ttl=0.05), Proxies(deadlines.peer)
    bulk_proxies = Proxies(deadlines.bulk)
    targets = {t: ChunkStore(target_dir(root, node, t)) for t in shape.targets()[node]}

    def successor_failed(target: int) -> None:
        mgmtd.mark_offline(target)
        routing.invalidate()

    service = StorageService(node, targets, routing.get, storage_of(routing, proxies),
                             on_successor_failure=successor_failed, bulk_peer=storage_of(routing, bulk_proxies))

    def heartbeat() -> None:
        service.tick(mgmtd)
        routing.invalidate()

    return service, [_every(timings.heartbeat_interval, heartbeat)]


def _every(interval: float, fn) -> threading.Thread:
    def loop() -> None:
        while True:
            time.sleep(interval)
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a server keeps beating through transient failures
                print(f"heartbeat: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return threading.Thread(target=loop, daemon=True)


def serve(root: Path, role: str, node: int | None = None) -> None:
    """Runs one server in this process until SIGTERM/SIGINT (the `serve` command)."""
    root = root.resolve()
    shape = ClusterShape.load_or_create(root, None)
    timings = ServerTimings.load(root)
    threads: list[threading.Thread] = []
    held = None
    if role == "mgmtd":
        obj, threads = _serve_mgmtd(root, shape, timings)
        name = "mgmtd"
    elif role == "meta":
        (obj, threads), name = _serve_meta(root, shape, timings, RpcClient(read_address(root, "mgmtd"))), "meta"
    elif role == "storage":
        if node is None:
            raise ValueError("--node: a storage server needs its node id")
        held = lock_directory(root / f"node-{node}", f"storage server {node}")  # for the server's lifetime
        mgmtd = RpcClient(read_address(root, "mgmtd"))
        obj, threads = _serve_storage(root, shape, timings, node, mgmtd)
        name = f"storage-{node}"
    else:
        raise ValueError(f"--role: expected mgmtd, meta or storage, got {role!r}")
    server = RpcServer(obj).serve_in_thread()
    if role == "storage":
        mgmtd.register_node(node, server.address)
    for thread in threads:
        thread.start()
    publish_address(root, name, server.address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    if held is not None:
        held.close()


