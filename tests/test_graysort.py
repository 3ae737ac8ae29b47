"""GraySort: the generator against the C gensort's bytes, the validator against valsort's verdicts, the
per-partition sort steps against polars, and the whole sort (DataFrame, DuckDB) validated end to end.

Reference values come from gensort / valsort 1.5 (sortbenchmark.org, built from source):
``gensort -c 1000 f`` and ``gensort -c -b5 7 f`` and ``gensort -b123456789 3 f`` (file sha256 and
``-c`` checksum), and ``valsort`` on the unsorted 1000 and 100000 record files."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.graysort import gensort, partitions, sort, valsort
from storage.graysort.gensort import BLOCK, generate_records, generate_table

GENSORT_FILES = {  # (start, count) -> (sha256 of the file gensort writes, gensort -c checksum or None)
    (0, 1000): ("f524474116510d1debac6d38152e793a7e3cb71b1dd2bb45b6610e3c17698177", 0x1EA6370B955),
    (5, 7): ("2574919fe9f3e1a42eb149d2da6246e49e608525dd97488e510fa08e09671501", 0x3AE50DA91),
    (123456789, 3): ("f5512c5592863d096874ceeb2bee5f2d10d58bc10ae3059907be8554485fbbcd", None),
}


@pytest.mark.parametrize("start,count", sorted(GENSORT_FILES))
def test_records_are_gensorts_bytes(start, count):
    records = generate_records(start, count)
    digest, checksum = GENSORT_FILES[start, count]
    assert records.shape == (count, 100) and records.dtype == np.uint8
    assert hashlib.sha256(records.tobytes()).hexdigest() == digest
    if checksum is not None:
        assert valsort.summarize(records).checksum == checksum


def test_generator_scalar_reference_and_independent_ranges():
    x = 0
    for i in range(1, 4):  # the LCG itself, one step at a time
        x = (gensort.MULTIPLIER * x + gensort.INCREMENT) % 2**128
        assert gensort.random_number(i) == x
    assert generate_records(0, 1)[0, :10].tobytes() == b"JimGrayRIP"  # high bytes of X[1] = c
    whole = generate_records(BLOCK - 40, 100)  # crosses a vectorized block
    assert np.array_equal(whole, np.concatenate([generate_records(BLOCK - 40, 33), generate_records(BLOCK - 7, 67)]))
    assert np.array_equal(generate_records(3, 5), generate_records(3, 5))
    with pytest.raises(ValueError, match="start=-1"):
        generate_records(-1, 3)


def test_table_format_and_written_input(tmp_path):
    table = generate_table(10, 50)
    assert table.schema.field("key").type == pa.binary(10) and table.schema.field("record").type == pa.binary(100)
    keys = valsort.binary_rows(table.column("key"), 10)
    records = valsort.binary_rows(table.column("record"), 100)
    assert np.array_equal(records, generate_records(10, 50)) and np.array_equal(keys, records[:, :10])
    summary = partitions.write_input(str(tmp_path / "in"), 103, 3)
    names = valsort.parquet_names(str(tmp_path / "in"))
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    written = np.concatenate([valsort.binary_rows(pq.read_table(tmp_path / "in" / n).column("record"), 100) for n in names])
    assert np.array_equal(written, generate_records(0, 103))
    assert (summary.records, summary.checksum) == (103, valsort.summarize(written).checksum)
    assert valsort.summarize_parquet(str(tmp_path / "in")) == summary


def test_summary_matches_valsort_on_unsorted_input():
    summary = valsort.summarize(generate_records(0, 1000))  # valsort: 483 unordered, the first is record 2
    assert (summary.records, summary.unordered, summary.first_unordered) == (1000, 483, 2)
    assert summary.checksum == 0x1EA6370B955 and not summary.in_order


def _sorted_records(count: int = 300) -> np.ndarray:
    records = generate_records(0, count)
    return records[sorted(range(count), key=lambda i: records[i, :10].tobytes())]


def test_validator_catches_disorder_changes_and_losses():
    records = _sorted_records()
    good = valsort.summarize(records)
    assert good.in_order and good.duplicates == 0 and valsort.compare(good, good) == []
    swapped = records.copy()
    swapped[[100, 101]] = swapped[[101, 100]]
    bad = valsort.summarize(swapped)
    assert (bad.unordered, bad.first_unordered, bad.checksum) == (1, 101, good.checksum)
    assert "unordered" in " ".join(valsort.compare(bad, good))
    changed = records.copy()
    changed[50, 60] ^= 1  # a payload byte: order intact, checksum not
    problems = valsort.compare(valsort.summarize(changed), good)
    assert len(problems) == 1 and "checksum" in problems[0]
    missing = valsort.summarize(np.delete(records, 7, axis=0))
    assert any("299 records, expected 300" in p for p in valsort.compare(missing, good))
    duplicated = records.copy()
    duplicated[201] = duplicated[200]
    duplicated[201, 10:] = 7  # same key, other payload (valsort counts it as a duplicate key)
    assert valsort.summarize(duplicated).duplicates == 1 and valsort.summarize(duplicated).in_order


def test_combined_partitions_check_their_boundaries():
    records = _sorted_records()
    whole = valsort.summarize(records)
    parts = [valsort.summarize(records[a:b]) for a, b in ((0, 120), (120, 120), (120, 300))]
    assert valsort.combine(parts) == whole
    reordered = valsort.combine([valsort.summarize(records[150:]), valsort.summarize(records[:150])])
    assert (reordered.unordered, reordered.first_unordered, reordered.checksum) == (1, 150, whole.checksum)
    later = valsort.combine([valsort.summarize(records[:10]), valsort.summarize(records[[20, 19, 21]])])
    assert later.first_unordered == 11  # the first disorder inside the second part, in global terms
    tie = valsort.combine([valsort.summarize(records[:10]), valsort.summarize(records[9:20])])
    assert tie.duplicates == 1


def test_binary_rows_and_key_column_checks():
    records = _sorted_records(20)
    frame = pl.DataFrame({"key": [r[:10].tobytes() for r in records], "record": [r.tobytes() for r in records]})
    table = frame.to_arrow()  # polars' variable-width binaries
    assert valsort.summarize_table(table) == valsort.summarize(records)
    wrong_key = frame.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit(b"0123456789"))
                                   .otherwise(pl.col("key")).alias("key"))
    assert valsort.summarize_table(wrong_key.to_arrow()).key_mismatches == 1
    with pytest.raises(ValueError, match="column 'record': row 0 holds 3 bytes"):
        valsort.summarize_table(pa.table({"record": [b"abc"]}), "t.parquet")
    with pytest.raises(ValueError, match="no 'record' column"):
        valsort.summarize_table(pa.table({"key": [b"0123456789"]}))


def test_sort_steps_match_polars():
    frame = pl.from_arrow(generate_table(0, 3000))
    assert sort.sort_partition(frame).equals(frame.sort("key"))
    parts = sort.with_key_parts(frame)
    assert parts.sort(["key_hi", "key_lo"])["key"].equals(frame.sort("key")["key"])
    boundaries = sort.prefix_boundaries(5)
    assert len(boundaries) == 4 and boundaries[1] == (2 * 2**64 // 5).to_bytes(8, "big") + b"\0\0"
    pieces = sort.range_split(frame, boundaries)
    assert sum(len(p) for p in pieces) == len(frame)
    edges = [b""] + boundaries + [b"\xff" * 11]
    for piece, low, high in zip(pieces, edges[:-1], edges[1:]):
        assert piece.equals(frame.filter(pl.col("key").map_elements(lambda k: low <= k < high, return_dtype=pl.Boolean)))
        hi = sort.with_key_parts(piece)["key_hi"].to_list()  # the integer boundaries cut at the same places
        ints = [0] + sort.integer_boundaries(boundaries) + [2**64]
        index = edges.index(low)
        assert all(ints[index] <= h < ints[index + 1] for h in hi)
    with pytest.raises(ValueError, match="two zero bytes"):
        sort.integer_boundaries([b"\x01" * 10])
    with pytest.raises(ValueError, match="no 'key' column"):
        sort.with_key_parts(frame.rename({"key": "k"}))
    with pytest.raises(TypeError, match="'key' is String"):
        sort.with_key_parts(pl.DataFrame({"key": ["a"]}))


@pytest.mark.parametrize("key_mode", ["integer", "binary"])
def test_dataframe_sort_pipeline_is_valid(tmp_path, key_mode):
    spd = pytest.importorskip("storage.dataframe", reason="storage.dataframe (part P) is not in this tree")
    expected = partitions.write_input(str(tmp_path / "in"), 2000, 3)
    session = spd.init(data_root=str(tmp_path / "jobs"), executor="inprocess")
    try:
        sort.sort_pipeline(session, str(tmp_path / "in"), str(tmp_path / "out"), 4, key_mode=key_mode)
    finally:
        session.shutdown()
    names = valsort.parquet_names(str(tmp_path / "out"))
    assert len(names) == 4
    result = valsort.summarize_parquet(str(tmp_path / "out"), names)
    assert valsort.compare(result, expected) == [], result.describe()
    assert pq.read_schema(tmp_path / "out" / names[0]).names == ["key", "record"]
    with pytest.raises(ValueError, match="key_mode='text'"):
        sort.sort_pipeline(session, str(tmp_path / "in"), str(tmp_path / "x"), 2, key_mode="text")


def test_duckdb_sort_is_valid(tmp_path):
    pytest.importorskip("duckdb", reason="duckdb is not installed (the bench extra)")
    from storage.graysort.duckdb_sort import duckdb_sort
    expected = partitions.write_input(str(tmp_path / "in"), 1500, 2)
    run = duckdb_sort(str(tmp_path / "in"), valsort.parquet_names(str(tmp_path / "in")), str(tmp_path / "out"), threads=2)
    assert run.output.endswith("sorted.parquet") and run.seconds > 0
    assert valsort.compare(valsort.summarize_parquet(str(tmp_path / "out")), expected) == []
