"""storage.tables: polars parquet on 3FS and plain directories, against polars on a local directory."""

import datetime
import os
import posixpath

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage import tables
from storage.location import open_location
from tests.storage_counting import counting


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """An embedded 3FS kept open for the module (every URL call below shares it)."""
    root = tmp_path_factory.mktemp("tables3fs")
    with open_location(f"3fs+embedded://{root}/fs", create=True) as location:
        yield location


@pytest.fixture(params=["3fs", "plain"])
def place(request, cluster, tmp_path):
    """(URL prefix of an empty directory, a local reference directory) on an embedded 3FS or a plain dir."""
    if request.param == "3fs":
        name = f"t{abs(hash(str(tmp_path))) % 10**9}"
        cluster.client.makedirs(cluster.join(name))
        prefix = f"{cluster.url}/{name}"
    else:
        prefix = str(tmp_path / "plain")
        os.makedirs(prefix)
    reference = tmp_path / "reference"
    reference.mkdir()
    return prefix, reference


def mixed_frame(rows: int = 40) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    return pl.DataFrame({
        "key": rng.integers(0, 3, rows),
        "name": [None if i % 7 == 0 else f"name {i} é/%=" for i in range(rows)],
        "day": [None if i % 5 == 0 else datetime.date(2025, 1, 1 + i % 3) for i in range(rows)],
        "tokens": [None if i % 6 == 0 else list(range(i % 4)) for i in range(rows)],
        "score": rng.normal(size=rows),
    })


def listing(client, root: str) -> list[str]:
    """Every file under ``root``, relative to it, sorted."""
    found, pending = [], [root]
    while pending:
        directory = pending.pop()
        for name in client.listdir(directory):
            path = posixpath.join(directory, name)
            (pending if client.stat(path).type == "directory" else found).append(path)
    return sorted(posixpath.relpath(p, root) for p in found)


def test_file_round_trip_and_lazy_queries_match_polars(place):
    prefix, reference = place
    frame = mixed_frame()
    tables.write_parquet(frame, f"{prefix}/t.parquet", row_group_size=8)
    frame.write_parquet(reference / "t.parquet", row_group_size=8)
    got = tables.read_parquet(f"{prefix}/t.parquet")
    assert_frame_equal(got, frame)
    assert_frame_equal(got, pl.read_parquet(reference / "t.parquet"))
    assert_frame_equal(tables.read_parquet(f"{prefix}/t.parquet", columns=["tokens", "key"]), frame.select("tokens", "key"))

    def query(lazy):
        return lazy.filter((pl.col("score") > 0) & pl.col("day").is_not_null()).select("name", "day", "score")
    assert_frame_equal(query(tables.scan_parquet(f"{prefix}/t.parquet")).collect(),
                       query(pl.scan_parquet(reference / "t.parquet")).collect())


def test_hive_dataset_matches_polars_layout_and_reads(place):
    prefix, reference = place
    frame = mixed_frame().with_columns(pl.col("name").str.slice(0, 7).alias("part"))
    tables.write_parquet(frame, f"{prefix}/ds", partition_by=["key", "part"])
    frame.write_parquet(reference / "ds", partition_by=["key", "part"])
    with open_location(prefix) as location:
        assert listing(location.client, location.join("ds")) == sorted(
            os.path.relpath(os.path.join(d, f), reference / "ds") for d, _, fs in os.walk(reference / "ds") for f in fs)
        assert not [n for n in location.client.listdir(location.path) if n.startswith(".")]  # no staging left
    expected = pl.read_parquet(reference / "ds")
    assert_frame_equal(tables.read_parquet(f"{prefix}/ds"), expected)
    query = lambda lazy: lazy.filter(pl.col("key") == 1).select("part", "score")  # noqa: E731
    assert_frame_equal(query(tables.scan_parquet(f"{prefix}/ds")).collect(), query(pl.scan_parquet(reference / "ds")).collect())


def test_hive_keys_outside_the_files_get_polars_types(cluster, tmp_path):
    """A dataset written by another tool (keys only in the paths): Int64 / String keys, as polars infers."""
    target = cluster.child("foreign")
    for key, city in ((1, "a b"), (20, "c")):
        tables.write_parquet(pl.DataFrame({"v": [key * 1.5]}), target.child(f"k={key}", f"city={city.replace(' ', '%20')}", "p.parquet"))
        local = tmp_path / f"k={key}" / f"city={city.replace(' ', '%20')}"
        local.mkdir(parents=True)
        pl.DataFrame({"v": [key * 1.5]}).write_parquet(local / "p.parquet")
    assert_frame_equal(tables.read_parquet(target), pl.read_parquet(tmp_path, hive_partitioning=True))


