"""``open_location(url)``: a storage URL -> the file client that reaches it and the path inside it.

jaxseek keeps checkpoints, tables, training records and KV-cache pages at a *location*: a directory in
some file system reached through the ``FileClient`` protocol (``storage/threefs/client/file_api.py``):

==================================  ===========================================================================
``3fs+embedded:///CLUSTER[/PATH]``  an embedded 3FS (``EmbeddedCluster``) rooted at CLUSTER, in this process
``3fs+tcp:///CLUSTER[/PATH]``       the server processes of a 3FS rooted at CLUSTER (``python -m storage.threefs
                                    serve`` / ``ProcessCluster``)
``3fs:///MOUNT/PATH``               a 3FS FUSE mount (``python -m storage.threefs mount``, or a real hf3fs_fuse)
``/abs/dir``, ``file:///abs/dir``   a plain directory (POSIX IO)
==================================  ===========================================================================

For the two cluster schemes the cluster root is the nearest directory at or above the URL's path that
holds a ``cluster.json``; the rest of the path is the directory inside that 3FS
(``3fs+embedded:///runs/a/3fs/tables/t`` is ``/tables/t`` in the cluster at ``/runs/a/3fs``). Where no
such directory exists, ``create=True`` makes the URL's whole path a new embedded cluster (its own
directory ``/``); without it the call raises ``ValueError`` naming the URL. Mounts and plain
directories are used as they are (created with ``create=True``).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import NamedTuple

from storage.threefs.client.file_api import FileClient
from storage.threefs.client.mount import MountClient
from storage.threefs.connect import connect

CLUSTER_SCHEMES = ("3fs+embedded", "3fs+tcp")
CLUSTER_MARKER = "cluster.json"


class Location(NamedTuple):
    """A directory reached through a file client. Closing it closes the client."""

    client: FileClient
    path: str  # the directory inside the client's namespace: absolute, '/'-separated, no trailing '/'
    url: str  # what it was opened from, for messages

    def join(self, *parts: str) -> str:
        """The client path of ``parts`` under this location (``join('ckpt', '7')`` -> '/run/ckpt/7')."""
        return posixpath.join(self.path, *parts) if parts else self.path

    def child(self, *parts: str) -> "Location":
        """The location of a subdirectory, on the same client (closing either closes the client)."""
        joined = self.join(*parts)
        return Location(self.client, joined, self.url.rstrip("/") + "/" + "/".join(parts))

    @property
    def os_path(self) -> str | None:
        """The directory as an OS path when the client is POSIX (a plain directory or a mount), else None:
        tools that take only paths (TensorStore under Orbax, polars' native readers) can use it directly."""
        if isinstance(self.client, MountClient):
            return os.path.join(self.client.mount_point, self.path.lstrip("/"))
        return None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Location":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def split_url(url: str) -> tuple[str, str]:
    """(scheme, absolute path): ``""`` as the scheme for a plain path; raises ValueError on a malformed URL."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"url: expected a str or path, got {type(url).__name__}")
    url = os.fspath(url)
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "", os.path.abspath(os.path.expanduser(url))
    if scheme not in CLUSTER_SCHEMES + ("3fs", "file"):
        raise ValueError(f"url: unknown scheme {scheme!r} in {url!r}; expected one of "
                         f"{', '.join(CLUSTER_SCHEMES + ('3fs', 'file'))} or a plain path")
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost") or not slash:
        raise ValueError(f"url: expected {scheme}:///absolute/path (no host), got {url!r}")
    scheme = "" if scheme == "file" else scheme
    return scheme, posixpath.normpath("/" + path)


def find_cluster_root(path: str) -> tuple[Path, str] | None:
    """(cluster root, path inside it) for the nearest directory at or above ``path`` holding a cluster."""
    candidate = Path(path)
    for root in (candidate, *candidate.parents):
        if (root / CLUSTER_MARKER).is_file():
            inner = candidate.relative_to(root).as_posix()
            return root, "/" if inner == "." else "/" + inner
    return None


def open_location(url: str | os.PathLike, *, create: bool = False, **client_kwargs) -> Location:
    """The ``Location`` ``url`` names (see the module docstring); ``client_kwargs`` go to a 3FS ``Client``.

    With ``create`` a missing plain directory or mount subdirectory is made, and a cluster URL with no
    cluster at or above its path starts an embedded one there; the location's directory is created too.
    """
    scheme, path = split_url(url)
    url = os.fspath(url)
    if scheme in ("", "3fs"):
        if create:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(path):
            raise ValueError(f"url: {url!r} is not a directory" + ("" if os.path.exists(path) else " (it does not exist)"))
        return Location(MountClient(path), "/", url)
    found = find_cluster_root(path)
    if found is None:
        if not create or scheme != "3fs+embedded":
            raise ValueError(f"url: no 3FS cluster ({CLUSTER_MARKER}) at or above {path} for {url!r}"
                             + ("; only 3fs+embedded:// starts one" if create else ""))
        found = (Path(path), "/")
    root, inner = found
    client = connect(f"{scheme}://{root}", **client_kwargs)
    try:
        if inner != "/":
            if create:
                client.makedirs(inner, exist_ok=True)
            elif not client.exists(inner):
                raise ValueError(f"url: {inner} does not exist in the 3FS at {root} (from {url!r})")
    except BaseException:
        client.close()
        raise
    return Location(client, inner, url)
