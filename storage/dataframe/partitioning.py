"""How rows move between partitions: producer-side splitters and consumer-side routes.

A repartition is a two-phase exchange through storage. Each *producer* task splits its frame with a
splitter into ``n`` parts and writes one file per target partition; each *consumer* task then reads, by
its route, the files meant for it.

Splitters (``split(frame, producer) -> list of n frames``):
  * ``HashSplit(keys, n)``: row -> ``hash_rows(keys) % n`` (polars' row hash with seed 0, the same in
    every process), so equal keys land in the same partition;
  * ``RangeSplit(key, boundaries, n)``: partition i holds ``boundaries[i-1] <= key < boundaries[i]``
    (nulls in partition 0); ``sample_boundaries`` picks them as quantiles of a sample;
  * ``RandomSplit(seed, n)``: each row to a uniformly random partition, seeded by (seed, producer).

Routes (which upstream outputs consumer partition j reads; ``manifests[p]`` lists producer p's files
with their row counts):
  * ``Identity``: partition j reads upstream partition j's file;
  * ``Exchange``: partition j reads file j of every producer;
  * ``Groups(n)``: partition j reads upstream partitions [j*m//n, (j+1)*m//n) (evenly by partitions);
  * ``Rows(n)``: partition j reads global rows [j*N//n, (j+1)*N//n) as slices of the upstream files
    (evenly by rows: sizes differ by at most one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import polars as pl

PARTITION_COLUMN = "__partition"


class InputSlice(NamedTuple):
    """Rows [offset, offset + length) of one file (length None: to the end)."""

    url: str
    offset: int = 0
    length: int | None = None

    def describe(self) -> str:
        return self.url if self.offset == 0 and self.length is None else \
            f"{self.url}[{self.offset}:{self.offset + (self.length or 0)}]"


class Manifest(NamedTuple):
    """What a finished task wrote: one (url, rows) per file, in target order for a producer."""

    files: tuple[tuple[str, int], ...]

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.files)


def _split_by_index(frame: pl.DataFrame, index: pl.Series, n: int) -> list[pl.DataFrame]:
    if n == 1:
        return [frame]
    parts = frame.with_columns(index.alias(PARTITION_COLUMN)).partition_by(
        PARTITION_COLUMN, as_dict=True, include_key=False, maintain_order=True)
    empty = frame.clear()
    return [parts.get((i,), empty) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class HashSplit:
    keys: tuple[str, ...]
    n: int

    def split(self, frame: pl.DataFrame, producer: int) -> list[pl.DataFrame]:
        index = (frame.select(self.keys).hash_rows(seed=0) % self.n).cast(pl.UInt32)
        return _split_by_index(frame, index, self.n)

    def describe(self) -> str:
        return f"hash_by={list(self.keys)} -> {self.n} partitions"


def range_index(keys: pl.Series, boundaries: pl.Series) -> pl.Series:
    """For each key, the number of boundaries <= key (its partition); nulls -> 0."""
    index = boundaries.search_sorted(keys, side="right").cast(pl.UInt32)
    if keys.null_count():
        index = pl.select(pl.when(keys.is_null()).then(0).otherwise(index)).to_series().cast(pl.UInt32)
    return index


@dataclasses.dataclass(frozen=True)
class RangeSplit:
    key: str
    boundaries: tuple[Any, ...]
    n: int

    def split(self, frame: pl.DataFrame, producer: int) -> list[pl.DataFrame]:
        keys = frame.get_column(self.key)
        boundaries = pl.Series(self.key, list(self.boundaries)).cast(keys.dtype, strict=False)
        return _split_by_index(frame, range_index(keys, boundaries), self.n)

    def describe(self) -> str:
        shown = list(self.boundaries) if len(self.boundaries) <= 6 else \
            [*self.boundaries[:3], "...", *self.boundaries[-2:]]
        return f"range by={self.key!r} boundaries={shown} -> {self.n} partitions"


@dataclasses.dataclass(frozen=True)
class RandomSplit:
    seed: int
    n: int

    def split(self, frame: pl.DataFrame, producer: int) -> list[pl.DataFrame]:
        rng = np.random.default_rng([self.seed, producer])
        return _split_by_index(frame, pl.Series(rng.integers(0, self.n, frame.height, dtype=np.uint32)), self.n)

    def describe(self) -> str:
        return f"random(seed={self.seed}) -> {self.n} partitions"


Splitter = HashSplit | RangeSplit | RandomSplit


def check_boundaries(boundaries: Sequence[Any], n: int) -> tuple[Any, ...]:
    """``boundaries`` as a tuple after checking there are n-1 of them, non-null and non-decreasing."""
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence | np.ndarray | pl.Series):
        raise TypeError(f"repartition: boundaries must be a sequence of {n - 1} keys, got {type(boundaries).__name__}")
    values = tuple(boundaries.to_list() if isinstance(boundaries, pl.Series) else list(boundaries))
    if len(values) != n - 1:
        raise ValueError(f"repartition: boundaries has {len(values)} keys; {n} partitions need {n - 1}")
    if any(v is None for v in values):
        raise ValueError("repartition: boundaries must not contain None")
    try:
        ordered = all(a <= b for a, b in zip(values, values[1:]))
    except TypeError as error:
        raise TypeError(f"repartition: boundaries are not comparable: {error}") from None
    if not ordered:
        raise ValueError(f"repartition: boundaries must be non-decreasing, got {list(values)}")
    return values


def sample_boundaries(samples: list[pl.Series], n: int) -> tuple[Any, ...]:
    """n-1 boundaries at the quantiles i/n (i = 1..n-1) of the concatenated samples (nulls dropped)."""
    present = [s for s in samples if len(s)]
    keys = pl.concat([s.cast(present[0].dtype) for s in present]).drop_nulls().sort() if present else pl.Series([])
    if len(keys) == 0:
        return tuple([0] * (n - 1)) if n > 1 else ()
    return tuple(keys[min(len(keys) - 1, (i * len(keys)) // n)] for i in range(1, n))


def sample_rows(series: pl.Series, count: int) -> pl.Series:
    """At most ``count`` evenly spaced values of ``series`` (deterministic, so a rerun samples the same)."""
    if len(series) <= count:
        return series
    return series.gather(np.linspace(0, len(series) - 1, count).astype(np.int64))


# -- routes --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Identity:
    def inputs(self, manifests: list[Manifest]) -> list[tuple[InputSlice, ...]]:
        return [tuple(InputSlice(url) for url, _ in m.files) for m in manifests]

    def describe(self) -> str:
        return "each partition"


@dataclasses.dataclass(frozen=True)
class Exchange:
    n: int

    def inputs(self, manifests: list[Manifest]) -> list[tuple[InputSlice, ...]]:
        return [tuple(InputSlice(m.files[j][0]) for m in manifests) for j in range(self.n)]

    def describe(self) -> str:
        return f"exchange: file j of every producer -> {self.n} partitions"


def group_bounds(m: int, n: int) -> list[tuple[int, int]]:
    return [(j * m // n, (j + 1) * m // n) for j in range(n)]


@dataclasses.dataclass(frozen=True)
class Groups:
    n: int

    def inputs(self, manifests: list[Manifest]) -> list[tuple[InputSlice, ...]]:
        return [tuple(InputSlice(url) for m in manifests[a:b] for url, _ in m.files)
                for a, b in group_bounds(len(manifests), self.n)]

    def describe(self) -> str:
        return f"evenly by partitions -> {self.n} partitions"


@dataclasses.dataclass(frozen=True)
class Rows:
    n: int

    def inputs(self, manifests: list[Manifest]) -> list[tuple[InputSlice, ...]]:
        files = [(url, rows) for m in manifests for url, rows in m.files]
        total = sum(rows for _, rows in files)
        result = []
        for j in range(self.n):
            begin, end = j * total // self.n, (j + 1) * total // self.n
            slices, start = [], 0
            for url, rows in files:
                low, high = max(begin, start), min(end, start + rows)
                if high > low:
                    slices.append(InputSlice(url, low - start, high - low))
                start += rows
            if not slices and files:  # an empty partition still reads a file for the schema
                slices.append(InputSlice(files[0][0], 0, 0))
            result.append(tuple(slices))
        return result

    def describe(self) -> str:
        return f"evenly by rows -> {self.n} partitions"


Route = Identity | Exchange | Groups | Rows
