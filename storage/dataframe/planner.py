"""The planner: a logical plan (``plan.py``) -> stages of per-partition tasks.

A *stage* is a chain of per-partition operators fused into one task per partition: it reads its inputs
(source files, or the outputs of upstream stages by a route: ``partitioning.py``), applies its operators,
and writes either one file per partition or, when it is the producer half of a repartition, one file per
target partition (its ``exit`` splitter). Stages break where data must cross partitions:

  * hash / random / range-with-boundaries repartition: the producer split is fused into the upstream
    chain; the consumer stage reads file j of every producer (``Exchange``);
  * range with sampled boundaries: the upstream chain is written first, its key column sampled for
    quantiles, then a split stage and the consumers;
  * evenly by partitions (``Groups``) and by rows (``Rows``): the upstream is written, consumers read
    groups of its files / row slices of them (evenly over a bare source just regroups its files);
  * a multi-input ``partial_sql``: each input is written, the SQL stage reads partition i of each.

A stage's id is its kind plus a hash of what it computes (inputs, operators, exit), so the same plan in
the same job maps to the same directories, ``<data_root>/<job_id>/<stage id>/``: a rerun finds the
completion markers of the tasks that finished and skips them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import polars as pl

from storage.dataframe.files import StorageFiles, join_url
from storage.dataframe.operators import Operator, Shuffle
from storage.dataframe.partitioning import (Exchange, Groups, HashSplit, Identity, InputSlice, Manifest,
                                            RandomSplit, RangeSplit, Route, Rows, Splitter, group_bounds,
                                            sample_boundaries, sample_rows)
from storage.dataframe.plan import PARQUET, Apply, FileFormat, FilesSource, MemorySource, Node, Repartition
from storage.dataframe.tasks import MARKER_DIR, Task, read_slice


@dataclasses.dataclass(frozen=True)
class SampledRange:
    """A range split whose boundaries come from a sample of the stage's input, when its tasks are made."""

    key: str
    n: int

    def describe(self) -> str:
        return f"range by={self.key!r}, boundaries from a sample -> {self.n} partitions"


@dataclasses.dataclass(frozen=True, eq=False)
class StageInput:
    """A source's file groups, or an upstream stage's outputs read by ``route``."""

    route: Route
    stage: Stage | None = None
    source: FilesSource | None = None

    def fingerprint(self) -> str:
        if self.stage is not None:
            return f"{self.stage.id}/{self.route}"
        return f"{self.source.format}/{[[tuple(s) for s in g] for g in self.source.groups]}"

    def describe(self) -> str:
        if self.stage is not None:
            return f"{self.route.describe()} of stage {self.stage.id}"
        return self.source.describe()


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    name: str
    inputs: tuple[StageInput, ...]
    ops: tuple[Operator, ...]
    exit: Splitter | SampledRange | None
    num_partitions: int
    memory: tuple[pl.DataFrame, ...] | None = None  # a MemorySource: the driver writes these
    output_dir: str | None = None  # None: the stage's own directory under the job

    @functools.cached_property
    def id(self) -> str:
        text = repr((self.name, [i.fingerprint() for i in self.inputs], [op.fingerprint() for op in self.ops],
                     self.exit, self.num_partitions, self.output_dir, _memory_fingerprint(self.memory)))
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def upstream(self) -> list[Stage]:
        return [i.stage for i in self.inputs if i.stage is not None]


def _memory_fingerprint(parts: tuple[pl.DataFrame, ...] | None) -> Any:
    if parts is None:
        return None
    return [(p.height, str(p.schema), int(p.hash_rows(seed=0).sum()) if p.height and p.width else 0) for p in parts]


@dataclasses.dataclass
class _Open:
    """A chain not yet closed into a stage: its inputs and the operators so far."""

    inputs: tuple[StageInput, ...]
    ops: list[Operator]
    num_partitions: int
    names: list[str]

    def bare(self) -> bool:
        return not self.ops and len(self.inputs) == 1

    def close(self, exit: Splitter | SampledRange | None = None, output_dir: str | None = None) -> Stage:
        name = ".".join(self.names + ([_exit_name(exit)] if exit is not None else [])) or "copy"
        return Stage(name[:60], self.inputs, tuple(self.ops), exit, self.num_partitions, output_dir=output_dir)


def _exit_name(exit: Splitter | SampledRange) -> str:
    kind = {HashSplit: "hash", RangeSplit: "range", RandomSplit: "random", SampledRange: "range"}[type(exit)]
    return f"{kind}{exit.n}"


def _op_name(op: Operator) -> str:
    return {"Map": "map", "Filter": "filter", "FlatMap": "flat_map", "MapBatches": "map_batches",
            "Sort": "sort", "Shuffle": "shuffle", "Sql": "sql"}[type(op).__name__]


def _stage_of(open_: _Open) -> Stage:
    """The stage whose outputs are ``open_``'s partitions (itself when it is a bare identity read)."""
    if open_.bare() and open_.inputs[0].stage is not None and isinstance(open_.inputs[0].route, Identity):
        return open_.inputs[0].stage
    return open_.close()


