"""A cluster's shape (nodes, targets, replicas, default layout), where its targets live, and directory locks.

The shape is stored as `root/cluster.json` when the cluster is created; reopening checks a request against it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
from pathlib import Path
from typing import IO

from storage.threefs.meta.layout import LayoutPolicy


@dataclasses.dataclass(frozen=True)
class ClusterShape:
    """How many storage nodes and targets, how chunks replicate, and the default file layout."""

    nodes: int = 3
    targets_per_node: int = 4
    replicas: int = 3
    chunk_size: int = 1 << 20
    stripe: int = 4

    def __post_init__(self) -> None:
        for field in ("nodes", "targets_per_node", "replicas", "stripe"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.replicas > self.nodes:
            raise ValueError(f"replicas ({self.replicas}) must be <= nodes ({self.nodes}): the replicas of a "
                             f"chain live on different nodes")
        LayoutPolicy(self.chunk_size, self.stripe)  # validates chunk_size

    def targets(self) -> dict[int, list[int]]:
        """node id -> its target ids (3FS style: node 1 holds targets 101, 102, ...)."""
        return {node: [node * 100 + i for i in range(1, self.targets_per_node + 1)]
                for node in range(1, self.nodes + 1)}

    @staticmethod
    def load_or_create(root: Path, requested: ClusterShape | None) -> ClusterShape:
        """The shape stored under `root`; a different explicit request for an existing cluster is an error."""
        path = root / "cluster.json"
        if path.exists():
            stored = ClusterShape(**json.loads(path.read_text()))
            if requested is not None and requested != stored:
                raise ValueError(f"shape: the cluster at {root} was created as {stored}, not {requested}")
            return stored
        shape = requested or ClusterShape()
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(shape)))
        return shape


def target_dir(root: Path, node: int, target: int) -> Path:
    return root / f"node-{node}" / f"target-{target}"


def lock_directory(directory: Path, owner: str) -> IO[bytes]:
    """Takes `directory`'s exclusive lock (released when the returned file closes or the process dies);
    a second cluster or server on the same directory would corrupt it, so it gets a clear error instead."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / "LOCK", "ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"{directory} is in use by another 3FS cluster or server (its LOCK is held); "
                           f"share one cluster between processes with ProcessCluster and 3fs+tcp:// instead of "
                           f"opening it twice ({owner})") from None
    return lock


@dataclasses.dataclass(frozen=True)
class ServerTimings:
    """Heartbeat and lease settings of a cluster's servers (seconds).

    heartbeat_interval: between a storage server's heartbeats (and mgmtd's checks for silent nodes).
    heartbeat_timeout: silence after which mgmtd marks a node's targets offline.
    session_lease: a client's write session lives this long without renewal (clients renew every third).
    chunk_sync_interval: between a storage target's group-commit fsyncs of what it wrote (a client's
      fsync/close syncs at once).
    """

    heartbeat_interval: float = 0.2
    heartbeat_timeout: float = 2.0
    session_lease: float = 30.0
    chunk_sync_interval: float = 0.05

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field.name} must be a number of seconds > 0, got {value!r}")
        if self.heartbeat_interval >= self.heartbeat_timeout:
            raise ValueError(f"heartbeat_interval ({self.heartbeat_interval}) must be < heartbeat_timeout "
                             f"({self.heartbeat_timeout})")

    def save(self, root: Path) -> None:
        """Writes ``root/timings.json`` (atomically) for the servers and clients of the cluster."""
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / "timings.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self)))
        tmp.replace(root / "timings.json")

    @staticmethod
    def load(root: Path) -> ServerTimings:
        """The timings stored under `root` (the defaults if none are)."""
        path = root / "timings.json"
        return ServerTimings(**json.loads(path.read_text())) if path.exists() else ServerTimings()