def test_pushdown_reads_only_the_needed_bytes(cluster):
    """One column of a wide table, and a filter that excludes whole row groups, read a small part of the
    file through the client (counted), with the same result as polars on the full frame."""
    rng = np.random.default_rng(1)
    rows, groups = 8000, 10
    wide = pl.DataFrame({"k": np.arange(rows)} | {f"c{i}": rng.random(rows) for i in range(12)})
    location, client = counting(cluster.child("wide.parquet"))
    tables.write_parquet(wide, location, row_group_size=rows // groups, compression="uncompressed")
    size = cluster.client.stat(location.path).size

    client.reset()
    assert_frame_equal(tables.read_parquet(location), wide)
    whole = client.bytes
    assert whole >= size * 0.9
    client.reset()
    assert_frame_equal(tables.read_parquet(location, columns=["c3"]), wide.select("c3"))
    one_column = client.bytes
    client.reset()
    assert_frame_equal(tables.scan_parquet(location).filter(pl.col("k") < 500).collect(), wide.filter(pl.col("k") < 500))
    filtered = client.bytes
    assert one_column < whole / 5, (one_column, whole)
    assert filtered < whole / 4, (filtered, whole)


def test_partition_filter_skips_other_partitions(cluster):
    frame = pl.DataFrame({"part": np.repeat(np.arange(8), 500), "x": np.random.default_rng(2).random(4000)})
    location, client = counting(cluster.child("parts"))
    tables.write_parquet(frame, location, partition_by="part")
    lazy = tables.scan_parquet(location)  # discovery reads the first file's footer
    client.reset()
    assert_frame_equal(lazy.collect(), frame)
    whole = client.bytes
    client.reset()
    assert_frame_equal(lazy.filter(pl.col("part") == 3).collect(), frame.filter(pl.col("part") == 3))
    assert client.bytes < whole / 5, (client.bytes, whole)  # one partition of 8 (by its directory name)


def test_writes_replace_atomically_and_refuse_without_replace(place):
    prefix, _ = place
    old, new = pl.DataFrame({"a": [1, 2]}), pl.DataFrame({"a": [3]})
    for kwargs in ({}, {"partition_by": "a"}):
        url = f"{prefix}/x{len(kwargs)}"
        tables.write_parquet(old, url, **kwargs)
        with pytest.raises(FileExistsError, match=f"x{len(kwargs)}"):
            tables.write_parquet(new, url, replace=False, **kwargs)
        with pytest.raises(Exception):  # a write that fails midway leaves the old table whole
            tables.write_parquet(new, url, compression="no-such-codec", **kwargs)
        assert_frame_equal(tables.read_parquet(url), old)
        tables.write_parquet(new, url, **kwargs)
        assert_frame_equal(tables.read_parquet(url), new)
    with open_location(prefix) as location:
        assert not [n for n in location.client.listdir(location.path) if n.startswith(".")]


def test_errors_name_the_path(place):
    prefix, _ = place
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        tables.read_parquet(f"{prefix}/missing.parquet")
    with pytest.raises(FileNotFoundError, match="missing"):
        tables.scan_parquet(f"{prefix}/missing")
    with open_location(prefix) as location:
        with location.client.open(location.join("bad.parquet"), "wb") as file:
            file.write(b"PAR1" + b"not parquet at all" * 10)
        location.client.makedirs(location.join("empty"))
    with pytest.raises(ValueError, match="bad.parquet"):
        tables.read_parquet(f"{prefix}/bad.parquet")
    with pytest.raises((ValueError, FileNotFoundError), match="empty"):
        tables.read_parquet(f"{prefix}/empty")
    with pytest.raises(ValueError, match="unknown scheme 's3'"):
        tables.read_parquet("s3://bucket/t.parquet")
    with pytest.raises(TypeError, match="frame"):
        tables.write_parquet({"a": [1]}, f"{prefix}/t.parquet")
    with pytest.raises(ValueError, match="partition_by"):
        tables.write_parquet(pl.DataFrame({"a": [1]}), f"{prefix}/t", partition_by="b")
