"""3FS as separate server processes on loopback TCP, so faults are real (``kill -9`` a server, SIGSTOP one).

``ProcessCluster`` starts mgmtd (a leader and, by default, one standby), a meta server and the storage
servers (``servers.py``) as child processes and kills, pauses, resumes and restarts any of them by name;
``connect_processes(root)`` (what ``connect("3fs+tcp:///DIR")`` calls) is a client of such a cluster. A
client follows the mgmtd leader and the meta server to new addresses (a failover, a restart).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from storage.threefs.client.chunk_io import RoutingCache
from storage.threefs.client.client import Client
from storage.threefs.cluster.deadlines import RequestDeadlines
from storage.threefs.cluster.servers import (MGMTD_LEADER, Proxies, address_file, meta_client, mgmtd_client,
                                             read_address, storage_of)
from storage.threefs.cluster.shape import ClusterShape, ServerTimings
from storage.threefs.net.auth import load_or_create_secret


def connect_processes(root: Path, **client_kwargs) -> Client:
    """A client of the server processes rooted at `root`; its storage requests have the data deadline of
    the cluster's timings (``deadlines.py``), its reads are hedged."""
    root = Path(root)
    timings = ServerTimings.load(root)
    read_address(root, MGMTD_LEADER)  # waits for a cluster that is starting
    read_address(root, "meta")
    mgmtd, meta = mgmtd_client(root, timings), meta_client(root)
    deadlines = RequestDeadlines.from_timings(timings)
    routing = RoutingCache(mgmtd.routing)
    proxies, bulk_proxies = Proxies(root, deadlines.data), Proxies(root, deadlines.bulk)

    def close() -> None:
        proxies.close()
        bulk_proxies.close()
        mgmtd.disconnect()
        meta.disconnect()

    client_kwargs.setdefault("session_renew_interval", timings.session_lease / 3)
    client_kwargs.setdefault("hedge_delay", deadlines.hedge_delay)
    return Client(meta, mgmtd.routing, storage_of(routing.get, proxies), on_close=close,
                  bulk_storage=storage_of(routing.get, bulk_proxies), **client_kwargs)


class ProcessCluster:
    """Starts mgmtd (and its standbys), one meta server and the storage servers of `shape` as child processes.

    Servers are named "mgmtd", "mgmtd-2", ... (the first mgmtd leads at the start, the others stand by
    and one takes over when the leader's lease lapses), "meta" and "storage-N" (N the node id; an int N
    means "storage-N").
    ``kill(name)`` sends SIGKILL (no clean-up, like a crash) and waits for the process to die; ``pause`` /
    ``resume`` send SIGSTOP / SIGCONT (a hung server); ``start(name)`` (re)starts a server on its
    directories (it listens on a new port). ``close`` terminates everything; the data stays under `root`.

    Args:
      root: the cluster's directory (created if missing; an existing cluster is reopened).
      shape: as for ``EmbeddedCluster`` (must match an existing cluster's).
      timings: heartbeat and lease settings for every server (default ``ServerTimings()``), stored in
        ``root/timings.json`` for the servers and clients to read.
      mgmtd_standbys: how many standby mgmtd servers run besides the first (0: mgmtd is a single server).
    """

    def __init__(self, root: str | Path, shape: ClusterShape | None = None,
                 timings: ServerTimings | None = None, mgmtd_standbys: int = 1) -> None:
        if not isinstance(mgmtd_standbys, int) or mgmtd_standbys < 0:
            raise ValueError(f"mgmtd_standbys must be an int >= 0, got {mgmtd_standbys!r}")
        self.root = Path(root).resolve()
        self.shape = ClusterShape.load_or_create(self.root, shape)
        self.timings = timings or ServerTimings()
        self.timings.save(self.root)
        load_or_create_secret(self.root)  # before any server starts: they all read this one secret
        self._log_dir = self.root / "logs"
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.mgmtd_names = ("mgmtd", *(f"mgmtd-{i}" for i in range(2, mgmtd_standbys + 2)))
        address_file(self.root, MGMTD_LEADER).unlink(missing_ok=True)  # servers wait for this run's leader
        try:
            for name in self.mgmtd_names:
                self.start(name)
            for node in self.shape.targets():
                self.start(node)
            self.start("meta")
        except BaseException:
            self.close()
            raise

    def _name(self, server: str | int) -> str:
        name = f"storage-{server}" if isinstance(server, int) else server
        role, _, node = name.partition("-")
        valid = (role == "meta" and not node or role == "mgmtd" and name in self.mgmtd_names
                 or role == "storage" and node.isdigit() and int(node) in self.shape.targets())
        if not valid:
            raise ValueError(f"server: expected one of {list(self.mgmtd_names)}, 'meta', a storage node id or "
                             f"'storage-N' with N in {sorted(self.shape.targets())}, got {server!r}")
        return name

    def start(self, server: str | int) -> None:
        """(Re)starts a server and waits until it listens."""
        name = self._name(server)
        old = self.processes.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"the {name} server is running (pid {old.pid}); kill it first")
        address_file(self.root, name).unlink(missing_ok=True)
        role, _, node = name.partition("-")
        command = [sys.executable, "-m", "storage.threefs", "serve", "--root", str(self.root), "--role", role]
        if role == "mgmtd":
            command += ["--name", name]
        elif node:
            command += ["--node", node]
        log = open(self._log_dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        read_address(self.root, name, process=self.processes[name])

    def kill(self, server: str | int, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` (SIGKILL by default) to a server and waits for it to exit."""
        process = self.processes[self._name(server)]
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server must run to act on the signal
            process.send_signal(sig)
        process.wait()

    def pause(self, server: str | int) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers) until ``resume``."""
        self.processes[self._name(server)].send_signal(signal.SIGSTOP)

    def resume(self, server: str | int) -> None:
        """SIGCONT after ``pause``."""
        self.processes[self._name(server)].send_signal(signal.SIGCONT)

    def mgmtd_leader(self) -> str | None:
        """The name of the mgmtd server whose address is published as the leader's (None if none is)."""
        leader = address_file(self.root, MGMTD_LEADER)
        address = leader.read_text().strip() if leader.exists() else None
        for name in self.mgmtd_names:
            own = address_file(self.root, name)
            if address and own.exists() and own.read_text().strip() == address:
                return name
        return None

    def client(self, **client_kwargs) -> Client:
        return connect_processes(self.root, **client_kwargs)

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> ProcessCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
