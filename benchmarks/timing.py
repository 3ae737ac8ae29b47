"""Timing helpers shared by the benchmark scripts: median wall time of a jitted call, and the two
roofline peers every report is measured against in the same run (copy bandwidth, dense matmul rate)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable, *args, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls after ``warmup`` calls (results awaited)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth_gbps(num_bytes: int = 1 << 28) -> float:
    """Achieved device-memory bandwidth of an elementwise copy (read + write), GB/s."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    seconds = median_seconds(jax.jit(lambda v: v + 1.0), x)
    return 2 * num_bytes / seconds / 1e9


def matmul_tflops(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """Achieved rate of one square ``n x n`` matmul in ``dtype``, TFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    seconds = median_seconds(jax.jit(lambda x, y: x @ y), a, b)
    return 2 * n**3 / seconds / 1e12
