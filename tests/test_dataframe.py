"""storage.dataframe: every operator against the same computation in polars on the whole frame, the
repartition invariants, explain(), and bad inputs. One in-process session for the module (the executors
are tested in test_dataframe_exec.py)."""

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

import storage.dataframe as spd
from storage.dataframe import TaskError


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    session = spd.init(tmp_path_factory.mktemp("jobs"), executor="inprocess", progress=False)
    yield session
    session.shutdown()


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(7)
    n = 1003
    return pl.DataFrame({"k": rng.integers(0, 37, n), "v": rng.normal(size=n), "s": [f"w{i % 11}" for i in range(n)],
                         "id": np.arange(n)})


@pytest.fixture(scope="module")
def files(tmp_path_factory, frame):
    """The frame as 5 parquet files of unequal sizes."""
    directory = tmp_path_factory.mktemp("input")
    cuts = [0, 100, 400, 450, 900, 1003]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        frame.slice(a, b - a).write_parquet(directory / f"f{i}.parquet")
    return directory


def same_rows(got: pl.DataFrame, want: pl.DataFrame, by=("id",)) -> None:
    assert_frame_equal(got.sort(list(by)), want.sort(list(by)), check_dtypes=False)


def partitions(sp, df) -> list[pl.DataFrame]:
    return [sp.files.read_parquet(url) for m in sp.compute(df.node) for url, _ in m.files]


def test_read_parquet_one_partition_per_file(sp, files, frame):
    df = sp.read_parquet(str(files / "*.parquet"))
    assert df.num_partitions == 5
    assert_frame_equal(df.to_polars(), frame)  # partition order is file order
    assert df.count() == frame.height
    assert_frame_equal(sp.read_parquet(str(files), columns=["id", "k"]).to_polars(), frame.select("id", "k"))
    assert_frame_equal(df.take(7), frame.head(7))


def test_map_filter_with_expressions(sp, files, frame):
    df = sp.read_parquet(str(files)).map([pl.col("id"), (pl.col("v") * 2).alias("v2"), pl.col("k")])
    df = df.filter((pl.col("k") > 5) & (pl.col("v2") < 1.0))
    want = frame.select(pl.col("id"), (pl.col("v") * 2).alias("v2"), pl.col("k")).filter(
        (pl.col("k") > 5) & (pl.col("v2") < 1.0))
    same_rows(df.to_polars(), want)
    assert df.schema == want.schema


def test_map_filter_flat_map_map_batches_with_functions(sp, files, frame):
    df = sp.read_parquet(str(files))
    got = df.map(lambda f: f.with_columns(w=pl.col("v").abs())).filter(lambda f: f["k"] % 3 == 0).to_polars()
    same_rows(got, frame.with_columns(w=pl.col("v").abs()).filter(pl.col("k") % 3 == 0))
    flat = df.flat_map(lambda row: [{"id": row["id"], "j": j} for j in range(row["k"] % 3)]).to_polars()
    want = frame.select("id", j=pl.int_ranges(0, pl.col("k") % 3)).explode("j").drop_nulls("j")
    same_rows(flat, want, by=("id", "j"))
    sizes = []
    batched = df.map_batches(lambda b: (sizes.append(b.height), b.with_columns(n=pl.lit(b.height)))[1], batch_size=128)
    got = batched.to_polars()
    assert got["n"].max() <= 128 and got.height == frame.height
    same_rows(got.drop("n"), frame)


def test_partial_sort_sorts_each_partition(sp, files, frame):
    parts = partitions(sp, sp.read_parquet(str(files)).partial_sort(["k", "id"]))
    assert len(parts) == 5
    for part in parts:
        assert_frame_equal(part, part.sort(["k", "id"]))
    same_rows(pl.concat(parts), frame)


