"""Runs a planned job stage by stage: skips finished tasks, shows a progress bar per stage.

For each stage, upstream first: its tasks are made from the upstream manifests (``planner.make_tasks``),
the completion markers already under ``<stage dir>/_done/`` are read (those tasks are finished: a rerun
of the same job skips them), and the executor runs the rest. A memory stage (``from_polars`` ...) is
written by the driver itself. Manifests of finished stages are kept for the session, so running a
second action on the same DataFrame reuses them.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from storage.dataframe.files import StorageFiles, join_url
from storage.dataframe.partitioning import Manifest
from storage.dataframe.planner import Stage, make_tasks, stage_dir, stages_in_order
from storage.dataframe.tasks import MARKER_DIR, Task, manifest_bytes, marker_name, parse_manifest


class Runner:
    """Runs stages for one job (``job_url`` = ``<data_root>/<job_id>``) with one executor."""

    def __init__(self, files: StorageFiles, executor, job_url: str, progress: bool = True) -> None:
        self.files, self.executor, self.job_url = files, executor, job_url
        self.progress = progress
        self.results: dict[str, list[Manifest]] = {}
        self.skipped: dict[str, list[int]] = {}  # stage id -> partitions found finished (for tests, logs)

    def run(self, final: Stage) -> list[Manifest]:
        """The manifests of ``final``'s partitions, running whatever is not finished yet."""
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), disable=not self.progress, transient=False) as bars:
            for stage in stages_in_order(final):
                if stage.id not in self.results:
                    self.results[stage.id] = self._run_stage(stage, bars)
        return self.results[final.id]

    def finished(self, stage: Stage) -> dict[int, Manifest]:
        """The stage's tasks whose markers exist, by partition."""
        markers = join_url(stage_dir(self.job_url, stage), MARKER_DIR)
        if not self.files.exists(markers):
            return {}
        found = {}
        for name in self.files.listdir(markers):
            if name.endswith(".json") and not name.startswith("."):
                found[int(name[:-5])] = parse_manifest(self.files.read_bytes(join_url(markers, name)))
        return found

    def forget(self, stage: Stage) -> None:
        """Drops the stage's markers (its outputs will be recomputed)."""
        self.files.remove(join_url(stage_dir(self.job_url, stage), MARKER_DIR), recursive=True)
        self.results.pop(stage.id, None)

    def _run_stage(self, stage: Stage, bars: Progress) -> list[Manifest]:
        done = self.finished(stage)
        self.skipped[stage.id] = sorted(done)
        bar = bars.add_task(f"{stage.id}", total=stage.num_partitions, completed=len(done))
        if stage.memory is not None:
            self._write_memory(stage, done, lambda: bars.advance(bar))
        else:
            tasks = [t for t in make_tasks(stage, self.results, self.job_url, self.files) if t.partition not in done]

            def on_done(task: Task, manifest: Manifest) -> None:
                done[task.partition] = manifest
                bars.advance(bar)

            self.executor.run(tasks, self.files, on_done)
        return [done[i] for i in range(stage.num_partitions)]

    def _write_memory(self, stage: Stage, done: dict[int, Manifest], advance) -> None:
        directory = stage_dir(self.job_url, stage)
        for i, part in enumerate(stage.memory):
            if i in done:
                continue
            url = join_url(directory, f"part-{i:05d}.parquet")
            self.files.write_parquet(url, part)
            done[i] = Manifest(((url, part.height),))
            self.files.write_bytes(join_url(directory, MARKER_DIR, marker_name(i)), manifest_bytes(done[i]))
            advance()
