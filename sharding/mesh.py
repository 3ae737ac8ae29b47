"""Named device meshes: axes ``pp`` (pipeline stages), ``dp`` (data) and ``ep`` (experts).

Tokens are split over ``dp`` and ``ep`` together (DeepSeek's data-parallel attention with
expert-parallel MoE), so ``batch_sharding`` shards the batch over both. On a CPU, set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported to get 8 fake devices
(``tests/conftest.py`` does).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("pp", "dp", "ep")


def fake_cpu_devices_flag(count: int) -> str:
    """The XLA flag that makes the CPU backend expose ``count`` devices (set before importing jax)."""
    return f"--xla_force_host_platform_device_count={count}"


def make_mesh(*, dp: int | None = None, ep: int = 1, pp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(pp, dp, ep)`` mesh over ``devices`` (default: all visible devices).

    ``dp=None`` takes every device the other axes leave. The product of the axes must equal the
    device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("ep", ep), ("pp", pp)):
        if size < 1:
            raise ValueError(f"{name}: must be >= 1, got {size}")
    if dp is None:
        if len(devices) % (ep * pp):
            raise ValueError(f"ep * pp = {ep * pp} must divide the device count {len(devices)}")
        dp = len(devices) // (ep * pp)
    if dp < 1 or pp * dp * ep != len(devices):
        raise ValueError(f"dp: pp * dp * ep = {pp} * {dp} * {ep} must equal the device count {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(pp, dp, ep), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``dp`` and ``ep``; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("dp", "ep")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
    """How many ways ``batch_sharding`` splits the batch."""
    return mesh.shape["dp"] * mesh.shape["ep"]
