"""GraySort input on storage: gensort records as parquet partitions, written atomically, in parallel.

``write_input(url, num_records, partitions)`` splits records ``0 .. num_records - 1`` into ``partitions``
contiguous ranges (as ``gensort -b<start> <count>`` would for each) and writes range i as
``url/part-<i:05d>.parquet`` (columns ``key`` fixed_size_binary(10), ``record`` fixed_size_binary(100);
uncompressed: random bytes do not compress). Each file is written under a hidden temporary name and
renamed into place. It returns the input's valsort summary (the count and the CRC32 sum, which a valid
sort output must reproduce), computed while generating, as ``gensort -c`` does.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import uuid
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from storage.graysort.gensort import generate_records, records_table
from storage.graysort.valsort import Summary, combine, summarize
from storage.location import Location, open_location, split_url

ROW_GROUP_RECORDS = 1 << 17  # ~13 MB row groups


class InputPartition(NamedTuple):
    """Records ``start .. start + count - 1`` written to ``url/name``."""

    url: str
    name: str
    start: int
    count: int


def partition_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def input_partitions(url: str, num_records: int, partitions: int) -> list[InputPartition]:
    """``partitions`` contiguous ranges covering ``num_records`` records (sizes differ by at most one)."""
    if num_records <= 0 or partitions <= 0:
        raise ValueError(f"num_records={num_records}, partitions={partitions}: expected positive counts")
    bounds = [num_records * i // partitions for i in range(partitions + 1)]
    return [InputPartition(url, partition_name(i), bounds[i], bounds[i + 1] - bounds[i]) for i in range(partitions)]


def write_table(location: Location, name: str, table: pa.Table, **parquet_kwargs) -> None:
    """Writes ``table`` as the parquet file ``location/name``: a hidden temporary name, then a rename."""
    temporary = f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    if location.os_path is not None:
        pq.write_table(table, os.path.join(location.os_path, temporary), **parquet_kwargs)
    else:
        with location.client.open(location.join(temporary), "wb") as file:
            pq.write_table(table, pa.PythonFile(file, mode="w"), **parquet_kwargs)
    location.client.rename(location.join(temporary), location.join(name))


def write_partition(part: InputPartition) -> Summary:
    """Generates and writes one input partition; returns the summary of its records."""
    records = generate_records(part.start, part.count)
    with open_location(part.url, create=True) as location:
        write_table(location, part.name, records_table(records), compression="none", row_group_size=ROW_GROUP_RECORDS)
    return summarize(records)


def write_input(url: str, num_records: int, partitions: int, *, workers: int = 1) -> Summary:
    """Writes the GraySort input (see the module docstring) with ``workers`` processes (1: in this one,
    which an embedded 3FS URL requires); returns the combined summary of all records."""
    parts = input_partitions(url, num_records, partitions)
    open_location(url, create=True).close()  # the directory (or embedded cluster) exists before workers open it
    if workers <= 1 or len(parts) == 1 or split_url(url)[0] == "3fs+embedded":
        return combine(map(write_partition, parts))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return combine(pool.map(write_partition, parts))
