"""The "ragged" transport of DeepEP's normal mode (``lax.ragged_all_to_all``, only the filled rows move).

XLA:CPU does not implement ragged_all_to_all (jax issue #34755), so two checks stand in on the CPU:
the program lowers for CUDA with the real collective in it, and on 8 fake devices, with the collective
replaced by an emulation of its documented semantics (built from all_gather), dispatch/combine over the
ragged transport give the all_to_all transport's results. The GPU suite runs the real collective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ep_fixtures import per_rank
from ep_fixtures import mesh  # noqa: F401 - a pytest fixture
from sharding.ep import combine, dispatch

R, T, H, E, K = 8, 16, 128, 16, 4


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``lax.ragged_all_to_all``'s documented semantics with one slice per peer: peer s's slice for me,
    operand_s[input_offsets_s[me] : + send_sizes_s[me]], lands at output[output_offsets_s[me] : ...]."""
    me, rows = jax.lax.axis_index(axis_name), operand.shape[0]
    gathered = [jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)]
    all_operand, all_in, all_send, all_out = gathered
    position = jnp.arange(rows)
    result = output
    for source in range(all_operand.shape[0]):
        start, size, at = all_in[source, me], all_send[source, me], all_out[source, me]
        inside = (position >= at) & (position < at + size)
        rows_from_source = all_operand[source][jnp.clip(start + position - at, 0, rows - 1)]
        result = jnp.where(inside.reshape((-1,) + (1,) * (operand.ndim - 1)), rows_from_source, result)
    consistent = (recv_sizes == jax.lax.all_to_all(send_sizes, axis_name, 0, 0, tiled=True)).all()
    poison = jnp.nan if jnp.issubdtype(result.dtype, jnp.floating) else jnp.iinfo(result.dtype).min
    return jnp.where(consistent, result, poison)  # mismatched recv_sizes poison the result


def _moe(transport):
    def fn(x, idx, w):
        d = dispatch(x, idx, w, num_experts=E, transport=transport)
        return d.x, combine(d.x * 2, d.handle, d.weights), d.tokens_per_expert
    return fn


def test_the_ragged_transport_gives_the_all_to_all_results_under_the_documented_semantics(mesh, monkeypatch):
    rng = np.random.default_rng(0)
    idx = np.argsort(-rng.random((R * T, E)), axis=1)[:, :K].astype(np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    w = rng.random(idx.shape).astype(np.float32)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    want = per_rank(mesh, _moe("all_to_all"))(x, idx, w)
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    got = per_rank(mesh, _moe("ragged"))(x, idx, w)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_the_ragged_transport_lowers_for_cuda_with_the_real_collective(mesh):
    def fn(x, idx, w):
        return _moe("ragged")(x, idx, w)[1]

    program = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    args = (jax.ShapeDtypeStruct((R * T, H), jnp.bfloat16), jax.ShapeDtypeStruct((R * T, K), jnp.int32),
            jax.ShapeDtypeStruct((R * T, K), jnp.float32))
    text = program.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("ragged_all_to_all") >= 4  # x, ids and weights out, the combine back


def test_an_unknown_transport_is_a_value_error(mesh):
    fn = lambda x, idx, w: dispatch(x, idx, w, num_experts=E, transport="nvshmem").x  # noqa: E731
    with pytest.raises(ValueError, match="transport"):
        jax.eval_shape(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")),
                       jax.ShapeDtypeStruct((R * T, H), jnp.float32), jax.ShapeDtypeStruct((R * T, K), jnp.int32),
                       jax.ShapeDtypeStruct((R * T, K), jnp.float32))
