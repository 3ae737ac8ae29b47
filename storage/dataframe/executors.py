"""Executors: where a stage's tasks run. All share one contract:

``run(tasks, files, on_done)`` runs every task (in any order), calls ``on_done(task, manifest)`` in the
driver as each finishes, and raises the first ``TaskError`` (after the tasks already running have
ended or been abandoned); ``close()`` releases workers. ``files`` is the driver's ``StorageFiles``.

  * ``InProcessExecutor``: one task after another in the driver (debugging; an embedded 3FS directly);
  * ``ProcessPoolExecutor``: a pool of ``spawn``ed worker processes (the default; ``num_executors``
    workers, all cores by default), started on first use and kept for the session; workers open storage
    URLs themselves, the driver serves an embedded 3FS's IO (``shipped.py``). A worker that dies (killed,
    out of memory) fails the stage with a ``TaskError`` naming the partitions not finished (the pool
    cannot tell which one the dead worker ran); the pool is then
    rebuilt for the next run, and a rerun skips the tasks that had finished;
  * ``RayExecutor`` (``ray_executor.py``): tasks as Ray remote functions.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from collections.abc import Callable

from storage.dataframe.files import StorageFiles
from storage.dataframe.partitioning import Manifest
from storage.dataframe.shipped import finish, prepare, run_payload
from storage.dataframe.tasks import Task, TaskError, execute_task

OnDone = Callable[[Task, Manifest], None]


class InProcessExecutor:
    name = "inprocess"

    def run(self, tasks: list[Task], files: StorageFiles, on_done: OnDone) -> None:
        for task in tasks:
            on_done(task, execute_task(task, files))

    def close(self) -> None:
        pass


def default_workers() -> int:
    """The usable cores of this process (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class ProcessPoolExecutor:
    name = "process"

    def __init__(self, num_workers: int | None = None) -> None:
        self.num_workers = num_workers or default_workers()
        self._pool: futures.ProcessPoolExecutor | None = None

    def _get_pool(self) -> futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = futures.ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def run(self, tasks: list[Task], files: StorageFiles, on_done: OnDone) -> None:
        if not tasks:
            return
        pool = self._get_pool()
        running = {pool.submit(run_payload, prepare(task, files)): task for task in tasks}
        try:
            for future in futures.as_completed(running):
                task = running[future]
                try:
                    result = future.result()
                except futures.process.BrokenProcessPool:
                    self._discard_pool()
                    lost = sorted(t.partition for f, t in running.items() if f is future or not f.done()
                                  or f.exception() is not None)
                    raise TaskError(task.stage, lost[0], task.input_urls() if task.partition == lost[0] else (),
                                    f"a worker process died (killed, or out of memory) while running one of "
                                    f"the partitions {lost} of this stage; rerun the job to finish them") from None
                on_done(task, finish(result, files))
        except BaseException:
            for future in running:
                future.cancel()
            raise

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._discard_pool()


def make_executor(kind: str, num_executors: int | None, ray_address: str | None = None):
    """The executor named ``kind``: ``process`` (default), ``inprocess`` or ``ray``."""
    if kind == "process":
        return ProcessPoolExecutor(num_executors)
    if kind == "inprocess":
        return InProcessExecutor()
    if kind == "ray":
        from storage.dataframe.ray_executor import RayExecutor
        return RayExecutor(num_executors, ray_address)
    raise ValueError(f"executor: expected 'process', 'inprocess' or 'ray', got {kind!r}")
