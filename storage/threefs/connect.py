"""``connect(url)``: one entry point for every way to reach a 3FS.

=============================  ==============================================================================
``3fs+embedded:///abs/dir``    an ``EmbeddedCluster`` in this process, under that directory (created on first
                               use); ``3fs+embedded://`` alone uses ``$XDG_CACHE_HOME/jaxseek/3fs`` (else
                               ``~/.cache/jaxseek/3fs``). Clients of one directory in one process share it.
``3fs+tcp:///abs/dir``         the server processes of a ``ProcessCluster`` / ``python -m storage.threefs
                               serve`` rooted at that directory (they publish their addresses there)
``3fs:///mount/point``         a real 3FS FUSE mount (``MountClient``: USRBIO through ``hf3fs_fuse.io`` when
                               importable, POSIX IO otherwise)
=============================  ==============================================================================
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from storage.threefs.client.client import Client
from storage.threefs.cluster import EmbeddedCluster
from storage.threefs.client.file_api import FileClient
from storage.threefs.client.mount import MountClient


def default_embedded_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "jaxseek" / "3fs"


class EmbeddedClusters:
    """The embedded clusters this process has open, shared by the clients of one root and closed
    when the last of them closes (two clusters on one directory would corrupt it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Path, tuple[EmbeddedCluster, int]] = {}

    def client(self, root: Path, **client_kwargs) -> Client:
        root = root.expanduser().resolve()
        with self._lock:
            cluster, users = self._open.get(root, (None, 0))
            if cluster is None:
                cluster = EmbeddedCluster(root)
            self._open[root] = (cluster, users + 1)
        return cluster.client(on_close=lambda: self._release(root), **client_kwargs)

    def _release(self, root: Path) -> None:
        with self._lock:
            cluster, users = self._open[root]
            if users > 1:
                self._open[root] = (cluster, users - 1)
                return
            del self._open[root]
        cluster.close()


# The process-wide registry: embedded clusters are process resources, like open files.
EMBEDDED = EmbeddedClusters()


def connect(url: str = "3fs+embedded://", **client_kwargs) -> FileClient:
    """A file client for `url` (see the module docstring); keyword arguments go to ``Client``."""
    scheme, separator, rest = url.partition("://")  # urlparse rejects schemes that start with a digit
    host, slash, path = rest.partition("/")
    if not separator or host not in ("", "localhost"):
        raise ValueError(f"url: expected scheme:///absolute/path with an empty host, got {url!r}")
    path = slash + path
    if scheme == "3fs+embedded":
        return EMBEDDED.client(Path(path) if path not in ("", "/") else default_embedded_root(), **client_kwargs)
    if scheme == "3fs+tcp":
        from storage.threefs.cluster.processes import connect_processes
        if not path.startswith("/"):
            raise ValueError(f"url: 3fs+tcp needs the cluster's absolute root directory, got {url!r}")
        return connect_processes(Path(path), **client_kwargs)
    if scheme == "3fs":
        if not path.startswith("/"):
            raise ValueError(f"url: 3fs needs the absolute mount point, got {url!r}")
        return MountClient(path)
    raise ValueError(f"url: expected a 3fs+embedded://, 3fs+tcp:// or 3fs:// URL, got {url!r}")
