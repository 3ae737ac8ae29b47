"""``RayExecutor``: a stage's tasks as Ray remote functions (``pip install jaxseek[ray]``).

As in smallpond, the data never goes through Ray's object store: a task's inputs and outputs are files
on shared storage (a directory every node mounts, a 3FS mount, ``3fs+tcp://``) and a remote call carries
only the task description and returns its manifest. An embedded 3FS belongs to the driver process, so
for such URLs the driver serves the bytes (``shipped.py``): correct, but the IO is the driver's.

``RayExecutor(num_cpus, address)`` joins a running Ray (``ray.is_initialized()``, or ``address``) or
starts a local one with ``num_cpus`` CPUs (all cores by default) and no dashboard; it shuts down only a
Ray it started. Workers import this package from the driver's source tree (``PYTHONPATH`` in the runtime
environment), so a checkout works without installing it on the workers of a local Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage.dataframe.files import StorageFiles
from storage.dataframe.shipped import finish, prepare, run_payload
from storage.dataframe.tasks import Task, TaskError


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError("executor='ray' needs Ray: pip install 'jaxseek[ray]'") from error
    return ray


def source_root() -> str:
    """The directory holding the ``storage`` package this module was imported from."""
    return str(Path(__file__).resolve().parents[2])


class RayExecutor:
    name = "ray"

    def __init__(self, num_cpus: int | None = None, address: str | None = None) -> None:
        ray = import_ray()
        self._ray, self._owns = ray, False
        if not ray.is_initialized():
            path = os.pathsep.join(p for p in (source_root(), os.environ.get("PYTHONPATH")) if p)
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
            self._owns = True
        self._remote = ray.remote(num_cpus=1, max_retries=0)(run_payload)

    def run(self, tasks: list[Task], files: StorageFiles, on_done) -> None:
        ray = self._ray
        pending = {self._remote.remote(prepare(task, files)): task for task in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayTaskError as error:
                    cause = error.as_instanceof_cause() if hasattr(error, "as_instanceof_cause") else error
                    if isinstance(cause, TaskError):
                        raise TaskError(cause.stage, cause.partition, cause.inputs, cause.cause) from None
                    raise TaskError(task.stage, task.partition, task.input_urls(), f"Ray: {error}") from None
                except ray.exceptions.RayError as error:
                    raise TaskError(task.stage, task.partition, task.input_urls(),
                                    f"Ray worker failed: {type(error).__name__}: {error}") from None
                on_done(task, finish(result, files))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False
