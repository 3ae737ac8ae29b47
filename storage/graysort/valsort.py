"""A valsort equivalent: are GraySort records in order, and are they the records that were generated?

``valsort`` (sortbenchmark.org) reads sorted 100-byte records and reports the record count, the number
of duplicate keys (a record whose 10-byte key equals the previous one), the unordered records (a key
smaller than the previous one; the first one's index) and a checksum: the sum of every record's zlib
CRC32, which is order-independent, so it equals the checksum of the generated input exactly when the
same records came out (``gensort -c`` prints the input's). Partitions are summarized separately and the
summaries combined in order, checking the boundary between neighbours (``valsort -o`` then ``-s``):
``summarize`` -> ``combine``. ``summarize_parquet`` reads parquet partitions (a ``record`` column of
100-byte binaries; a ``key`` column, when present, must equal each record's first 10 bytes) row group by
row group, on any ``storage.location`` URL, optionally in several processes.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import zlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.graysort.gensort import KEY_BYTES, RECORD_BYTES
from storage.location import Location, open_location, split_url


class Summary(NamedTuple):
    """valsort's summary of a run of records (of one partition, or of all of them combined).

    first_unordered: index (within the run) of the first record whose key is smaller than its
    predecessor's, None if all are in order. key_mismatches: rows whose ``key`` column is not the
    record's first 10 bytes. first_record / last_record: None for an empty run.
    """

    records: int = 0
    unordered: int = 0
    first_unordered: int | None = None
    duplicates: int = 0
    checksum: int = 0
    key_mismatches: int = 0
    first_record: bytes | None = None
    last_record: bytes | None = None

    @property
    def in_order(self) -> bool:
        return self.unordered == 0

    def describe(self) -> str:
        """valsort's report, one line."""
        order = (f"ERROR - {self.unordered} unordered records (first: record {self.first_unordered})"
                 if self.unordered else "SUCCESS - all records are in order")
        keys = f", {self.key_mismatches} key column mismatches" if self.key_mismatches else ""
        return (f"Records: {self.records}, Checksum: {self.checksum:x}, Duplicate keys: {self.duplicates}{keys}; "
                f"{order}")


def _key_parts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n] uint64, [n] uint16): bytes 0-7 and 8-9 of [n, 10] keys, big-endian, so that integer order
    is the keys' byte order (memcmp)."""
    keys = np.ascontiguousarray(keys)
    high = keys[:, :8].copy().view(">u8").ravel().astype(np.uint64)
    return high, keys[:, 8:10].copy().view(">u2").ravel().astype(np.uint16)


def record_checksums(records: np.ndarray) -> np.ndarray:
    """[n] uint32: zlib CRC32 of each of [n, 100] records."""
    records = np.ascontiguousarray(records)
    return np.fromiter(map(zlib.crc32, records), dtype=np.uint32, count=len(records))


def summarize(records: np.ndarray, keys: np.ndarray | None = None) -> Summary:
    """The summary of [n, 100] uint8 records in the order given; ``keys`` ([n, 10]): a separate key column
    to check against the records' first 10 bytes."""
    records = np.asarray(records)
    if records.ndim != 2 or records.shape[1] != RECORD_BYTES or records.dtype != np.uint8:
        raise ValueError(f"records: expected [n, {RECORD_BYTES}] uint8, got {records.dtype}{list(records.shape)}")
    if len(records) == 0:
        return Summary()
    mismatches = 0
    if keys is not None:
        mismatches = int(np.any(np.asarray(keys) != records[:, :KEY_BYTES], axis=1).sum())
    high, low = _key_parts(records[:, :KEY_BYTES])
    same_high = high[1:] == high[:-1]
    duplicate = same_high & (low[1:] == low[:-1])
    descending = (high[1:] < high[:-1]) | (same_high & (low[1:] < low[:-1]))
    unordered = np.flatnonzero(descending)
    return Summary(records=len(records), unordered=len(unordered),
                   first_unordered=int(unordered[0]) + 1 if len(unordered) else None,
                   duplicates=int(duplicate.sum()), checksum=int(record_checksums(records).sum(dtype=np.uint64)),
                   key_mismatches=mismatches, first_record=records[0].tobytes(), last_record=records[-1].tobytes())


def combine(summaries: Iterable[Summary]) -> Summary:
    """The summary of consecutive runs (valsort -s): totals, plus the order and duplicate check between
    each run's last record and the next non-empty run's first."""
    total = Summary()
    for part in summaries:
        if part.records == 0:
            continue
        if total.records == 0:
            total = part
            continue
        boundary_key, next_key = total.last_record[:KEY_BYTES], part.first_record[:KEY_BYTES]
        unordered, duplicates, first = part.unordered, part.duplicates, total.first_unordered
        if next_key < boundary_key:
            unordered += 1
            first = total.records if first is None else first
        elif next_key == boundary_key:
            duplicates += 1
        if first is None and part.first_unordered is not None:
            first = total.records + part.first_unordered
        total = Summary(records=total.records + part.records, unordered=total.unordered + unordered,
                        first_unordered=first, duplicates=total.duplicates + duplicates,
                        checksum=total.checksum + part.checksum,
                        key_mismatches=total.key_mismatches + part.key_mismatches,
                        first_record=total.first_record, last_record=part.last_record)
    return total


