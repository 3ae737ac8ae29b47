"""Per-partition operators: what one task does to its partition's frame(s), in polars.

Each operator is a frozen dataclass with
  * ``apply(frames, partition) -> pl.DataFrame``: ``frames`` is a list of input frames (one, except for a
    multi-input ``Sql``), ``partition`` the partition index (for seeded randomness);
  * ``output_schema(schemas) -> pl.Schema | None``: the result's schema when it can be known from the
    inputs' schemas without data (polars expressions, SQL, sorts), None for Python functions. Computing it
    validates the operator at plan time: a missing column is a ``ValueError`` naming the column, a
    filter that is not boolean a ``TypeError``;
  * ``describe()``: one line for ``explain()``; ``fingerprint()``: a stable text identifying the
    computation (part of the stage id, so a rerun of the same job finds the same stage directories).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

PLACEHOLDER = re.compile(r"\{(\d+)\}")


def function_fingerprint(fn: Callable) -> str:
    """A stable identity for a Python function: its qualified name and a hash of its code and constants
    (closures and globals are not included: change the function's name or body to change the stage)."""
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    if code is None:
        return name
    digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode() + repr(code.co_names).encode())
    return f"{name}#{digest.hexdigest()[:12]}"


def describe_callable(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _expr_text(expr: pl.Expr) -> str:
    return str(expr)


def schema_error(operator: str, error: Exception, schema: pl.Schema) -> Exception:
    """A plan-time polars error as ValueError (missing column) or TypeError (wrong type), naming the
    operator and the columns it had."""
    text = str(error).strip().splitlines()[0]
    if isinstance(error, pl.exceptions.ColumnNotFoundError):
        return ValueError(f"{operator}: column not found: {text}; the frame's columns are {list(schema.names())}")
    if isinstance(error, (pl.exceptions.SchemaError, pl.exceptions.InvalidOperationError)):
        return TypeError(f"{operator}: {text} (schema {dict(schema)})")
    return ValueError(f"{operator}: {type(error).__name__}: {text}")


def check_columns(operator: str, argument: str, columns: Sequence[str], schema: pl.Schema | None) -> None:
    """ValueError naming ``argument`` and the missing columns when ``schema`` is known and lacks them."""
    if schema is None:
        return
    missing = [c for c in columns if c not in schema]
    if missing:
        raise ValueError(f"{operator}: {argument}={missing if len(missing) > 1 else missing[0]!r} not among the "
                         f"frame's columns {list(schema.names())}")


def as_exprs(operator: str, value: Any) -> tuple[pl.Expr, ...] | None:
    """``value`` as a tuple of expressions (strings are column names), or None when it is a function."""
    if isinstance(value, (pl.Expr, str)):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (pl.Expr, str)) for v in value):
        return tuple(pl.col(v) if isinstance(v, str) else v for v in value)
    if callable(value) and not isinstance(value, (list, tuple)):
        return None
    raise TypeError(f"{operator}: expected a polars expression, a list of expressions or a function "
                    f"pl.DataFrame -> pl.DataFrame, got {type(value).__name__}")


def _function_result(operator: str, fn: Callable, result: Any) -> pl.DataFrame:
    if not isinstance(result, pl.DataFrame):
        raise TypeError(f"{operator}: the function {describe_callable(fn)} returned {type(result).__name__}, "
                        f"expected a polars DataFrame")
    return result


