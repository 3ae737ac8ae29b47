"""The logical plan: immutable nodes that a DataFrame wraps; nothing here reads data.

  * ``FilesSource``: files on storage, one group of files (slices) per partition, in one ``FileFormat``;
  * ``MemorySource``: frames held by the driver (``from_polars``, ``from_arrow``, ``from_items``);
  * ``Apply``: a per-partition operator (``operators.py``) over one input, or ``Sql`` over several inputs
    with equal partition counts (partition i of each);
  * ``Repartition``: rows redistributed into ``n`` partitions by a ``method``: ``evenly`` (by files /
    partitions, no data rewritten), ``rows``, ``hash``, ``range`` (given or sampled boundaries), ``random``.

Each node knows its partition count and, where polars can tell without data, its schema (None when a
Python function produced it): DataFrame methods validate columns against it at plan time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import polars as pl

from storage.dataframe.operators import Operator
from storage.dataframe.partitioning import InputSlice


@dataclasses.dataclass(frozen=True)
class FileFormat:
    """How a source file is read: ``parquet`` (``columns``) or ``csv`` (``schema``, ``separator``)."""

    kind: str
    columns: tuple[str, ...] | None = None
    schema: Any = None
    separator: str = ","

    def describe(self) -> str:
        if self.kind == "parquet":
            return "parquet" + (f" columns={list(self.columns)}" if self.columns is not None else "")
        return f"csv separator={self.separator!r}" + (" with schema" if self.schema is not None else "")


PARQUET = FileFormat("parquet")


@dataclasses.dataclass(frozen=True, eq=False)
class FilesSource:
    groups: tuple[tuple[InputSlice, ...], ...]
    format: FileFormat
    schema: pl.Schema | None

    @property
    def num_partitions(self) -> int:
        return len(self.groups)

    def describe(self) -> str:
        files = [s.url for group in self.groups for s in group]
        shown = ", ".join(files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
        return f"read {self.format.describe()}: {shown}"


@dataclasses.dataclass(frozen=True, eq=False)
class MemorySource:
    parts: tuple[pl.DataFrame, ...]
    schema: pl.Schema | None

    @property
    def num_partitions(self) -> int:
        return len(self.parts)

    def describe(self) -> str:
        return f"from memory: {sum(p.height for p in self.parts)} rows"


@dataclasses.dataclass(frozen=True, eq=False)
class Apply:
    inputs: tuple[Node, ...]
    op: Operator
    schema: pl.Schema | None

    @property
    def num_partitions(self) -> int:
        return self.inputs[0].num_partitions


@dataclasses.dataclass(frozen=True, eq=False)
class Repartition:
    input: Node
    n: int
    method: str  # evenly | rows | hash | range | random
    keys: tuple[str, ...] = ()
    boundaries: tuple[Any, ...] | None = None  # range: given boundaries, None = sampled
    seed: int = 0

    @property
    def num_partitions(self) -> int:
        return self.n

    @property
    def schema(self) -> pl.Schema | None:
        return self.input.schema


Node = FilesSource | MemorySource | Apply | Repartition