def test_partial_sql_with_one_and_two_inputs(sp, files, frame):
    df = sp.read_parquet(str(files)).repartition(4, hash_by="k")
    sums = sp.partial_sql("select k, sum(v) as s, count(*) as c from {0} group by k", df)
    want = frame.group_by("k").agg(s=pl.col("v").sum(), c=pl.len())
    got = sums.to_polars()
    assert got["k"].n_unique() == got.height  # a key lives in one partition only
    assert_frame_equal(got.sort("k"), want.sort("k"), check_dtypes=False)
    names = sp.from_polars(pl.DataFrame({"k": np.arange(37), "name": [f"n{i}" for i in range(37)]}), 2)
    joined = sp.partial_sql("select {0}.id, {1}.name from {0} join {1} on {0}.k = {1}.k",
                            df, names.repartition(4, hash_by="k"))
    same_rows(joined.to_polars(), frame.join(pl.DataFrame({"k": np.arange(37), "name": [f"n{i}" for i in range(37)]}),
                                             on="k").select("id", "name"))


def test_constructors(sp, frame):
    assert_frame_equal(sp.from_polars(frame, 3).to_polars(), frame)
    assert_frame_equal(sp.from_arrow(frame.to_arrow(), 2).to_polars(), frame)
    assert sp.from_items([{"a": 1}, {"a": 2}, {"a": 3}], 2).to_polars()["a"].to_list() == [1, 2, 3]
    assert sp.from_items([5, 6]).to_arrow() == pa.table({"item": [5, 6]})


def test_read_csv(sp, tmp_path, frame):
    for i in range(2):
        frame.slice(i * 500, 500).select("id", "k", "s").write_csv(tmp_path / f"c{i}.csv", separator=";")
    df = sp.read_csv([str(tmp_path / "c0.csv"), str(tmp_path / "c1.csv")], separator=";",
                     schema={"id": pl.Int64, "k": pl.Int64, "s": pl.String})
    assert df.num_partitions == 2
    assert_frame_equal(df.to_polars(), frame.head(1000).select("id", "k", "s"))


def test_hash_repartition_invariants(sp, files, frame):
    parts = partitions(sp, sp.read_parquet(str(files)).repartition(6, hash_by=["k", "s"]))
    assert len(parts) == 6
    owner = {}
    for i, part in enumerate(parts):
        for key in part.select("k", "s").unique().iter_rows():
            assert owner.setdefault(key, i) == i, f"key {key} in partitions {owner[key]} and {i}"
    same_rows(pl.concat(parts), frame)  # every row exactly once
    assert sorted(pl.concat(parts)["id"].to_list()) == list(range(frame.height))


@pytest.mark.parametrize("boundaries", [[5, 12, 12, 30], None])
def test_range_repartition_invariants(sp, files, frame, boundaries):
    df = sp.read_parquet(str(files)).map([pl.all()]).repartition(5, by="k", boundaries=boundaries)
    parts = partitions(sp, df)
    assert len(parts) == 5
    if boundaries is not None:
        edges = [None, *boundaries, None]
        for i, part in enumerate(parts):
            if part.height:
                assert edges[i] is None or part["k"].min() >= edges[i]
                assert edges[i + 1] is None or part["k"].max() < edges[i + 1]
        assert parts[2].height == 0  # 12 <= k < 12
    nonempty = [p for p in parts if p.height]
    for low, high in zip(nonempty, nonempty[1:]):
        assert low["k"].max() < high["k"].min()  # ordered
    if boundaries is None:  # sampled quantiles spread the rows
        assert max(p.height for p in parts) < 0.45 * frame.height
    same_rows(pl.concat(parts), frame)  # covering, each row once


def test_range_repartition_on_strings(sp, frame):
    parts = partitions(sp, sp.from_polars(frame, 3).repartition(3, by="s", boundaries=["w3", "w6"]))
    assert parts[0]["s"].max() < "w3" <= parts[1]["s"].min() and parts[1]["s"].max() < "w6" <= parts[2]["s"].min()


def test_evenly_and_by_rows(sp, files, frame):
    df = sp.read_parquet(str(files))
    grouped = partitions(sp, df.repartition(2))
    assert [p.height for p in grouped] == [400, 603]  # files {0,1} and {2,3,4}
    assert [p.height for p in partitions(sp, df.repartition(7))].count(0) == 2  # 5 files, 7 partitions
    rows = partitions(sp, df.repartition(4, by_rows=True))
    assert max(p.height for p in rows) - min(p.height for p in rows) <= 1
    assert_frame_equal(pl.concat(rows), frame)  # by rows keeps the order
    computed = partitions(sp, df.filter(pl.col("k") < 20).repartition(3))
    same_rows(pl.concat(computed), frame.filter(pl.col("k") < 20))


