"""One task: read a partition's inputs, apply the stage's operators, write its output files atomically,
then its completion marker.

Contract (what makes reruns safe):
  * output file names are fixed by (stage, partition[, target]) and every file is written atomically
    (``StorageFiles.write_bytes``: temporary + rename), so running a task twice replaces its files with
    identical ones: no duplicates, no partial files;
  * the marker (``<stage dir>/_done/<partition>.json``, the task's ``Manifest``) is written last; a task
    whose marker exists is finished, and a rerun of the same job skips it;
  * a failure raises ``TaskError`` naming the stage, the partition, the input files and the cause.
"""

from __future__ import annotations

import dataclasses
import json

import polars as pl

from storage.dataframe.files import join_url
from storage.dataframe.operators import Operator
from storage.dataframe.partitioning import InputSlice, Manifest, Splitter
from storage.dataframe.plan import FileFormat

MARKER_DIR = "_done"


class TaskError(RuntimeError):
    """A task failed: ``stage``, ``partition``, ``inputs`` (the files it read) and the ``cause`` (text)."""

    def __init__(self, stage: str, partition: int, inputs: tuple[str, ...], cause: str) -> None:
        self.stage, self.partition, self.inputs, self.cause = stage, partition, tuple(inputs), cause
        shown = ", ".join(self.inputs[:4]) + (f", ... ({len(self.inputs)} files)" if len(self.inputs) > 4 else "")
        super().__init__(f"stage {stage}, partition {partition} (inputs: {shown or 'none'}) failed: {cause}")

    def __reduce__(self):
        return TaskError, (self.stage, self.partition, self.inputs, self.cause)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything a worker needs, as plain data: the stage id and directories are storage URLs."""

    stage: str
    partition: int
    inputs: tuple[tuple[InputSlice, ...], ...]  # one group of slices per input DataFrame
    formats: tuple[FileFormat, ...]
    ops: tuple[Operator, ...]
    splitter: Splitter | None
    output_dir: str
    marker_dir: str

    def output_urls(self) -> list[str]:
        base = f"part-{self.partition:05d}"
        if self.splitter is None:
            return [join_url(self.output_dir, base + ".parquet")]
        return [join_url(self.output_dir, f"{base}-{j:05d}.parquet") for j in range(self.splitter.n)]

    @property
    def marker(self) -> str:
        return join_url(self.marker_dir, marker_name(self.partition))

    def input_urls(self) -> tuple[str, ...]:
        return tuple(s.describe() for group in self.inputs for s in group)


def marker_name(partition: int) -> str:
    return f"{partition:05d}.json"


def manifest_bytes(manifest: Manifest) -> bytes:
    return json.dumps({"files": [list(f) for f in manifest.files]}).encode()


def parse_manifest(data: bytes) -> Manifest:
    return Manifest(tuple((url, int(rows)) for url, rows in json.loads(data)["files"]))


def read_slice(files, piece: InputSlice, fmt: FileFormat) -> pl.DataFrame:
    """One input slice as a frame (``files``: a ``StorageFiles`` or ``ShippedFiles``)."""
    if fmt.kind == "csv":
        frame = files.read_csv(piece.url, schema=fmt.schema, separator=fmt.separator)
        if fmt.columns is not None:
            frame = frame.select(list(fmt.columns))
    else:
        frame = files.read_parquet(piece.url, list(fmt.columns) if fmt.columns is not None else None)
    if piece.offset or piece.length is not None:
        frame = frame.slice(piece.offset, piece.length)
    return frame


def concat_frames(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Frames stacked (columns matched by name; column-less empty frames from empty partitions dropped)."""
    kept = [f for f in frames if f.width or f.height]
    if not kept:
        return frames[0] if frames else pl.DataFrame()
    return kept[0] if len(kept) == 1 else pl.concat(kept, how="diagonal_relaxed")


def compute(task: Task, files) -> list[pl.DataFrame]:
    """The task's output frames (one, or one per target partition for a producer)."""
    frames = [concat_frames([read_slice(files, piece, fmt) for piece in group])
              for group, fmt in zip(task.inputs, task.formats)]
    for op in task.ops:
        frames = [op.apply(frames, task.partition)]
    if len(frames) != 1:
        raise ValueError(f"{len(frames)} inputs and no operator combining them")
    return task.splitter.split(frames[0], task.partition) if task.splitter is not None else frames


def execute_task(task: Task, files) -> Manifest:
    """Runs ``task`` with ``files`` (``StorageFiles`` or ``ShippedFiles``); see the module contract."""
    try:
        outputs = compute(task, files)
        urls = task.output_urls()
        for url, frame in zip(urls, outputs):
            files.write_parquet(url, frame)
        manifest = Manifest(tuple((url, frame.height) for url, frame in zip(urls, outputs)))
        files.write_bytes(task.marker, manifest_bytes(manifest))
        return manifest
    except TaskError:
        raise
    except Exception as error:  # noqa: BLE001 - every failure is reported with the task's identity
        cause = f"{type(error).__name__}: {error}"
        raise TaskError(task.stage, task.partition, task.input_urls(), cause) from error
