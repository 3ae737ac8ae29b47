"""``init()`` -> ``Session``: a job's data root, job id and executor, and the DataFrame constructors.

    import storage.dataframe as spd
    sp = spd.init(data_root="3fs+embedded:///tmp/c/jobs")     # or a plain directory, a 3FS mount, 3fs+tcp://
    df = sp.read_parquet("/data/events/*.parquet")            # one partition per file
    df = df.repartition(8, hash_by="user").filter(pl.col("ms") > 0).partial_sort("user")
    df.write_parquet("3fs+embedded:///tmp/c/out/users")
    sp.shutdown()

A session's stage outputs live under ``<data_root>/<job_id>/``. ``job_id=None`` makes a new id
(``YYYYmmdd-HHMMSS-<random>``); passing an earlier job's id reruns it: tasks whose completion markers are
there are skipped (see ``runner.py``). The session keeps ``data_root`` open for its lifetime (an embedded
3FS lives inside the driver process as long as the session does).
"""

from __future__ import annotations

import datetime
import os
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from storage.dataframe.dataframe import DataFrame, check_npartitions
from storage.dataframe.executors import make_executor
from storage.dataframe.files import StorageFiles, is_hidden, join_url
from storage.dataframe.operators import Sql, check_sql_placeholders
from storage.dataframe.partitioning import InputSlice, Manifest
from storage.dataframe.plan import Apply, FileFormat, FilesSource, MemorySource, Node
from storage.dataframe.planner import explain, plan_stages, stage_dir
from storage.dataframe.runner import Runner
from storage.dataframe.tasks import concat_frames
from storage.location import open_location, split_url
from storage.publish import publish_directory

PUBLISHED = "_published"


def default_data_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "jaxseek", "dataframe")


def new_job_id() -> str:
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def init(data_root: str | os.PathLike | None = None, num_executors: int | None = None, executor: str = "process",
         job_id: str | None = None, *, progress: bool = True, ray_address: str | None = None) -> "Session":
    """A new session (see the module docstring).

    data_root: a storage URL for the job's intermediate files (default ``~/.cache/jaxseek/dataframe``;
      created when missing; ``3fs+embedded://`` starts an embedded 3FS there). num_executors: worker
      processes (``process``) or Ray CPUs (``ray``); None: all cores. executor: ``process`` (default),
      ``inprocess`` or ``ray``. job_id: reuse an earlier job's id to rerun it, skipping finished tasks.
      progress: a progress bar per stage (on stderr). ray_address: an existing Ray cluster to join.
    """
    return Session(data_root, num_executors, executor, job_id, progress=progress, ray_address=ray_address)