def test_random_shuffle(sp, frame):
    df = sp.from_polars(frame, 4)
    parts = partitions(sp, df.random_shuffle(seed=3))
    assert len(parts) == 4 and all(p.height > 150 for p in parts)
    assert all(p["id"].to_list() != sorted(p["id"].to_list()) for p in parts)  # random order inside
    same_rows(pl.concat(parts), frame)
    assert_frame_equal(df.random_shuffle(seed=3).to_polars(), pl.concat(parts))  # reproducible


def test_write_parquet_publishes_one_file_per_partition(sp, files, frame, tmp_path):
    target = tmp_path / "out" / "table"
    sp.read_parquet(str(files)).repartition(3, hash_by="k").write_parquet(str(target))
    assert sorted(os.listdir(target)) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]  # staging gone
    same_rows(pl.read_parquet(target), frame)
    sp.from_polars(frame.head(10)).write_parquet(str(target))  # replaces
    assert pl.read_parquet(target).height == 10


def test_explain_lists_stages(sp, files):
    df = sp.read_parquet(str(files)).filter(pl.col("k") > 1).repartition(3, hash_by="k").partial_sort("v")
    text = df.explain()
    assert "stage 1" in text and "stage 2" in text and "stage 3" not in text
    assert "filter" in text and "hash_by=['k'] -> 3 partitions" in text and "partial_sort(by=['v'])" in text
    assert "exchange" in text


def test_bad_inputs_name_what_is_wrong(sp, files, tmp_path):
    df = sp.read_parquet(str(files))
    with pytest.raises(ValueError, match="nope"):
        df.map(pl.col("nope"))
    with pytest.raises(ValueError, match="nope"):
        df.filter(pl.col("nope") > 1)
    with pytest.raises(ValueError, match="hash_by='nope'"):
        df.repartition(2, hash_by="nope")
    with pytest.raises(ValueError, match="by='nope'"):
        df.repartition(2, by="nope")
    with pytest.raises(ValueError, match="nope"):
        df.partial_sort("nope")
    with pytest.raises(TypeError, match="filter.*Int64, expected Boolean"):
        df.filter(pl.col("k") + 1)
    with pytest.raises(TypeError, match="map: expected a polars expression"):
        df.map(5)
    with pytest.raises(TypeError, match="hash_by"):
        df.repartition(2, hash_by=5)
    with pytest.raises(ValueError, match="npartitions"):
        df.repartition(0)
    with pytest.raises(ValueError, match="boundaries has 1 keys; 3 partitions need 2"):
        df.repartition(3, by="k", boundaries=[4])
    with pytest.raises(ValueError, match="non-decreasing"):
        df.repartition(3, by="k", boundaries=[9, 4])
    with pytest.raises(ValueError, match="placeholders"):
        sp.partial_sql("select * from {1}", df)
    with pytest.raises(ValueError, match="different partition counts"):
        sp.partial_sql("select * from {0} join {1} using (k)", df, df.repartition(2))
    with pytest.raises(ValueError, match="nope://"):
        sp.read_parquet("nope://x/y.parquet")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        sp.read_parquet(str(tmp_path / "missing.parquet"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        sp.read_parquet(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match="columns \\['nope'\\]"):
        sp.read_parquet(str(files), columns=["nope"])
    with pytest.raises(ValueError, match="executor"):
        spd.init(tmp_path, executor="threads")


def test_runtime_error_names_stage_partition_and_input(sp, files):
    df = sp.read_parquet(str(files)).map(lambda f: f.select("missing_column"))
    with pytest.raises(TaskError, match="missing_column") as caught:
        df.count()
    message = str(caught.value)
    assert caught.value.partition == 0 and "f0.parquet" in message and "stage parquet.map-" in message
    with pytest.raises(TaskError, match="returned int"):
        sp.read_parquet(str(files)).map(lambda f: 3).count()
