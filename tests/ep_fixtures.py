"""Shared by the expert-parallel tests: DeepEP's ``calc_diff``, the 8-rank ``ep`` mesh and a per-rank runner.
Import as `from ep_fixtures import calc_diff, per_rank` and `from ep_fixtures import mesh` (a pytest
fixture; tests/ is on sys.path: it has no __init__.py)."""

import jax
import jax.numpy as jnp
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


def per_rank(mesh, fn, spec=P("ep"), **shard_map_options):
    """Runs fn on each rank's shard of every argument; each output gains a leading [ranks] axis."""
    def wrapped(*args):
        return jax.tree.map(lambda a: a[None], fn(*args))
    mapped = jax.jit(jax.shard_map(wrapped, mesh=mesh, in_specs=spec, out_specs=spec, **shard_map_options))
    return lambda *args: jax.tree.map(np.asarray, mapped(*(jax.device_put(a, NamedSharding(mesh, spec)) for a in args)))


def moe_reference(x, idx, w, experts):
    """out[t] = sum_k w[t, k] * x[t] @ experts[idx[t, k]] on one device (-1 slots contribute nothing)."""
    per_copy = jnp.einsum("td,tkdh->tkh", x, experts[jnp.maximum(idx, 0)])
    return jnp.einsum("tk,tkh->th", w * (idx >= 0).astype(x.dtype), per_copy)


def assert_gradients_match(got, want, use_fp8: bool, names=("x", "topk_weights", "experts")) -> None:
    """Gradients of an EP loss against a dense one-device reference: FP8-rounded forward rows within DeepGEMM's
    calc_diff bound, else float32 closeness."""
    for name, g, r in zip(names, got, want):
        if use_fp8:  # forward rows are FP8-rounded; gradients travel in float32
            assert calc_diff(g, r) < 1e-3, name
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-4, atol=2e-4, err_msg=name)
