"""The single-node baseline: DuckDB sorting the same GraySort parquet partitions into one parquet file.

``duckdb_sort`` runs ``COPY (SELECT * FROM read_parquet([...]) ORDER BY key) TO 'out.parquet'`` on all
threads (DuckDB's out-of-core parallel sort; ``preserve_insertion_order`` keeps the sorted order in the
file). DuckDB reads and writes local paths, so the input and output must be plain directories or a 3FS
FUSE mount (``storage.location.Location.os_path``). duckdb is an optional dependency (the ``bench`` extra);
importing this module does not need it, calling ``duckdb_sort`` does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import NamedTuple

from storage.location import open_location


class DuckDBRun(NamedTuple):
    seconds: float  # the COPY statement alone (DuckDB's start and connection excluded)
    threads: int
    version: str
    output: str  # the OS path of the sorted file


def _os_path(url: str, *, create: bool) -> str:
    with open_location(url, create=create) as location:
        if location.os_path is None:
            raise ValueError(f"{url}: DuckDB reads local paths only; give a plain directory or a 3fs:// mount")
        return location.os_path


def _quote(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def duckdb_sort(input_url: str, names: Sequence[str], output_url: str, *, output_name: str = "sorted.parquet",
                threads: int | None = None, memory_limit: str | None = None, compression: str = "snappy",
                temp_directory: str | None = None) -> DuckDBRun:
    """Sorts the parquet files ``names`` of the directory ``input_url`` by ``key`` into
    ``output_url/output_name`` with DuckDB. threads: None = all cores. compression: the output
    parquet's codec."""
    try:
        import duckdb
    except ImportError as error:
        raise ImportError("duckdb is not installed: pip install 'jaxseek[bench]'") from error
    source = _os_path(input_url, create=False)
    target = os.path.join(_os_path(output_url, create=True), output_name)
    files = ", ".join(_quote(os.path.join(source, name)) for name in names)
    threads = threads or os.cpu_count() or 1
    connection = duckdb.connect(":memory:")
    try:
        connection.execute(f"SET threads = {int(threads)}")
        connection.execute("SET preserve_insertion_order = true")
        if memory_limit:
            connection.execute(f"SET memory_limit = {_quote(memory_limit)}")
        if temp_directory:
            connection.execute(f"SET temp_directory = {_quote(temp_directory)}")
        start = time.perf_counter()
        connection.execute(f"COPY (SELECT key, record FROM read_parquet([{files}]) ORDER BY key) "
                           f"TO {_quote(target)} (FORMAT parquet, COMPRESSION {compression})")
        seconds = time.perf_counter() - start
    finally:
        connection.close()
    return DuckDBRun(seconds, threads, duckdb.__version__, target)