@dataclasses.dataclass(frozen=True)
class Map:
    """``select(exprs)`` with polars expressions, or ``fn(frame) -> frame``."""

    exprs: tuple[pl.Expr, ...] | None
    fn: Callable[[pl.DataFrame], pl.DataFrame] | None = None

    def apply(self, frames: list[pl.DataFrame], partition: int) -> pl.DataFrame:
        if self.exprs is not None:
            return frames[0].select(self.exprs)
        return _function_result("map", self.fn, self.fn(frames[0]))

    def output_schema(self, schemas: list[pl.Schema | None]) -> pl.Schema | None:
        if self.exprs is None or schemas[0] is None:
            return None
        try:
            return pl.LazyFrame(schema=schemas[0]).select(self.exprs).collect_schema()
        except pl.exceptions.PolarsError as error:
            raise schema_error("map", error, schemas[0]) from None

    def describe(self) -> str:
        return f"map({', '.join(map(_expr_text, self.exprs))})" if self.exprs is not None else \
            f"map({describe_callable(self.fn)})"

    def fingerprint(self) -> str:
        return f"map:{[_expr_text(e) for e in self.exprs]}" if self.exprs is not None else \
            f"map:{function_fingerprint(self.fn)}"


@dataclasses.dataclass(frozen=True)
class Filter:
    """Keeps the rows where a boolean expression holds, or ``fn(frame) -> frame`` (the kept rows)."""

    expr: pl.Expr | None
    fn: Callable[[pl.DataFrame], Any] | None = None

    def apply(self, frames: list[pl.DataFrame], partition: int) -> pl.DataFrame:
        if self.expr is not None:
            return frames[0].filter(self.expr)
        result = self.fn(frames[0])
        if isinstance(result, pl.Series):  # a boolean mask
            return frames[0].filter(result)
        return _function_result("filter", self.fn, result)

    def output_schema(self, schemas: list[pl.Schema | None]) -> pl.Schema | None:
        if self.expr is None or schemas[0] is None:
            return None if self.expr is None else schemas[0]
        try:
            dtype = pl.LazyFrame(schema=schemas[0]).select(self.expr).collect_schema().dtypes()[0]
        except pl.exceptions.PolarsError as error:
            raise schema_error("filter", error, schemas[0]) from None
        if dtype != pl.Boolean:
            raise TypeError(f"filter: the predicate {_expr_text(self.expr)} is {dtype}, expected Boolean")
        return schemas[0]

    def describe(self) -> str:
        return f"filter({_expr_text(self.expr) if self.expr is not None else describe_callable(self.fn)})"

    def fingerprint(self) -> str:
        return f"filter:{_expr_text(self.expr) if self.expr is not None else function_fingerprint(self.fn)}"


@dataclasses.dataclass(frozen=True)
class FlatMap:
    """``fn(row: dict) -> list[dict]`` for every row; the rows it returns form the output (``schema``
    gives the output's columns when known, so an empty partition keeps them)."""

    fn: Callable[[dict], Sequence[dict]]
    schema: pl.Schema | None = None

    def apply(self, frames: list[pl.DataFrame], partition: int) -> pl.DataFrame:
        rows = []
        for row in frames[0].iter_rows(named=True):
            produced = self.fn(row)
            if not isinstance(produced, (list, tuple)):
                raise TypeError(f"flat_map: the function {describe_callable(self.fn)} returned "
                                f"{type(produced).__name__}, expected a list of row dicts")
            rows.extend(produced)
        if self.schema is not None:
            return pl.DataFrame(rows, schema=self.schema, orient="row" if rows and not isinstance(rows[0], dict)
                                else None)
        return pl.DataFrame(rows)

    def output_schema(self, schemas: list[pl.Schema | None]) -> pl.Schema | None:
        return self.schema

    def describe(self) -> str:
        return f"flat_map({describe_callable(self.fn)})"

    def fingerprint(self) -> str:
        return f"flat_map:{function_fingerprint(self.fn)}:{self.schema}"


@dataclasses.dataclass(frozen=True)
class MapBatches:
    """``fn(batch) -> frame`` on slices of ``batch_size`` rows; the results are concatenated."""

    fn: Callable[[pl.DataFrame], pl.DataFrame]
    batch_size: int

    def apply(self, frames: list[pl.DataFrame], partition: int) -> pl.DataFrame:
        frame = frames[0]
        if frame.height == 0:
            return _function_result("map_batches", self.fn, self.fn(frame))
        results = [_function_result("map_batches", self.fn, self.fn(frame.slice(start, self.batch_size)))
                   for start in range(0, frame.height, self.batch_size)]
        return pl.concat(results, how="vertical_relaxed")

    def output_schema(self, schemas: list[pl.Schema | None]) -> pl.Schema | None:
        return None

    def describe(self) -> str:
        return f"map_batches({describe_callable(self.fn)}, batch_size={self.batch_size})"

    def fingerprint(self) -> str:
        return f"map_batches:{function_fingerprint(self.fn)}:{self.batch_size}"


