"""gensort-compatible GraySort input: 100-byte binary records, bit for bit what ``gensort`` 1.5 writes.

The sortbenchmark.org generator (Chris Nyberg's ``gensort``, version 1.5) draws one 128-bit number per
record from a linear congruential generator,

    X[0] = 0,   X[i + 1] = (a * X[i] + c) mod 2**128,
    a = 0x2360ed051fc65da44385df649fccf645,   c = 0x4a696d47726179524950202020202001,

and builds binary record ``n`` from the ten numbers ``X[n + 1] .. X[n + 10]``: bytes ``10j .. 10j + 9``
are the high 80 bits (big-endian) of ``X[n + 1 + j] XOR XOR_MASKS[j]`` (mask 0 is zero, so the 10-byte
key is the high 80 bits of ``X[n + 1]``). Any record is reachable without the ones before it (gensort's
``skip_ahead_rand``), so partitions are generated independently: ``generate_records(start, count)`` is
gensort's ``-b<start> <count>`` output. Not covered: the ASCII (``-a``) and skewed (``-s``) variants.

Here the generator runs vectorized: a block of up to ``BLOCK`` numbers is ``X[t + k] = A_k * X[t] + C_k``
with the k-step maps (A_k, C_k) precomputed, in 32-bit limbs held in uint64 arrays.
tests/test_graysort.py checks the bytes against records written by the C gensort.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import pyarrow as pa

MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
INCREMENT = 0x4A696D47726179524950202020202001
MODULUS_BITS = 128
RECORD_BYTES = 100
KEY_BYTES = 10
# The 80 high bits XORed into each 10-byte part of a record (gensort 1.5's gen_rec); part 0 is the key.
XOR_MASKS = (0, 0xF0E8E4E2E1D8D4D2D1CC, 0xCAC9C6C5C3B8B4B2B1AC, 0xAAA9A6A5A39C9A999695, 0x938E8D8B87787472716C,
             0x6A696665635C5A595655, 0x534E4D4B473C3A393635, 0x332E2D2B271E1D1B170F, 0xC8C4C2C1989492918CE0,
             0x170F332E2D2B271E1D1B)
BLOCK = 1 << 15
_MASK128 = (1 << MODULUS_BITS) - 1
_LIMB = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


class AffineStep(NamedTuple):
    """x -> (a * x + c) mod 2**128: ``steps`` iterations of the generator."""

    a: int
    c: int

    def then(self, other: "AffineStep") -> "AffineStep":
        """This map followed by ``other``."""
        return AffineStep(other.a * self.a & _MASK128, (other.a * self.c + other.c) & _MASK128)

    def __call__(self, x: int) -> int:
        return (self.a * x + self.c) & _MASK128


def skip_ahead(steps: int) -> AffineStep:
    """The map that advances the generator ``steps`` times (square-and-multiply over ``steps``' bits)."""
    if steps < 0:
        raise ValueError(f"steps={steps}: expected a count >= 0")
    result, power = AffineStep(1, 0), AffineStep(MULTIPLIER, INCREMENT)
    while steps:
        if steps & 1:
            result = result.then(power)
        power = power.then(power)
        steps >>= 1
    return result


def random_number(index: int) -> int:
    """X[index]: the generator's ``index``-th number (X[0] = 0)."""
    return skip_ahead(index)(0)


def _limbs(values) -> np.ndarray:
    """[4, n] uint64: 128-bit integers as 32-bit limbs, least significant first."""
    values = list(values)
    return np.array([[(v >> (32 * i)) & 0xFFFFFFFF for v in values] for i in range(4)], dtype=np.uint64)


@functools.lru_cache(maxsize=1)
def _block_maps() -> tuple[np.ndarray, np.ndarray]:
    """([4, BLOCK], [4, BLOCK]) limbs of (A_k, C_k), the k-step maps for k = 0 .. BLOCK - 1."""
    maps, step, current = [], AffineStep(MULTIPLIER, INCREMENT), AffineStep(1, 0)
    for _ in range(BLOCK):
        maps.append(current)
        current = current.then(step)
    return _limbs(m.a for m in maps), _limbs(m.c for m in maps)


def _affine_block(a: np.ndarray, c: np.ndarray, x: int) -> np.ndarray:
    """[4, k] limbs of (a * x + c) mod 2**128 for [4, k] limbs a, c and one integer x."""
    xs = [np.uint64((x >> (32 * i)) & 0xFFFFFFFF) for i in range(4)]
    columns = [c[i].copy() for i in range(4)]  # each sum stays below 2**35: no uint64 overflow
    for i in range(4):
        for j in range(4 - i):
            product = a[i] * xs[j]  # < 2**64
            columns[i + j] += product & _LIMB
            if i + j + 1 < 4:
                columns[i + j + 1] += product >> _SHIFT
    for i in range(3):
        columns[i + 1] += columns[i] >> _SHIFT
        columns[i] &= _LIMB
    columns[3] &= _LIMB
    return np.stack(columns)


def random_numbers(first: int, count: int) -> np.ndarray:
    """[4, count] uint64 limbs of X[first] .. X[first + count - 1]."""
    a, c = _block_maps()
    out = np.empty((4, count), np.uint64)
    x = random_number(first)
    jump = skip_ahead(BLOCK)
    for start in range(0, count, BLOCK):
        size = min(BLOCK, count - start)
        out[:, start:start + size] = _affine_block(a[:, :size], c[:, :size], x)
        x = jump(x)
    return out


def _high_80_bits(limbs: np.ndarray) -> np.ndarray:
    """[n, 10] uint8: the high 80 bits of [4, n] limbs, big-endian."""
    out = np.empty((limbs.shape[1], 10), np.uint8)
    out[:, 0:4] = limbs[3].astype(">u4").view(np.uint8).reshape(-1, 4)
    out[:, 4:8] = limbs[2].astype(">u4").view(np.uint8).reshape(-1, 4)
    out[:, 8:10] = (limbs[1] >> np.uint64(16)).astype(">u2").view(np.uint8).reshape(-1, 2)
    return out


def generate_records(start: int, count: int) -> np.ndarray:
    """[count, 100] uint8: gensort's binary records ``start .. start + count - 1`` (``gensort -b<start> <count>``)."""
    if start < 0 or count < 0:
        raise ValueError(f"start={start}, count={count}: expected counts >= 0")
    tops = _high_80_bits(random_numbers(start + 1, count + 9))  # [count + 9, 10]
    records = np.empty((count, RECORD_BYTES), np.uint8)
    for part, mask in enumerate(XOR_MASKS):
        mask_bytes = np.frombuffer(mask.to_bytes(10, "big"), np.uint8)
        np.bitwise_xor(tops[part:part + count], mask_bytes, out=records[:, 10 * part:10 * part + 10])
    return records


def fixed_binary(rows: np.ndarray) -> pa.FixedSizeBinaryArray:
    """A pyarrow fixed_size_binary(width) array over the rows of a [n, width] uint8 array."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(rows.shape[1]), len(rows), [None, pa.py_buffer(rows)])


def records_table(records: np.ndarray) -> pa.Table:
    """The GraySort table of [n, 100] records: ``key`` fixed_size_binary(10) (the first 10 bytes) and
    ``record`` fixed_size_binary(100) (the whole record, key included)."""
    records = np.asarray(records)
    if records.ndim != 2 or records.shape[1] != RECORD_BYTES or records.dtype != np.uint8:
        raise ValueError(f"records: expected [n, {RECORD_BYTES}] uint8, got {records.dtype}{list(records.shape)}")
    return pa.table({"key": fixed_binary(records[:, :KEY_BYTES]), "record": fixed_binary(records)})


def generate_table(start: int, count: int) -> pa.Table:
    """``records_table(generate_records(start, count))``: one GraySort input partition."""
    return records_table(generate_records(start, count))
