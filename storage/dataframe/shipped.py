"""Running a task in another process (a pool worker, a Ray worker): its payload and the IO it cannot do.

A worker opens every storage URL itself (plain directories and mounts as OS files, ``3fs+tcp://`` by
connecting to the cluster's servers), except an embedded 3FS (``3fs+embedded://``), which only the
process that owns it can open. For those the *driver serves the IO*: ``prepare`` reads the task's
embedded inputs into the payload, the worker computes with ``ShippedFiles`` (reads come from the payload,
writes to embedded URLs are collected as bytes), and ``finish`` writes the collected files atomically in
the driver, the marker last. The compute still runs in parallel; the embedded 3FS's IO is serialised
through the driver. For parallel IO use a plain directory, a 3FS mount or ``3fs+tcp://``.

The payload is ``cloudpickle`` bytes, so lambdas and closures travel to workers.
"""

from __future__ import annotations

import io

import cloudpickle
import polars as pl

from storage.dataframe.files import StorageFiles, is_process_local, parquet_bytes
from storage.dataframe.partitioning import Manifest
from storage.dataframe.tasks import Task, execute_task


class ShippedFiles:
    """The slice of ``StorageFiles`` a task uses, with process-local URLs served from/to memory."""

    def __init__(self, prefetched: dict[str, bytes], files: StorageFiles) -> None:
        self.prefetched, self.files = prefetched, files
        self.outputs: dict[str, bytes] = {}

    def read_parquet(self, url: str, columns: list[str] | None = None) -> pl.DataFrame:
        if url in self.prefetched:
            return pl.read_parquet(io.BytesIO(self.prefetched[url]), columns=columns)
        return self.files.read_parquet(url, columns)

    def read_csv(self, url: str, **options) -> pl.DataFrame:
        if url in self.prefetched:
            return pl.read_csv(io.BytesIO(self.prefetched[url]), **options)
        return self.files.read_csv(url, **options)

    def write_bytes(self, url: str, data: bytes) -> None:
        if is_process_local(url):
            self.outputs[url] = data
        else:
            self.files.write_bytes(url, data)

    def write_parquet(self, url: str, frame: pl.DataFrame) -> None:
        self.write_bytes(url, parquet_bytes(frame))


def prepare(task: Task, files: StorageFiles) -> bytes:
    """The payload for ``run_payload``: the task and the bytes of its process-local inputs."""
    prefetched = {piece.url: files.read_bytes(piece.url)
                  for group in task.inputs for piece in group if is_process_local(piece.url)}
    return cloudpickle.dumps((task, prefetched))


def run_payload(payload: bytes) -> bytes:
    """Worker side: runs the task; returns (manifest, collected outputs) as pickled bytes.
    A failure raises ``TaskError`` (picklable), as ``execute_task`` does."""
    task, prefetched = cloudpickle.loads(payload)
    with StorageFiles() as files:
        shipped = ShippedFiles(prefetched, files)
        manifest = execute_task(task, shipped)
        return cloudpickle.dumps((manifest, shipped.outputs))


def finish(result: bytes, files: StorageFiles) -> Manifest:
    """Driver side: writes what the worker collected (in its order: data files, then the marker)."""
    manifest, outputs = cloudpickle.loads(result)
    for url, data in outputs.items():
        files.write_bytes(url, data)
    return manifest
