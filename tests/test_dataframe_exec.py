"""storage.dataframe executors: the process pool on a plain directory and on an embedded 3FS (the driver
serves its IO), a worker SIGKILLed mid-run and the rerun of the same job, and Ray on a local instance.

One pool of 2 workers per data root for the module (starting workers is the cost)."""

import os
import signal
import sys

import cloudpickle
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import storage.dataframe as spd
from storage import tables
from storage.dataframe import TaskError
from storage.dataframe.planner import plan_stages

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module

ROOTS = ["plain", "embedded"]


def data_root(kind: str, base) -> str:
    return str(base / "jobs") if kind == "plain" else f"3fs+embedded://{base}/cluster/jobs"


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(11)
    n = 6000
    return pl.DataFrame({"part": np.arange(n) // 1000, "k": rng.integers(0, 50, n), "v": rng.normal(size=n),
                         "id": np.arange(n)})


@pytest.fixture(scope="module", params=ROOTS)
def pool_session(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    session = spd.init(data_root(request.param, base), num_executors=2, executor="process", progress=False)
    yield request.param, base, session
    session.shutdown()


def pipeline(sp, frame, fn=None):
    df = sp.from_polars(frame, 6)
    if fn is not None:
        df = df.map(fn)
    df = df.filter(pl.col("k") != 3).repartition(3, hash_by="k")
    return sp.partial_sql("select k, sum(v) as s, count(*) as c from {0} group by k", df)


def reference(frame):
    return frame.filter(pl.col("k") != 3).group_by("k").agg(s=pl.col("v").sum(), c=pl.len()).sort("k")


def test_process_pool_matches_polars(pool_session, frame):
    kind, base, sp = pool_session
    assert_frame_equal(pipeline(sp, frame).to_polars().sort("k"), reference(frame), check_dtypes=False)
    ranged = sp.from_polars(frame, 4).repartition(4, by="v").partial_sort("v").to_polars()
    assert_frame_equal(ranged, frame.sort("v"))  # range partitions, each sorted: globally sorted
    out = data_root(kind, base) + "/out"
    sp.from_polars(frame, 3).repartition(2, hash_by="k").write_parquet(out + "/t")
    assert_frame_equal(tables.read_parquet(out + "/t").sort("id"), frame)
    assert_frame_equal(sp.read_parquet(out + "/t/*.parquet").to_polars().sort("id"), frame)  # a glob on kind
    with pytest.raises(TaskError, match="partition 2 .*nope"):  # an error comes back from the worker
        sp.from_polars(frame, 3).map(lambda f: f.select("nope") if f["part"][0] >= 4 else f).count()


def kill_once(flag_dir: str):
    """A map function that logs each partition it runs and SIGKILLs its own worker on partition 5, the
    first time (a flag file remembers)."""
    def fn(frame: pl.DataFrame) -> pl.DataFrame:
        part = int(frame["part"][0])
        with open(os.path.join(flag_dir, f"ran-{part}-{os.getpid()}-{os.urandom(4).hex()}"), "w"):
            pass
        flag = os.path.join(flag_dir, "killed")
        if part == 5 and not os.path.exists(flag):
            open(flag, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return frame
    return fn


def runs(flag_dir) -> list[int]:
    return sorted(int(n.split("-")[1]) for n in os.listdir(flag_dir) if n.startswith("ran-"))


@pytest.mark.parametrize("kind", ROOTS)
def test_killed_task_rerun_completes_and_skips_finished(kind, tmp_path, frame):
    flags = tmp_path / "flags"
    flags.mkdir()
    root = data_root(kind, tmp_path)
    first = spd.init(root, num_executors=2, progress=False)
    job = first.job_id
    try:
        with pytest.raises(TaskError, match=r"worker process died .*partitions \[.*5\]"):
            pipeline(first, frame, kill_once(str(flags))).to_polars()
        map_stage = [s for s in _stages(first, frame, flags) if s.id.startswith("map.")][0]
        finished = set(first.runner.finished(map_stage))
    finally:
        first.shutdown()
    before = runs(flags)
    assert 5 not in finished
    if kind == "plain":
        assert finished, "tasks before the killed one had published their outputs"
    for name in os.listdir(flags):
        if name.startswith("ran-"):
            os.remove(flags / name)
    with spd.init(root, num_executors=2, job_id=job, progress=False) as second:
        got = pipeline(second, frame, kill_once(str(flags))).to_polars()
        assert set(second.runner.skipped[map_stage.id]) == finished
    assert_frame_equal(got.sort("k"), reference(frame), check_dtypes=False)  # no duplicates, nothing lost
    assert not set(runs(flags)) & finished, "finished tasks ran again"
    assert set(runs(flags)) | finished == set(range(6)) and before


def _stages(sp, frame, flags):
    from storage.dataframe.planner import stages_in_order
    return stages_in_order(plan_stages(pipeline(sp, frame, kill_once(str(flags))).node))


@pytest.mark.slow
def test_ray_executor_on_local_ray(tmp_path, frame):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'jaxseek[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"Ray cannot start here: {type(error).__name__}: {error}")
    try:
        with spd.init(tmp_path / "jobs", executor="ray", progress=False) as sp:
            assert_frame_equal(pipeline(sp, frame).to_polars().sort("k"), reference(frame), check_dtypes=False)
            with pytest.raises(TaskError, match="partition 1 .*nope"):
                sp.from_polars(frame, 2).map(lambda f: f.select("nope") if f["part"][0] >= 3 else f).count()
        with spd.init(f"3fs+embedded://{tmp_path}/cluster/jobs", executor="ray", progress=False) as sp:
            assert_frame_equal(pipeline(sp, frame).to_polars().sort("k"), reference(frame), check_dtypes=False)
    finally:
        ray.shutdown()
