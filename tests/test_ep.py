"""DeepEP's normal mode (sharding/ep) on 8 fake devices, checked the way DeepEP checks itself: inputs that
encode their source, counts against all-reduced references, combine(dispatch(x)) identities, calc_diff
tolerances for FP8, and gradients against ``jax.grad`` of a single-device dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ep_fixtures import assert_gradients_match, calc_diff, moe_reference, per_rank
from ep_fixtures import mesh  # noqa: F401 - a pytest fixture
from sharding.ep import combine, dispatch, get_dispatch_layout

R, T, H, E, K = 8, 16, 128, 16, 4  # ranks, tokens per rank, hidden, experts, top-k
LOCAL = E // R


def routing(seed: int, *, num_tokens: int = R * T, holes: float = 0.1):
    """DeepEP's test routing: top-k of random scores, some slots -1; plus random weights."""
    rng = np.random.default_rng(seed)
    idx = np.argsort(-(rng.random((num_tokens, E)) + 1), axis=1)[:, :K].astype(np.int32)
    idx[rng.random(idx.shape) < holes] = -1
    return idx, rng.random(idx.shape).astype(np.float32)


def test_dispatch_layout_matches_a_numpy_reference():
    idx, _ = routing(0, num_tokens=T)
    idx[0] = [0, 1, 5, -1]  # two experts of rank 0: rank 0 counts this token once
    layout = get_dispatch_layout(idx, E, R)
    rank = np.where(idx >= 0, idx // LOCAL, -1)
    in_rank = np.stack([(rank == r).any(1) for r in range(R)], 1)
    np.testing.assert_array_equal(layout.is_token_in_rank, in_rank)
    np.testing.assert_array_equal(layout.num_tokens_per_rank, in_rank.sum(0))
    np.testing.assert_array_equal(layout.num_tokens_per_expert, np.bincount(idx[idx >= 0], minlength=E))
    assert int(layout.num_tokens_per_rank[0]) == int(in_rank[:, 0].sum()) and in_rank[0, 0]


def test_every_received_row_carries_its_source_and_counts_match(mesh):
    """x = (source rank, token, noise): each rank receives, in rank-ordered blocks, exactly the tokens
    routed to it, with their ids re-indexed to local experts; counts equal the all-reduced references."""
    idx, w = routing(1)
    x = np.random.default_rng(1).standard_normal((R * T, H)).astype(np.float32)
    x[:, 0], x[:, 1] = np.repeat(np.arange(R), T), np.tile(np.arange(T), R)

    def fn(x, idx, w):
        d = dispatch(x, idx, w, num_experts=E, expand=False)
        return d.x, d.expert_ids, d.weights, d.tokens_per_expert, d.num_dropped

    rows, ids, weights, per_expert, dropped = per_rank(mesh, fn)(x, idx, w)
    global_per_expert = np.bincount(idx[idx >= 0], minlength=E)
    assert (dropped == 0).all()
    for me in range(R):
        np.testing.assert_array_equal(per_expert[me], global_per_expert[me * LOCAL:(me + 1) * LOCAL])
        blocks = rows[me].reshape(R, T, H)  # capacity = T rows from each source rank
        block_ids, block_w = ids[me].reshape(R, T, K), weights[me].reshape(R, T, K)
        for src in range(R):
            src_idx = idx[src * T:(src + 1) * T]
            bound = np.flatnonzero(((src_idx >= 0) & (src_idx // LOCAL == me)).any(1))
            n = len(bound)
            assert (block_ids[src, n:] == -1).all(), "padding rows must select nothing"
            np.testing.assert_array_equal(blocks[src, :n, 0], src)  # provenance
            np.testing.assert_array_equal(blocks[src, :n, 1], bound)  # in token order
            np.testing.assert_array_equal(blocks[src, :n], x[src * T + bound])
            local_ref = np.where((src_idx[bound] >= 0) & (src_idx[bound] // LOCAL == me), src_idx[bound] - me * LOCAL, -1)
            np.testing.assert_array_equal(block_ids[src, :n], local_ref)
            np.testing.assert_array_equal(block_w[src, :n], np.where(local_ref >= 0, w[src * T + bound], 0))


def test_expanded_rows_are_grouped_by_local_expert(mesh):
    idx, w = routing(2)
    x = np.random.default_rng(2).standard_normal((R * T, H)).astype(np.float32)

    def fn(x, idx, w):
        d = dispatch(x, idx, w, num_experts=E)
        return d.x, d.expert_ids, d.tokens_per_expert

    rows, ids, per_expert = per_rank(mesh, fn)(x, idx, w)
    for me in range(R):
        counts = per_expert[me]
        n = counts.sum()
        np.testing.assert_array_equal(ids[me][:n], np.repeat(np.arange(LOCAL), counts))  # contiguous groups
        assert (ids[me][n:] == -1).all()
        for e in range(LOCAL):  # each group holds exactly the tokens that chose that expert
            got = rows[me][:n][ids[me][:n] == e]
            want = x[(idx == me * LOCAL + e).any(1)]
            np.testing.assert_array_equal(np.sort(got[:, 0]), np.sort(want[:, 0]))


def test_combine_of_dispatch_is_x_times_destination_ranks_unweighted_and_the_weighted_sum(mesh):
    idx, w = routing(3)
    x = np.random.default_rng(3).standard_normal((R * T, H)).astype(np.float32)

    def fn(x, idx, w):
        v1 = dispatch(x, idx, w, num_experts=E, expand=False)
        expanded = dispatch(x, idx, w, num_experts=E)
        return combine(v1.x, v1.handle), combine(expanded.x, expanded.handle, expanded.weights)

    unweighted, weighted = per_rank(mesh, fn)(x, idx, w)
    ranks = get_dispatch_layout(idx, E, R).is_token_in_rank.sum(1)
    assert calc_diff(unweighted.reshape(R * T, H), x * np.asarray(ranks)[:, None]) < 5e-6
    reference = np.einsum("tk,td->td", np.where(idx >= 0, w, 0), x)
    np.testing.assert_allclose(weighted.reshape(R * T, H), reference, rtol=1e-5, atol=1e-5)


def test_fp8_dispatch_within_deepep_tolerance_and_fp8_pairs_pass_through(mesh):
    from pallas_kernels.quant import FP8Array, dequantize_per_token, per_token_cast_to_fp8

    idx, w = routing(4)
    hidden = 2 * H  # two 1x128 groups per row, scaled separately
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((R * T, hidden)) * np.repeat([1.0, 50.0], H), jnp.bfloat16)
    q = per_token_cast_to_fp8(x)

    def fn(x, data, scale, idx, w):
        cast = dispatch(x, idx, w, num_experts=E, use_fp8=True)
        plain = dispatch(x, idx, w, num_experts=E)
        pair = dispatch((data, scale), idx, w, num_experts=E)
        return cast.x, plain.x, pair.x.data, pair.x.scale, combine(cast.x, cast.handle, cast.weights)

    cast, plain, data, scale, combined = per_rank(mesh, fn)(x, q.data, q.scale, idx, w)
    assert cast.dtype == jnp.bfloat16 and data.dtype == jnp.float8_e4m3fn
    assert calc_diff(cast, plain) < 9e-4  # DeepEP's FP8 low-latency tolerance
    moved = dequantize_per_token(FP8Array(data.reshape(-1, hidden), scale.reshape(-1, hidden // 128)))  # the pair as sent
    np.testing.assert_array_equal(np.asarray(moved.astype(jnp.bfloat16)), cast.reshape(-1, hidden))
    reference = np.einsum("tk,td->td", np.where(idx >= 0, w, 0), np.asarray(x, np.float32))
    assert calc_diff(combined.reshape(R * T, hidden), reference) < 9e-4


@pytest.mark.parametrize("use_fp8", [False, True])
def test_gradients_match_a_single_device_dense_reference(mesh, use_fp8):
    idx, w = routing(5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    experts = (rng.standard_normal((E, H, H)) / np.sqrt(H)).astype(np.float32)
    cotangent = rng.standard_normal((R * T, H)).astype(np.float32)

    def ep_loss(x, w, experts, idx, cotangent):
        def fn(x, w, experts, idx, cotangent):
            d = dispatch(x, idx, w, num_experts=E, use_fp8=use_fp8)
            y_rows = jnp.einsum("nd,ndh->nh", d.x, experts[jnp.maximum(d.expert_ids, 0)])
            return (combine(y_rows, d.handle, d.weights) * cotangent).sum()[None]
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep"), P("ep"), P("ep")), out_specs=P("ep"))
        return mapped(x, w, experts, idx, cotangent).sum()

    def dense_loss(x, w, experts, idx, cotangent):
        return (moe_reference(x, idx, w, experts) * cotangent).sum()

    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
    got = jax.jit(jax.grad(ep_loss, argnums=(0, 1, 2)))(*(put(a) for a in (x, w, experts, idx, cotangent)))
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(x, w, experts, idx, cotangent)
    assert_gradients_match(got, want, use_fp8)


def test_every_token_to_one_expert_is_dropless_by_default_and_counts_drops_with_a_capacity(mesh):
    idx = np.full((R * T, K), -1, np.int32)
    idx[:, 0] = 3  # every token of every rank to expert 3 (rank 1)
    w = np.ones(idx.shape, np.float32)
    x = np.random.default_rng(6).standard_normal((R * T, H)).astype(np.float32)

    def fn(x, idx, w):
        dropless = dispatch(x, idx, w, num_experts=E)
        capped = dispatch(x, idx, w, num_experts=E, capacity_factor=1.0)
        return (combine(dropless.x, dropless.handle, dropless.weights), dropless.num_dropped,
                combine(capped.x, capped.handle, capped.weights), capped.num_dropped, jnp.int32(capped.handle.capacity))

    y, dropped, y_capped, dropped_capped, capacity = per_rank(mesh, fn)(x, idx, w)
    np.testing.assert_allclose(y.reshape(R * T, H), x, rtol=1e-6)
    assert (dropped == 0).all()
    cap = int(capacity[0])  # ceil(1.0 * T * K / R) tokens per (source, destination) pair
    assert cap == -(-T * K // R) < T
    np.testing.assert_array_equal(dropped_capped, T - cap)  # each rank's tokens beyond the pair capacity
    kept = y_capped.reshape(R, T, H)
    np.testing.assert_allclose(kept[:, :cap], x.reshape(R, T, H)[:, :cap], rtol=1e-6)
    assert (kept[:, cap:] == 0).all()


def test_empty_experts_and_no_selections(mesh):
    idx = np.full((R * T, K), -1, np.int32)
    idx[::3, 0] = 0  # only expert 0 is used; most tokens select nothing
    w = np.ones(idx.shape, np.float32)
    x = np.random.default_rng(7).standard_normal((R * T, H)).astype(np.float32)

    def fn(x, idx, w):
        d = dispatch(x, idx, w, num_experts=E)
        return combine(d.x, d.handle, d.weights), d.tokens_per_expert

    y, per_expert = per_rank(mesh, fn)(x, idx, w)
    np.testing.assert_allclose(y.reshape(R * T, H), np.where((idx >= 0).any(1)[:, None], x, 0), rtol=1e-6)
    assert per_expert[0, 0] == (idx[:, 0] == 0).sum() and per_expert.sum() == per_expert[0, 0]


def test_bad_inputs_raise_value_errors_naming_the_argument(mesh):
    idx, w = routing(8, num_tokens=T)
    x = np.zeros((T, H), np.float32)
    with pytest.raises(ValueError, match="topk_idx"):
        get_dispatch_layout(np.where(idx == 3, E, idx), E, R)  # an expert id >= num_experts
    with pytest.raises(ValueError, match="num_experts"):
        get_dispatch_layout(idx, 12, R)  # 8 ranks do not divide 12 experts

    def attempt(x, idx, w, **kw):
        fn = lambda x, idx, w: dispatch(x, idx, w, num_experts=kw.pop("num_experts", E), **kw).x
        jax.eval_shape(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")),
                       *(jax.ShapeDtypeStruct((R * a.shape[0],) + a.shape[1:], a.dtype) for a in (x, idx, w)))

    with pytest.raises(ValueError, match="x"):
        attempt(x[:, :, None], idx, w)
    with pytest.raises(ValueError, match="x"):
        attempt(x.astype(np.int32), idx, w)
    with pytest.raises(ValueError, match="topk_idx"):
        attempt(x, idx.astype(np.float32), w)
    with pytest.raises(ValueError, match="topk_weights"):
        attempt(x, idx, w[:, :2])
    with pytest.raises(ValueError, match="num_experts"):
        attempt(x, idx, w, num_experts=12)
    with pytest.raises(ValueError, match="hidden must be a multiple of 128"):
        attempt(x[:, :96], idx, w, use_fp8=True)
    with pytest.raises(ValueError, match="capacity_factor"):
        attempt(x, idx, w, capacity_factor=0.0)
