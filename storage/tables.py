"""polars tables (parquet files and hive-partitioned datasets) at any storage URL, 3FS included.

    from storage import tables
    tables.write_parquet(frame, "3fs+embedded:///runs/a/3fs/tables/events", partition_by="day")
    lazy = tables.scan_parquet("3fs+embedded:///runs/a/3fs/tables/events")      # a polars LazyFrame
    lazy.filter(pl.col("day") == "2025-01-02").select("user", "ms").collect()     # pushdown, see below
    frame = tables.read_parquet("/data/t.parquet", columns=["a", "b"])           # a plain path works too

Sources and targets are storage URLs (``storage.location``: ``3fs+embedded://``, ``3fs+tcp://``,
``3fs://`` mounts, plain paths) or a ``Location`` whose path is the file or dataset directory itself.

**Reads.** On a POSIX location (a plain directory or a mount: ``Location.os_path``) polars' native
parquet reader runs on the OS path, with everything it does for local files. On a 3FS client, a
``pyarrow.dataset`` over the client (``ClientArrowFS``: ``pyarrow.fs.PyFileSystem`` whose files are the
client's ``File`` objects, read with positional reads and no read-ahead buffer) is handed to
``polars.scan_pyarrow_dataset``: polars passes the selected columns and the filter down to pyarrow, which
reads only those column chunks and skips row groups (by their statistics) and hive partitions (by their
directory names) that the filter excludes. tests/test_storage_tables.py counts the bytes to show it.

**Hive datasets** use polars' layout (``key=value/00000000.parquet``, values percent-encoded,
``__HIVE_DEFAULT_PARTITION__`` for null; the key columns are kept inside the files too), and read back
with polars' key types: a key stored in the files keeps its type; otherwise Int64 if every value is an
integer, Float64 if a number, else String.

**Writes are atomic.** A file is written under a hidden temporary name and renamed over the target
(``ThreeFSFileSystem``); a partitioned dataset is built in a hidden staging directory and published with
one rename (``storage.publish``). Readers see the old table or the new one, never a part.
"""

from __future__ import annotations

import os
import posixpath
import weakref
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.location import Location, open_location, split_url
from storage.publish import staged_directory
from storage.threefs.client.fsspec_fs import ThreeFSFileSystem

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
PART_FILE = "00000000.parquet"  # polars' name for the one file of a partition


class ClientArrowFS(pafs.FSSpecHandler):
    """A ``pyarrow.fs`` handler over a ``FileClient``: listing and metadata through the fsspec adapter,
    input files as the client's own ``File`` (positional reads of exactly the ranges pyarrow asks for:
    pyarrow coalesces nearby ranges itself, so no read-ahead buffer sits in between)."""

    def __init__(self, client):
        super().__init__(ThreeFSFileSystem(client=client))
        self.client = client

    def open_input_file(self, path: str) -> pa.PythonFile:
        return pa.PythonFile(self.client.open(self.fs._strip_protocol(path), "rb"), mode="r")

    def open_input_stream(self, path: str) -> pa.PythonFile:
        return self.open_input_file(path)


def _target(source: str | os.PathLike | Location, *, create: bool) -> tuple[Location, bool]:
    """(the Location of the file or dataset directory itself, whether this call opened it).

    A URL is opened at its parent directory (which must exist unless ``create``), so the file itself
    may be missing."""
    if isinstance(source, Location):
        return source, False
    scheme, path = split_url(source)  # ValueError naming a malformed URL
    url = os.fspath(source)
    if path == "/":
        raise ValueError(f"url: {url!r} names a root directory, not a table")
    parent_url = f"{url.partition('://')[0]}://{posixpath.dirname(path)}" if "://" in url else os.path.dirname(path)
    name = posixpath.basename(path)
    parent = open_location(parent_url, create=create)
    return parent.child(name), True


def _missing(location: Location) -> FileNotFoundError:
    return FileNotFoundError(f"{location.url}: no such parquet file or dataset ({location.path} on "
                             f"{type(location.client).__name__})")


def _parquet_files(handler: ClientArrowFS, root: str) -> list[str]:
    """Every visible data file under ``root``, sorted (names starting with '.' or '_' are skipped, as
    polars and pyarrow do)."""
    found = []
    for info in handler.get_file_info_selector(pafs.FileSelector(root, recursive=True)):
        relative = posixpath.relpath(info.path, root)
        if info.type == pafs.FileType.File and not any(p[:1] in "._" for p in relative.split("/")):
            found.append(info.path)
    return sorted(found)


def _hive_value_type(values: list[str]) -> pa.DataType:
    """polars' inference for a key not stored in the files: Int64, else Float64, else String."""
    present = [v for v in values if v != HIVE_NULL]
    for kind, convert in ((pa.int64(), int), (pa.float64(), float)):
        try:
            [convert(v) for v in present]
            return kind
        except ValueError:
            continue
    return pa.string()


def _hive_partitioning(files: list[str], root: str, file_schema: pa.Schema) -> ds.Partitioning | None:
    """The hive partitioning of ``files`` under ``root`` (None when the paths carry no ``key=value``)."""
    values: dict[str, list[str]] = {}
    for path in files:
        for segment in posixpath.relpath(path, root).split("/")[:-1]:
            key, equals, value = segment.partition("=")
            if equals:
                values.setdefault(key, []).append(value)
    if not values:
        return None
    fields = [file_schema.field(key) if key in file_schema.names else pa.field(key, _hive_value_type(found))
              for key, found in values.items()]
    return ds.partitioning(pa.schema(fields), flavor="hive")


