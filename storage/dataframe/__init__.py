"""A smallpond-style lazy, partitioned DataFrame on polars, over 3FS or any storage URL.

    import polars as pl
    import storage.dataframe as spd
    sp = spd.init(data_root="/tmp/jobs")                  # executor="process" (default), "inprocess", "ray"
    df = sp.read_parquet("/data/events/*.parquet")        # one partition per file
    df = df.repartition(8, hash_by="user").filter(pl.col("ms") > 0)
    sums = sp.partial_sql('select "user", sum(ms) as ms from {0} group by "user"', df)
    print(sums.explain()); sums.write_parquet("/data/ms_by_user")
    sp.shutdown()

The plan becomes stages of per-partition tasks (``planner.py``) that exchange data through files under
``<data_root>/<job_id>/``; every task output is published atomically with a completion marker, so a
rerun with the same ``job_id`` skips finished tasks (``tasks.py``, ``runner.py``). Executors:
``executors.py`` (in-process, a local process pool) and ``ray_executor.py`` (Ray, the ``[ray]`` extra).

Where workers reach the data. Process-pool and Ray workers open every storage URL themselves: plain
directories and 3FS mounts as OS files, ``3fs+tcp://`` by connecting to the cluster's server processes.
An embedded 3FS (``3fs+embedded://``) belongs to the one process that opened it (its directory lock), so
for those URLs the driver serves the IO: it reads a task's inputs into the task's payload and writes the
files the worker sends back, marker last (``shipped.py``). Compute still runs in parallel; for parallel
IO use a plain directory, a mount or ``3fs+tcp://``. Workers are ``spawn``ed: a script that uses the
process pool needs the usual ``if __name__ == "__main__":`` guard.

Modules: ``session`` (init, readers, partial_sql), ``dataframe`` (the lazy API), ``plan`` (logical
nodes), ``operators`` (per-partition operators), ``partitioning`` (splitters and routes), ``planner``
(stages, explain), ``tasks`` (one task, its atomic outputs and marker), ``runner`` (stage by stage,
skipping, progress), ``files`` (IO on storage URLs), ``shipped`` (tasks in other processes).
"""

from storage.dataframe.dataframe import DataFrame
from storage.dataframe.session import Session, init
from storage.dataframe.tasks import TaskError

__all__ = ["init", "Session", "DataFrame", "TaskError"]