def binary_rows(column: pa.Array | pa.ChunkedArray, width: int, name: str = "record") -> np.ndarray:
    """[n, width] uint8 from a binary column (fixed_size_binary(width), binary, large_binary or
    binary_view) whose every value is ``width`` bytes; ValueError naming the column otherwise."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError(f"{name}: {chunk.null_count} null values; expected {width}-byte binaries")
        if pa.types.is_fixed_size_binary(chunk.type):
            if chunk.type.byte_width != width:
                raise ValueError(f"{name}: fixed_size_binary({chunk.type.byte_width}), expected {width} bytes")
            data = np.frombuffer(chunk.buffers()[1], np.uint8)
            parts.append(data[chunk.offset * width:(chunk.offset + len(chunk)) * width].reshape(-1, width))
            continue
        if pa.types.is_binary_view(chunk.type):
            chunk = chunk.cast(pa.large_binary())
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            raise ValueError(f"{name}: type {chunk.type}, expected {width}-byte binaries")
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        lengths = np.diff(offsets)
        if len(lengths) and (lengths != width).any():
            bad = int(np.flatnonzero(lengths != width)[0])
            raise ValueError(f"{name}: row {bad} holds {int(lengths[bad])} bytes, expected {width}")
        data = np.frombuffer(chunk.buffers()[2], np.uint8) if len(chunk) else np.empty(0, np.uint8)
        parts.append(data[offsets[0]:offsets[-1]].reshape(-1, width) if len(chunk)
                     else np.empty((0, width), np.uint8))
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def summarize_table(table: pa.Table | pa.RecordBatch, where: str = "table") -> Summary:
    """The summary of a GraySort table's rows in order (``record``, and ``key`` if present)."""
    if "record" not in table.column_names:
        raise ValueError(f"{where}: no 'record' column (columns: {table.column_names})")
    records = binary_rows(table.column("record"), RECORD_BYTES, f"{where}: column 'record'")
    keys = None
    if "key" in table.column_names:
        keys = binary_rows(table.column("key"), KEY_BYTES, f"{where}: column 'key'")
    return summarize(records, keys)


class ParquetPiece(NamedTuple):
    """Row groups [first, stop) of one parquet file at a location (``url``: the file's directory)."""

    url: str
    name: str
    first: int
    stop: int


def parquet_names(url: str) -> list[str]:
    """The visible ``*.parquet`` files of the directory ``url``, sorted by name (the partition order)."""
    with open_location(url) as location:
        names = sorted(n for n in location.client.listdir(location.path)
                       if n.endswith(".parquet") and n[:1] not in "._")
    if not names:
        raise FileNotFoundError(f"{url}: no *.parquet files")
    return names


def _open_parquet(location: Location, name: str) -> pq.ParquetFile:
    if location.os_path is not None:
        return pq.ParquetFile(os.path.join(location.os_path, name))
    return pq.ParquetFile(pa.PythonFile(location.client.open(location.join(name), "rb"), mode="r"))


def parquet_pieces(url: str, names: Sequence[str] | None = None, *,
                   row_groups_per_piece: int = 4) -> list[ParquetPiece]:
    """The files ``names`` (default ``parquet_names(url)``) of the directory ``url`` cut into pieces of row groups."""
    names = parquet_names(url) if names is None else list(names)
    pieces = []
    with open_location(url) as location:
        for name in names:
            groups = _open_parquet(location, name).metadata.num_row_groups
            pieces += [ParquetPiece(url, name, first, min(first + row_groups_per_piece, groups))
                       for first in range(0, max(groups, 1), row_groups_per_piece)]
    return pieces


def summarize_piece(piece: ParquetPiece) -> Summary:
    """The summary of one piece's rows (read with the ``key`` and ``record`` columns only)."""
    with open_location(piece.url) as location:
        file = _open_parquet(location, piece.name)
        columns = [c for c in ("key", "record") if c in file.schema_arrow.names]
        where = f"{piece.url.rstrip('/')}/{piece.name}"
        if file.metadata.num_row_groups == 0:
            return Summary()
        return combine(summarize_table(file.read_row_group(group, columns=columns), where)
                       for group in range(piece.first, piece.stop))


def summarize_parquet(url: str, names: Sequence[str] | None = None, *, workers: int = 1) -> Summary:
    """The combined summary of the parquet partitions in the directory ``url`` (in name order), read in
    ``workers`` processes (1: in this one; an embedded 3FS belongs to one process, so keep 1 there)."""
    pieces = parquet_pieces(url, names)
    scheme, _ = split_url(url)
    if workers <= 1 or len(pieces) == 1 or scheme == "3fs+embedded":
        return combine(map(summarize_piece, pieces))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return combine(pool.map(summarize_piece, pieces))


def compare(output: Summary, expected: Summary) -> list[str]:
    """What is wrong with a sort ``output`` of the input summarized as ``expected`` (empty: valid)."""
    problems = []
    if output.records != expected.records:
        problems.append(f"{output.records} records, expected {expected.records}")
    if output.checksum != expected.checksum:
        problems.append(f"checksum {output.checksum:x}, expected {expected.checksum:x} "
                        "(records changed, lost or duplicated)")
    if output.unordered:
        problems.append(f"{output.unordered} unordered records, the first at {output.first_unordered}")
    if output.key_mismatches:
        problems.append(f"{output.key_mismatches} rows whose key column differs from the record's first 10 bytes")
    return problems