def _build(node: Node) -> _Open:
    if isinstance(node, FilesSource):
        return _Open((StageInput(Identity(), source=node),), [], node.num_partitions, [node.format.kind])
    if isinstance(node, MemorySource):
        stage = Stage("memory", (), (), None, node.num_partitions, memory=node.parts)
        return _Open((StageInput(Identity(), stage=stage),), [], node.num_partitions, [])
    if isinstance(node, Apply):
        if len(node.inputs) > 1:
            stages = [_stage_of(_build(child)) for child in node.inputs]
            return _Open(tuple(StageInput(Identity(), stage=s) for s in stages), [node.op],
                         node.num_partitions, ["sql"])
        open_ = _build(node.inputs[0])
        open_.ops.append(node.op)
        open_.names.append(_op_name(node.op))
        return open_
    return _build_repartition(node)


def _build_repartition(node: Repartition) -> _Open:
    open_, n = _build(node.input), node.n
    if node.method == "evenly":
        if open_.bare() and open_.inputs[0].source is not None:
            source = open_.inputs[0].source
            groups = tuple(tuple(s for g in source.groups[a:b] for s in g) or _empty_group(source)
                           for a, b in group_bounds(len(source.groups), n))
            return _build(FilesSource(groups, source.format, source.schema))
        return _Open((StageInput(Groups(n), stage=_stage_of(open_)),), [], n, ["groups"])
    if node.method == "rows":
        return _Open((StageInput(Rows(n), stage=_stage_of(open_)),), [], n, ["rows"])
    if node.method == "range" and node.boundaries is None:
        if open_.ops:
            stage = open_.close()
            open_ = _Open((StageInput(Identity(), stage=stage),), [], open_.num_partitions, [])
        producer = open_.close(SampledRange(node.keys[0], n))
        return _Open((StageInput(Exchange(n), stage=producer),), [], n, ["exchange"])
    splitter = {"hash": lambda: HashSplit(node.keys, n), "range": lambda: RangeSplit(node.keys[0], node.boundaries, n),
                "random": lambda: RandomSplit(node.seed, n)}[node.method]()
    consumer = _Open((StageInput(Exchange(n), stage=open_.close(splitter)),), [], n, ["exchange"])
    if node.method == "random":
        consumer.ops.append(Shuffle(node.seed))
    return consumer


def _empty_group(source: FilesSource) -> tuple[InputSlice, ...]:
    """An empty partition of a source still reads zero rows of a file, for the schema."""
    first = next((g[0] for g in source.groups if g), None)
    return (InputSlice(first.url, 0, 0),) if first is not None else ()


def plan_stages(node: Node, output_dir: str | None = None) -> Stage:
    """The final stage computing ``node`` (its upstream stages hang off it). ``output_dir``: the final
    stage writes there (``write_parquet``'s staging directory) instead of under the job."""
    open_ = _build(node)
    if output_dir is None:
        return _stage_of(open_)
    open_.names.append("write")
    return open_.close(output_dir=output_dir)


def stages_in_order(final: Stage) -> list[Stage]:
    """Every stage the final one needs, upstream first, each once."""
    ordered, seen = [], set()

    def visit(stage: Stage) -> None:
        if stage.id in seen:
            return
        for upstream in stage.upstream():
            visit(upstream)
        seen.add(stage.id)
        ordered.append(stage)

    visit(final)
    return ordered


def explain(final: Stage) -> str:
    """The plan, stage by stage."""
    lines = []
    for number, stage in enumerate(stages_in_order(final), 1):
        lines.append(f"stage {number}: {stage.id} ({stage.num_partitions} partitions)")
        if stage.memory is not None:
            lines.append(f"  input: {sum(p.height for p in stage.memory)} rows from the driver's memory")
        for stage_input in stage.inputs:
            lines.append(f"  input: {stage_input.describe()}")
        for op in stage.ops:
            lines.append(f"  op: {op.describe()}")
        if stage.exit is not None:
            lines.append(f"  output: split {stage.exit.describe()} (one file per target partition)")
        else:
            lines.append("  output: one parquet file per partition" +
                         (f" in {stage.output_dir}" if stage.output_dir else ""))
    return "\n".join(lines)


def stage_dir(job_url: str, stage: Stage) -> str:
    return join_url(job_url, stage.id)


def make_tasks(stage: Stage, results: dict[str, list[Manifest]], job_url: str,
               files: StorageFiles) -> list[Task]:
    """The stage's tasks, given the manifests of its finished upstream stages (sampled range boundaries
    are computed here, from the stage's inputs)."""
    per_input = []
    for stage_input in stage.inputs:
        if stage_input.source is not None:
            per_input.append((list(stage_input.source.groups), stage_input.source.format))
        else:
            per_input.append((stage_input.route.inputs(results[stage_input.stage.id]), PARQUET))
    exit = stage.exit
    if isinstance(exit, SampledRange):
        exit = RangeSplit(exit.key, _sample(per_input[0], exit, files), exit.n)
    directory = stage_dir(job_url, stage)
    return [Task(stage.id, i, tuple(groups[i] for groups, _ in per_input), tuple(fmt for _, fmt in per_input),
                 stage.ops, exit, stage.output_dir or directory, join_url(directory, MARKER_DIR))
            for i in range(stage.num_partitions)]


def _sample(groups_and_format: tuple[list[tuple[InputSlice, ...]], FileFormat], exit: SampledRange,
            files: StorageFiles) -> tuple[Any, ...]:
    groups, fmt = groups_and_format
    per_partition = max(64, 16 * exit.n)
    column_format = dataclasses.replace(fmt, columns=(exit.key,))
    samples = []
    for group in groups:
        for piece in group:
            keys = read_slice(files, piece, column_format).get_column(exit.key)
            samples.append(sample_rows(keys, max(1, per_partition // max(1, len(group)))))
    return sample_boundaries(samples, exit.n)

