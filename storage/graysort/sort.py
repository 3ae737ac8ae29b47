"""The GraySort sort: range partitioning by key prefix, then a sort inside each partition.

Keys are uniformly random, so ``n`` ranges of equal width over the keys' leading bytes hold about equal
shares: ``prefix_boundaries(n)`` (no sampling pass). Partition i of the output holds the keys in
``[boundaries[i - 1], boundaries[i])`` sorted, so the partitions in order are the whole sorted output.

Two shapes of the same pipeline on a ``storage.dataframe`` session (``sort_pipeline``):

* ``key_mode="binary"``: range-repartition on the 10-byte ``key`` column itself, ``partial_sort("key")``.
* ``key_mode="integer"``: the key as two integer columns first (``key_hi``: bytes 0-7 as a big-endian
  uint64, ``key_lo``: bytes 8-9 as uint16, whose order is the bytes' order), repartition on ``key_hi``
  and sort on both; polars sorts fixed-width integers several times faster than binaries. The
  helper columns are dropped before writing.

The per-partition steps are plain polars functions (``with_key_parts``, ``sort_partition``,
``range_split``), tested against polars' own binary sort and comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import polars as pl

from storage.graysort.gensort import KEY_BYTES

KEY_HI, KEY_LO = "key_hi", "key_lo"
KeyMode = Literal["binary", "integer"]


def prefix_boundaries(partitions: int) -> list[bytes]:
    """``partitions - 1`` 10-byte keys cutting the key space into equal ranges by its first 8 bytes:
    boundary i is ``floor(i * 2**64 / partitions)`` big-endian, then two zero bytes."""
    if partitions <= 0:
        raise ValueError(f"partitions={partitions}: expected a positive count")
    return [((i << 64) // partitions).to_bytes(8, "big") + bytes(KEY_BYTES - 8) for i in range(1, partitions)]


def integer_boundaries(boundaries: Sequence[bytes]) -> list[int]:
    """The ``key_hi`` values of 10-byte boundaries whose last two bytes are zero (as ``prefix_boundaries``
    makes): then ``key >= b`` exactly when ``key_hi >= int(b[:8])``."""
    for b in boundaries:
        if len(b) != KEY_BYTES or b[8:] != b"\0\0":
            raise ValueError(f"boundaries: {b!r} is not a 10-byte key ending in two zero bytes")
    return [int.from_bytes(b[:8], "big") for b in boundaries]


def key_part_exprs(column: str = "key") -> list[pl.Expr]:
    """polars expressions for ``key_hi`` (UInt64) and ``key_lo`` (UInt16) of a 10-byte binary column."""
    key = pl.col(column)
    return [key.bin.slice(0, 8).bin.reinterpret(dtype=pl.UInt64, endianness="big").alias(KEY_HI),
            key.bin.slice(8, 2).bin.reinterpret(dtype=pl.UInt16, endianness="big").alias(KEY_LO)]


def with_key_parts(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with ``key_hi`` and ``key_lo`` added (see the module docstring)."""
    if "key" not in frame.columns:
        raise ValueError(f"frame: no 'key' column (columns: {frame.columns})")
    if frame.schema["key"] != pl.Binary:
        raise TypeError(f"frame: column 'key' is {frame.schema['key']}, expected Binary")
    return frame.with_columns(key_part_exprs())


def without_key_parts(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop([KEY_HI, KEY_LO], strict=False)


def sort_partition(frame: pl.DataFrame) -> pl.DataFrame:
    """One partition sorted by ``key`` (byte order), through the integer key parts; the columns of
    ``frame`` kept as they are."""
    return without_key_parts(with_key_parts(frame).sort([KEY_HI, KEY_LO]))


def range_split(frame: pl.DataFrame, boundaries: Sequence[bytes]) -> list[pl.DataFrame]:
    """``frame``'s rows by range: piece i holds ``boundaries[i - 1] <= key < boundaries[i]`` (the first
    and last pieces are open-ended), in their original order."""
    edges = [None, *boundaries, None]
    pieces = []
    for low, high in zip(edges[:-1], edges[1:]):
        keep = pl.lit(True)
        if low is not None:
            keep &= pl.col("key") >= pl.lit(low, pl.Binary)
        if high is not None:
            keep &= pl.col("key") < pl.lit(high, pl.Binary)
        pieces.append(frame.filter(keep))
    return pieces


def sort_pipeline(session, input_url, output_url: str, partitions: int, *, key_mode: KeyMode = "integer"):
    """Sorts the GraySort partitions at ``input_url`` (a directory URL, a glob or a list for
    ``session.read_parquet``) into ``partitions`` range partitions at ``output_url`` with a
    ``storage.dataframe`` session; blocks until written. Returns the DataFrame (for ``explain()``)."""
    frame = session.read_parquet(input_url, columns=["key", "record"])
    boundaries = prefix_boundaries(partitions)
    if key_mode == "binary":
        frame = frame.repartition(partitions, by="key", boundaries=boundaries).partial_sort("key")
    elif key_mode == "integer":
        frame = (frame.map([pl.col("key"), pl.col("record"), *key_part_exprs()])
                 .repartition(partitions, by=KEY_HI, boundaries=integer_boundaries(boundaries))
                 .partial_sort([KEY_HI, KEY_LO])
                 .map([pl.col("key"), pl.col("record")]))
    else:
        raise ValueError(f"key_mode={key_mode!r}: expected 'binary' or 'integer'")
    frame.write_parquet(output_url)
    return frame