@dataclasses.dataclass(frozen=True)
class Sort:
    """Sorts the partition by ``by`` (``descending`` per column or for all)."""

    by: tuple[str, ...]
    descending: bool | tuple[bool, ...] = False

    def apply(self, frames: list[pl.DataFrame], partition: int) -> pl.DataFrame:
        return frames[0].sort(list(self.by), descending=self.descending)

    def output_schema(self, schemas: list[pl.Schema | None]) -> pl.Schema | None:
        check_columns("partial_sort", "by", self.by, schemas[0])
        return schemas[0]

    def describe(self) -> str:
        return f"partial_sort(by={list(self.by)}{', descending' if self.descending else ''})"

    def fingerprint(self) -> str:
        return f"sort:{self.by}:{self.descending}"


@dataclasses.dataclass(frozen=True)
class Shuffle:
    """Random row order inside the partition (seeded by ``seed`` and the partition index)."""

    seed: int

    def apply(self, frames: list[pl.DataFrame], partition: int) -> pl.DataFrame:
        return frames[0].sample(fraction=1.0, shuffle=True, seed=self.seed * 1_000_003 + partition)

    def output_schema(self, schemas: list[pl.Schema | None]) -> pl.Schema | None:
        return schemas[0]

    def describe(self) -> str:
        return f"shuffle_rows(seed={self.seed})"

    def fingerprint(self) -> str:
        return f"shuffle:{self.seed}"


def sql_names(count: int) -> list[str]:
    return [f"__input{i}" for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Sql:
    """A polars SQL query over the partition's frames; ``{0}``, ``{1}``... name the inputs."""

    query: str
    num_inputs: int

    def bound_query(self) -> str:
        names = sql_names(self.num_inputs)
        return PLACEHOLDER.sub(lambda m: names[int(m.group(1))], self.query)

    def apply(self, frames: list[pl.DataFrame], partition: int) -> pl.DataFrame:
        context = pl.SQLContext(dict(zip(sql_names(len(frames)), frames)), eager=False)
        return context.execute(self.bound_query()).collect()

    def output_schema(self, schemas: list[pl.Schema | None]) -> pl.Schema | None:
        if any(s is None for s in schemas):
            return None
        context = pl.SQLContext({name: pl.LazyFrame(schema=s) for name, s in zip(sql_names(len(schemas)), schemas)})
        try:
            return context.execute(self.bound_query()).collect_schema()
        except pl.exceptions.PolarsError as error:
            raise schema_error(f"partial_sql({self.query!r})", error, schemas[0]) from None

    def describe(self) -> str:
        return f"partial_sql({self.query!r})"

    def fingerprint(self) -> str:
        return f"sql:{self.query}:{self.num_inputs}"


def check_sql_placeholders(query: str, num_inputs: int) -> None:
    """ValueError unless ``query`` uses exactly the placeholders ``{0}``..``{num_inputs-1}``."""
    if not isinstance(query, str):
        raise TypeError(f"partial_sql: query must be a str, got {type(query).__name__}")
    used = {int(m) for m in PLACEHOLDER.findall(query)}
    expected = set(range(num_inputs))
    if used != expected:
        raise ValueError(f"partial_sql: the query uses placeholders {sorted(used)} but {num_inputs} "
                         f"DataFrame(s) were given (expected {{0}}..{{{num_inputs - 1}}})")


Operator = Map | Filter | FlatMap | MapBatches | Sort | Shuffle | Sql