def _arrow_dataset(location: Location, hive_partitioning: bool | None) -> ds.Dataset:
    client = location.client
    if not client.exists(location.path):
        raise _missing(location)
    handler = ClientArrowFS(client)
    filesystem = pafs.PyFileSystem(handler)
    try:
        if client.stat(location.path).type != "directory":
            return ds.dataset(location.path, filesystem=filesystem, format="parquet")
        files = _parquet_files(handler, location.path)
        if not files:
            raise FileNotFoundError(f"{location.url}: the dataset directory {location.path} holds no parquet files")
        with filesystem.open_input_file(files[0]) as first:
            file_schema = pq.read_schema(first)
        partitioning = None if hive_partitioning is False else _hive_partitioning(files, location.path, file_schema)
        return ds.dataset(files, filesystem=filesystem, format="parquet", partitioning=partitioning,
                          partition_base_dir=location.path)
    except (pa.ArrowInvalid, OSError) as error:
        if isinstance(error, FileNotFoundError) and location.url in str(error):
            raise
        raise ValueError(f"{location.url}: cannot read parquet at {location.path}: {error}") from error


def scan_parquet(source: str | os.PathLike | Location, *, hive_partitioning: bool | None = None,
                 **polars_kwargs: Any) -> pl.LazyFrame:
    """A LazyFrame over a parquet file or dataset directory (hive partitions discovered unless
    ``hive_partitioning=False``). ``polars_kwargs`` go to ``polars.scan_parquet`` on POSIX locations
    and are refused elsewhere. A URL's client stays open as long as the LazyFrame lives."""
    location, owned = _target(source, create=False)
    try:
        if location.os_path is not None:
            if not os.path.exists(location.os_path):
                raise _missing(location)
            return pl.scan_parquet(location.os_path, hive_partitioning=hive_partitioning, **polars_kwargs)
        if polars_kwargs:
            raise TypeError(f"scan_parquet: {sorted(polars_kwargs)} apply to POSIX locations only, not {location.url}")
        dataset = _arrow_dataset(location, hive_partitioning)
        frame = pl.scan_pyarrow_dataset(dataset)
    except BaseException:
        if owned:
            location.close()
        raise
    if owned:  # the client closes with the dataset that reads through it
        weakref.finalize(dataset, location.close)
        owned = False
    return frame


def read_parquet(source: str | os.PathLike | Location, columns: Sequence[str] | None = None, *,
                 hive_partitioning: bool | None = None, **polars_kwargs: Any) -> pl.DataFrame:
    """The table at ``source`` as a DataFrame; ``columns`` reads only those (pushed down to the reads)."""
    location, owned = _target(source, create=False)
    try:
        frame = scan_parquet(location, hive_partitioning=hive_partitioning, **polars_kwargs)
        if columns is not None:
            frame = frame.select(list(columns))
        try:
            return frame.collect()
        except (pl.exceptions.ComputeError, pa.ArrowInvalid, OSError) as error:
            raise ValueError(f"{location.url}: cannot read parquet at {location.path}: {error}") from error
    finally:
        if owned:
            location.close()


def hive_directory(keys: dict[str, Any]) -> str:
    """polars' directory for one partition: ``k1=v1/k2=v2`` (values as polars prints them, percent-encoded)."""
    parts = []
    for key, value in keys.items():
        text = HIVE_NULL if value is None else quote(pl.Series([value]).cast(pl.String)[0], safe="")
        parts.append(f"{key}={text}")
    return "/".join(parts)


def write_parquet(frame: pl.DataFrame, target: str | os.PathLike | Location, *,
                  partition_by: str | Sequence[str] | None = None, replace: bool = True,
                  **polars_kwargs: Any) -> None:
    """Writes ``frame`` as one parquet file, or as a hive dataset directory with ``partition_by``.

    Published atomically (see the module docstring). replace: an existing table at ``target`` is
    replaced (else ``FileExistsError``). ``polars_kwargs`` go to ``DataFrame.write_parquet``
    (compression, row_group_size, statistics, ...). A URL's parent directories are created.
    """
    if not isinstance(frame, pl.DataFrame):
        raise TypeError(f"frame: expected a polars DataFrame, got {type(frame).__name__}")
    location, owned = _target(target, create=True)
    try:
        client, fs = location.client, ThreeFSFileSystem(client=location.client)
        if partition_by is None:
            if not replace and client.exists(location.path):
                raise FileExistsError(f"{location.url} already exists (pass replace=True to replace it)")
            with fs.open(location.path, "wb") as file:
                frame.write_parquet(file, **polars_kwargs)
            return
        keys = [partition_by] if isinstance(partition_by, str) else list(partition_by)
        missing = [k for k in keys if k not in frame.columns]
        if missing or not keys:
            raise ValueError(f"partition_by: {missing or keys} not among the frame's columns {frame.columns}")
        with staged_directory(client, location.path, replace=replace) as staging:
            for values, part in frame.partition_by(keys, maintain_order=True, as_dict=True).items():
                directory = hive_directory(dict(zip(keys, values)))
                with fs.open(posixpath.join(staging, directory, PART_FILE), "wb") as file:
                    part.write_parquet(file, **polars_kwargs)
    finally:
        if owned:
            location.close()
