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
    """Achieved device-memory bandwidth of an elementwise copy (read + write), GB/s: GPU time by CUPTI on a
    GPU (wall time there adds ~0.1 ms of dispatch to a 0.1 ms copy: the H200 read 1.9 TB/s that way),
    wall time elsewhere."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    milliseconds = gpu_kernel_ms(jax.jit(lambda v: v + 1.0), x)
    return 2 * num_bytes / milliseconds / 1e6


def matmul_tflops(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """Achieved rate of one square ``n x n`` matmul in ``dtype``, TFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    seconds = median_seconds(jax.jit(lambda x, y: x @ y), a, b)
    return 2 * n**3 / seconds / 1e12


def gpu_kernel_ms(fn: Callable, *args, iterations: int = 10, flush_bytes: int = 1 << 28) -> float:
    """Median GPU time (ms) of the kernels ``fn`` launches, by CUPTI, with L2 flushed before each call
    (a ``flush_bytes`` write, as DeepGEMM's benchmarks do). Falls back to wall time off the GPU."""
    try:
        from jax.experimental.mosaic.gpu import profiler
    except ImportError:
        return median_seconds(fn, *args, repeats=iterations) * 1e3
    flush = jax.jit(lambda x: x + 1)
    scratch = jnp.zeros((flush_bytes // 4,), jnp.float32)
    measured = profiler.measure(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iterations):
        scratch = jax.block_until_ready(flush(scratch))
        _, ms = measured(*args)
        if ms is not None:
            times.append(ms)
    return statistics.median(times) if times else float("nan")