class Session:
    def __init__(self, data_root, num_executors, executor, job_id, *, progress, ray_address) -> None:
        if num_executors is not None and (not isinstance(num_executors, int) or num_executors < 1):
            raise ValueError(f"num_executors: expected a positive int or None, got {num_executors!r}")
        if job_id is not None and (not isinstance(job_id, str) or not job_id or "/" in job_id or is_hidden(job_id)):
            raise ValueError(f"job_id: expected a non-empty name without '/' (not starting with '.' or '_'), "
                             f"got {job_id!r}")
        self.data_root = os.fspath(data_root) if data_root is not None else default_data_root()
        self.job_id = job_id or new_job_id()
        self._location = open_location(self.data_root, create=True)  # ValueError naming a bad URL
        self.files = StorageFiles()
        try:
            self.executor = make_executor(executor, num_executors, ray_address)
        except BaseException:
            self.files.close()
            self._location.close()
            raise
        self.job_url = join_url(self.data_root, self.job_id)
        self.files.makedirs(self.job_url)
        self.runner = Runner(self.files, self.executor, self.job_url, progress)

    # -- constructors ------------------------------------------------------------------------------
    def read_parquet(self, paths: str | os.PathLike | Sequence[str], columns: Sequence[str] | None = None) -> DataFrame:
        """One partition per parquet file. ``paths``: a file, a directory (its visible files), a glob, or a
        list of those, on any storage URL. ``columns``: read only these."""
        files = self._expand(paths, "read_parquet")
        if columns is not None:
            columns = [columns] if isinstance(columns, str) else list(columns)
        schema = self.files.parquet_schema(files[0])
        if columns is not None:
            missing = [c for c in columns if c not in schema]
            if missing:
                raise ValueError(f"read_parquet: columns {missing} not in {files[0]} (its columns: {schema.names()})")
            schema = pl.Schema({c: schema[c] for c in columns})
        fmt = FileFormat("parquet", tuple(columns) if columns is not None else None)
        return self._frame(FilesSource(tuple((InputSlice(f),) for f in files), fmt, schema))

    def read_csv(self, paths: str | os.PathLike | Sequence[str], schema: dict[str, Any] | None = None,
                 separator: str = ",") -> DataFrame:
        """One partition per CSV file (with a header row). ``schema``: column -> polars dtype (else inferred)."""
        files = self._expand(paths, "read_csv")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"read_csv: separator must be one character, got {separator!r}")
        schema = pl.Schema(schema) if schema is not None else None
        fmt = FileFormat("csv", None, schema, separator)
        return self._frame(FilesSource(tuple((InputSlice(f),) for f in files), fmt, schema))

    def from_polars(self, frame: pl.DataFrame, npartitions: int = 1) -> DataFrame:
        """``frame`` split by rows into ``npartitions`` (sizes differ by at most one)."""
        if not isinstance(frame, pl.DataFrame):
            raise TypeError(f"from_polars: expected a polars DataFrame, got {type(frame).__name__}")
        n = check_npartitions(npartitions, "from_polars")
        parts = tuple(frame.slice(i * frame.height // n, (i + 1) * frame.height // n - i * frame.height // n)
                      for i in range(n))
        return self._frame(MemorySource(parts, frame.schema))

    def from_arrow(self, table: pa.Table, npartitions: int = 1) -> DataFrame:
        if not isinstance(table, (pa.Table, pa.RecordBatch)):
            raise TypeError(f"from_arrow: expected a pyarrow Table, got {type(table).__name__}")
        return self.from_polars(pl.from_arrow(table), npartitions)

    def from_items(self, items: Iterable[Any], npartitions: int = 1) -> DataFrame:
        """Rows from dicts, or a column ``item`` from other values."""
        items = list(items)
        rows = items and all(isinstance(i, dict) for i in items)
        frame = pl.DataFrame(items) if rows else pl.DataFrame({"item": items})
        return self.from_polars(frame, npartitions)

    def partial_sql(self, query: str, *dfs: DataFrame) -> DataFrame:
        """A polars SQL query run on each partition; ``{0}``, ``{1}`` name the inputs' partitions (the
        inputs must have equal partition counts)."""
        if not dfs:
            raise ValueError("partial_sql: give at least one DataFrame")
        for i, df in enumerate(dfs):
            if not isinstance(df, DataFrame) or df.session is not self:
                raise TypeError(f"partial_sql: argument {i + 1} is not a DataFrame of this session")
        check_sql_placeholders(query, len(dfs))
        counts = [df.num_partitions for df in dfs]
        if len(set(counts)) > 1:
            raise ValueError(f"partial_sql: the inputs have different partition counts {counts}; repartition them")
        op = Sql(query, len(dfs))
        return self._frame(Apply(tuple(df.node for df in dfs), op, op.output_schema([df.node.schema for df in dfs])))

    # -- execution (used by DataFrame) -------------------------------------------------------------
    def _frame(self, node: Node) -> DataFrame:
        return DataFrame(self, node)

    def compute(self, node: Node) -> list[Manifest]:
        return self.runner.run(plan_stages(node))

    def explain(self, node: Node) -> str:
        return explain(plan_stages(node))

    def read_outputs(self, manifests: list[Manifest], limit: int | None = None) -> pl.DataFrame:
        frames, rows = [], 0
        for manifest in manifests:
            for url, count in manifest.files:
                frames.append(self.files.read_parquet(url))
                rows += count
                if limit is not None and rows >= limit:
                    return concat_frames(frames).head(limit)
        return concat_frames(frames)

    def write(self, node: Node, url: str | os.PathLike) -> None:
        """Writes ``node``'s partitions as ``url/part-NNNNN.parquet``, published with one rename."""
        url = os.fspath(url)
        _, path = split_url(url)
        if path == "/":
            raise ValueError(f"write_parquet: {url!r} names a root directory")
        parent = url[: len(url) - len(path)] + posixpath.dirname(path) if "://" in url else os.path.dirname(path)
        target = url if "://" in url else path
        with open_location(parent, create=True):  # the parent directory (or a new embedded 3FS) exists
            self._write(node, parent, target, posixpath.basename(path))

    def _write(self, node: Node, parent: str, target: str, name: str) -> None:
        staging = join_url(parent, f".{name}.staging-{self.job_id}")
        final = plan_stages(node, output_dir=staging)
        published = join_url(stage_dir(self.job_url, final), PUBLISHED)
        if self.files.exists(published) and self.files.exists(target):
            return
        if not self.files.exists(staging):
            self.runner.forget(final)
        self.files.makedirs(staging)
        self.runner.run(final)
        for name in self.files.listdir(staging):
            if name.startswith("."):  # temporaries of tasks that crashed
                self.files.remove(join_url(staging, name))
        client, staging_path = self.files.resolve(staging)
        target_client, target_path = self.files.resolve(target)
        if target_client is not client:
            raise ValueError(f"write_parquet: {target!r} and its staging directory are on different clients")
        publish_directory(client, staging_path, target_path, replace=True)
        self.files.write_bytes(published, b"{}")

    def _expand(self, paths, operator: str) -> list[str]:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not isinstance(paths, Sequence) or not paths:
            raise TypeError(f"{operator}: paths must be a URL, a glob or a non-empty list of them, got {paths!r}")
        found = []
        for item in paths:
            if not isinstance(item, (str, os.PathLike)):
                raise TypeError(f"{operator}: paths must be strings, got {type(item).__name__}")
            item = os.fspath(item)
            scheme, path = split_url(item)  # ValueError naming a malformed URL
            url = item if scheme else path
            if any(ch in path for ch in "*?["):
                matched = self.files.glob(url)
                if not matched:
                    raise FileNotFoundError(f"{operator}: no files match {item!r}")
                found += matched
            elif self.files.is_dir(url):
                names = [n for n in self.files.listdir(url) if not is_hidden(n)]
                if not names:
                    raise FileNotFoundError(f"{operator}: the directory {item!r} holds no files")
                found += [join_url(url, n) for n in names]
            elif self.files.exists(url):
                found.append(url)
            else:
                raise FileNotFoundError(f"{operator}: no such file or directory: {item!r}")
        return found

    # -- lifetime ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stops the executor's workers and closes the data root; the job's files stay."""
        self.executor.close()
        self.files.close()
        self._location.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

