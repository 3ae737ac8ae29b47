"""``DataFrame``: a lazy, partitioned frame; methods add plan nodes, actions run the plan.

Transformations (lazy, each returns a new DataFrame): ``repartition``, ``map``, ``filter``, ``flat_map``,
``map_batches``, ``partial_sort``, ``random_shuffle`` (and ``Session.partial_sql``). Columns are checked
at plan time where the schema is known (``ValueError`` naming the column); a Python function's output
schema is unknown until it runs, so errors after one surface as ``TaskError`` naming the stage,
partition and input files.

Actions (blocking): ``write_parquet``, ``to_polars``, ``to_arrow``, ``count``, ``take``; ``explain()``
shows the stages without running them. Outputs of stages already computed in this session (or, with the
same job id, in an earlier one) are reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from storage.dataframe.operators import Filter, FlatMap, Map, MapBatches, Sort, as_exprs, check_columns
from storage.dataframe.partitioning import check_boundaries
from storage.dataframe.plan import Apply, Node, Repartition

if TYPE_CHECKING:
    from storage.dataframe.session import Session


def check_npartitions(n: Any, operator: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{operator}: npartitions must be a positive int, got {n!r}")
    return n


def _keys(value: Any, argument: str) -> tuple[str, ...]:
    keys = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"repartition: {argument} must be a column name or a non-empty list of names, got {value!r}")
    return keys


class DataFrame:
    """A lazy DataFrame of ``session`` over the plan ``node`` (build it with the session's readers)."""

    def __init__(self, session: "Session", node: Node) -> None:
        self.session, self.node = session, node

    def _then(self, node: Node) -> "DataFrame":
        return DataFrame(self.session, node)

    def _apply(self, op) -> "DataFrame":
        return self._then(Apply((self.node,), op, op.output_schema([self.node.schema])))

    @property
    def num_partitions(self) -> int:
        return self.node.num_partitions

    @property
    def schema(self) -> pl.Schema | None:
        """The columns and types when known without running (None after a Python function)."""
        return self.node.schema

    # -- transformations ---------------------------------------------------------------------------
    def repartition(self, npartitions: int, hash_by: str | Sequence[str] | None = None, by: str | None = None,
                    by_rows: bool = False, boundaries: Sequence[Any] | None = None) -> "DataFrame":
        """Into ``npartitions``: evenly by files/partitions (default), ``by_rows=True`` evenly by rows,
        ``hash_by`` (same key -> same partition), or ``by`` a range key: partition i holds
        ``boundaries[i-1] <= key < boundaries[i]`` (``boundaries=None``: quantiles of a sample)."""
        n = check_npartitions(npartitions, "repartition")
        if sum([hash_by is not None, by is not None, bool(by_rows)]) > 1:
            raise ValueError("repartition: give at most one of hash_by, by and by_rows")
        if boundaries is not None and by is None:
            raise ValueError("repartition: boundaries need by=<range key>")
        if hash_by is not None:
            keys = _keys(hash_by, "hash_by")
            check_columns("repartition", "hash_by", keys, self.schema)
            return self._then(Repartition(self.node, n, "hash", keys))
        if by is not None:
            if not isinstance(by, str):
                raise TypeError(f"repartition: by must be one column name, got {by!r}")
            check_columns("repartition", "by", [by], self.schema)
            given = check_boundaries(boundaries, n) if boundaries is not None else None
            return self._then(Repartition(self.node, n, "range", (by,), given))
        return self._then(Repartition(self.node, n, "rows" if by_rows else "evenly"))

    def random_shuffle(self, seed: int = 0) -> "DataFrame":
        """Rows to random partitions (as many as now), in random order inside each; reproducible by seed."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"random_shuffle: seed must be an int, got {seed!r}")
        return self._then(Repartition(self.node, self.num_partitions, "random", seed=seed))

    def map(self, expr_or_fn: pl.Expr | str | Sequence[pl.Expr | str] | Callable[[pl.DataFrame], pl.DataFrame]
            ) -> "DataFrame":
        """``select(exprs)`` per partition (a polars expression or a list; use ``pl.all()`` to keep the
        other columns), or a function ``pl.DataFrame -> pl.DataFrame``."""
        exprs = as_exprs("map", expr_or_fn)
        return self._apply(Map(exprs, None if exprs is not None else expr_or_fn))

    def filter(self, expr_or_fn: pl.Expr | Callable[[pl.DataFrame], Any]) -> "DataFrame":
        """The rows where a boolean expression holds, or ``fn(frame)`` -> a frame or a boolean Series."""
        if isinstance(expr_or_fn, pl.Expr):
            return self._apply(Filter(expr_or_fn))
        if callable(expr_or_fn):
            return self._apply(Filter(None, expr_or_fn))
        raise TypeError(f"filter: expected a boolean polars expression or a function, got {type(expr_or_fn).__name__}")

    def flat_map(self, fn: Callable[[dict], Sequence[dict]], schema: dict[str, Any] | None = None) -> "DataFrame":
        """``fn(row_dict) -> list of row dicts`` per row. ``schema``: the output columns, when known."""
        if not callable(fn):
            raise TypeError(f"flat_map: expected a function row -> list of rows, got {type(fn).__name__}")
        return self._apply(FlatMap(fn, pl.Schema(schema) if schema is not None else None))

    def map_batches(self, fn: Callable[[pl.DataFrame], pl.DataFrame], batch_size: int = 122_880) -> "DataFrame":
        """``fn(batch) -> frame`` on batches of at most ``batch_size`` rows of each partition."""
        if not callable(fn):
            raise TypeError(f"map_batches: expected a function pl.DataFrame -> pl.DataFrame, got {type(fn).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"map_batches: batch_size must be a positive int, got {batch_size!r}")
        return self._apply(MapBatches(fn, batch_size))

    def partial_sort(self, by: str | Sequence[str], descending: bool = False) -> "DataFrame":
        """Each partition sorted by ``by`` (partitions are not merged)."""
        keys = (by,) if isinstance(by, str) else tuple(by) if isinstance(by, (list, tuple)) else None
        if not keys or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"partial_sort: by must be a column name or a list of names, got {by!r}")
        return self._apply(Sort(keys, descending))

    # -- actions -----------------------------------------------------------------------------------
    def explain(self) -> str:
        """The plan, stage by stage (nothing runs)."""
        return self.session.explain(self.node)

    def write_parquet(self, url: str) -> None:
        """Runs the plan and writes one parquet file per partition (``part-NNNNN.parquet``) into the
        directory ``url`` (any storage URL), published atomically (an existing directory is replaced)."""
        self.session.write(self.node, url)

    def to_polars(self) -> pl.DataFrame:
        """All partitions, concatenated in partition order."""
        return self.session.read_outputs(self.session.compute(self.node))

    def to_arrow(self) -> pa.Table:
        return self.to_polars().to_arrow()

    def count(self) -> int:
        """The number of rows (from the task manifests; no data is read back)."""
        return sum(m.rows for m in self.session.compute(self.node))

    def take(self, n: int) -> pl.DataFrame:
        """The first ``n`` rows in partition order."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"take: n must be an int >= 0, got {n!r}")
        return self.session.read_outputs(self.session.compute(self.node), limit=n)

    def __repr__(self) -> str:
        return f"DataFrame({self.num_partitions} partitions, schema={dict(self.schema) if self.schema else '?'})"
