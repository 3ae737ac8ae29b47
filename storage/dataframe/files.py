"""File IO on storage URLs for the DataFrame's tasks: parquet/CSV reads, atomic writes, listings.

Every path the DataFrame handles is a full storage URL (``storage.location``): a plain path or
``file://`` URL, ``3fs:///MOUNT/PATH`` (a FUSE mount: plain OS files), ``3fs+tcp:///CLUSTER/PATH`` (a 3FS
served by its own processes) or ``3fs+embedded:///CLUSTER/PATH`` (a 3FS inside this process).

``StorageFiles`` opens one client per cluster root and keeps it until ``close``; POSIX paths go straight
to the OS (polars' native parquet reader on the path). A write is *atomic*: the bytes go to a hidden
temporary sibling (``.NAME.tmp-<random>``) that is renamed over the target, so a reader finds the old
file, the whole new one, or nothing, never a part; a crashed writer leaves only a hidden temporary.

An embedded 3FS is owned by one process (its directory lock): a process that does not own it cannot
open it. ``is_process_local(url)`` says which URLs those are; executors running tasks in other processes
ship such inputs and outputs as bytes through the driver (``shipped.py``).
"""

from __future__ import annotations

import glob
import io
import os
import posixpath
import uuid
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from storage.location import CLUSTER_SCHEMES, find_cluster_root, split_url
from storage.threefs.client.file_api import FileClient
from storage.threefs.client.mount import MountClient
from storage.threefs.connect import connect

EMBEDDED_SCHEME = "3fs+embedded"


def is_process_local(url: str) -> bool:
    """Whether ``url`` is reachable only from the process that owns it (an embedded 3FS)."""
    return split_url(url)[0] == EMBEDDED_SCHEME


def join_url(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended as path components (works for plain paths and scheme URLs)."""
    return posixpath.join(url.rstrip("/") if url != "/" else url, *parts)


def is_hidden(name: str) -> bool:
    """Names that readers skip: temporaries, staging directories, markers (as polars and pyarrow do)."""
    return name[:1] in "._"


class StorageFiles:
    """Reads and writes files named by storage URLs; one open client per 3FS cluster root.

    Not thread-safe; one per task or per driver. ``close`` closes the clients it opened.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], FileClient] = {}
        self._posix = MountClient("/")

    def resolve(self, url: str) -> tuple[FileClient, str]:
        """(client, client path) of ``url``; ValueError naming a bad URL or a URL with no 3FS cluster."""
        scheme, path = split_url(url)
        if scheme not in CLUSTER_SCHEMES:
            return self._posix, path
        found = find_cluster_root(path)
        if found is None:
            raise ValueError(f"url: no 3FS cluster (cluster.json) at or above {path} for {url!r}")
        root, inner = found
        key = (scheme, str(root))
        if key not in self._clients:
            self._clients[key] = connect(f"{scheme}://{root}")
        return self._clients[key], inner

    def os_path(self, url: str) -> str | None:
        """The OS path of ``url`` when it is a POSIX file (plain directory or mount), else None."""
        client, path = self.resolve(url)
        return path if client is self._posix else None

    # -- namespace ---------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        client, path = self.resolve(url)
        return client.exists(path)

    def is_dir(self, url: str) -> bool:
        client, path = self.resolve(url)
        return client.exists(path) and client.stat(path).type == "directory"

    def listdir(self, url: str) -> list[str]:
        """Sorted names in the directory ``url`` (FileNotFoundError naming it when missing)."""
        client, path = self.resolve(url)
        if not client.exists(path):
            raise FileNotFoundError(f"{url}: no such directory")
        return client.listdir(path)

    def makedirs(self, url: str) -> None:
        client, path = self.resolve(url)
        client.makedirs(path, exist_ok=True)

    def remove(self, url: str, recursive: bool = False) -> None:
        client, path = self.resolve(url)
        if client.exists(path):
            client.remove(path, recursive=recursive)

    def glob(self, url: str) -> list[str]:
        """The files matching the glob pattern ``url`` (``*``, ``?``, ``[...]`` in its last components)."""
        scheme, _ = split_url(url)
        os_path = self.os_path(url)
        if os_path is not None:
            return sorted(url[: len(url) - len(os_path)] + p if scheme else p for p in glob.glob(os_path))
        client, path = self.resolve(url)
        import fnmatch
        directory, pattern = posixpath.split(path)
        prefix = url[: len(url) - len(path)]
        if any(ch in directory for ch in "*?["):
            raise ValueError(f"url: wildcards only in the last path component on 3FS, got {url!r}")
        if not client.exists(directory):
            return []
        return [prefix + posixpath.join(directory, name) for name in client.listdir(directory)
                if fnmatch.fnmatch(name, pattern)]

    # -- bytes -------------------------------------------------------------------------------------
    def read_bytes(self, url: str) -> bytes:
        client, path = self.resolve(url)
        try:
            with client.open(path, "rb") as file:
                return file.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such file") from None

    def write_bytes(self, url: str, data: bytes) -> None:
        """Writes ``data`` to ``url`` atomically (temporary sibling + rename), creating parent directories."""
        client, path = self.resolve(url)
        directory, name = posixpath.split(path)
        client.makedirs(directory, exist_ok=True)
        temporary = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with client.open(temporary, "wb") as file:
                file.write(data)
            client.rename(temporary, path, replace=True)
        except BaseException:
            if client.exists(temporary):
                client.remove(temporary)
            raise

    # -- tables ------------------------------------------------------------------------------------
    def read_parquet(self, url: str, columns: list[str] | None = None) -> pl.DataFrame:
        """The parquet file ``url`` (only ``columns`` when given)."""
        os_path = self.os_path(url)
        if os_path is not None:
            if not os.path.isfile(os_path):
                raise FileNotFoundError(f"{url}: no such file")
            return pl.read_parquet(os_path, columns=columns)
        return pl.read_parquet(io.BytesIO(self.read_bytes(url)), columns=columns)

    def parquet_schema(self, url: str) -> pl.Schema:
        """The schema of the parquet file ``url`` from its footer."""
        os_path = self.os_path(url)
        if os_path is not None:
            if not os.path.isfile(os_path):
                raise FileNotFoundError(f"{url}: no such file")
            return pl.read_parquet_schema(os_path)
        return pl.Schema(pl.from_arrow(pq.read_schema(io.BytesIO(self.read_bytes(url))).empty_table()).schema)

    def read_csv(self, url: str, **options: Any) -> pl.DataFrame:
        os_path = self.os_path(url)
        if os_path is not None:
            if not os.path.isfile(os_path):
                raise FileNotFoundError(f"{url}: no such file")
            return pl.read_csv(os_path, **options)
        return pl.read_csv(io.BytesIO(self.read_bytes(url)), **options)

    def write_parquet(self, url: str, frame: pl.DataFrame) -> None:
        """Writes ``frame`` to ``url`` atomically."""
        self.write_bytes(url, parquet_bytes(frame))

    def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> "StorageFiles":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    """``frame`` as one parquet file in memory, LZ4-compressed: stage files are written once and read once,
    so speed beats size (zstd, polars' default, writes random bytes 4x slower: GraySort's records)."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="lz4")
    return buffer.getvalue()
