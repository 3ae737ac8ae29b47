"""Shared by the expert-parallel tests: DeepEP's ``calc_diff``, the 8-rank ``ep`` mesh and a per-rank runner.
Import as `from ep_fixtures import calc_diff, per_rank` and `from ep_fixtures import mesh` (a pytest
fixture; tests/ is on sys.path: it has no __init__.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def calc_diff(x, y) -> float:
    """DeepEP's variant of calc_diff: both sides shifted by +1 first (pallas_kernels.numerics has DeepGEMM's)."""
    x, y = np.asarray(x, np.float64) + 1, np.asarray(y, np.float64) + 1
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


@pytest.fixture(scope="module")
def mesh(devices):
    return Mesh(np.asarray(devices), ("ep",))


def per_rank(mesh, fn, **shard_map_options):
    """Runs fn on each rank's shard of every argument; each output gains a leading [ranks] axis."""
    def wrapped(*args):
        return jax.tree.map(lambda a: a[None], fn(*args))
    mapped = jax.jit(jax.shard_map(wrapped, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), **shard_map_options))
    return lambda *args: jax.tree.map(np.asarray, mapped(*(jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in args)))
