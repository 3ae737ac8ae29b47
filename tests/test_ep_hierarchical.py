"""Node-limited, hierarchical dispatch/combine (sharding/ep/hierarchical.py) on 8 fake devices as 2 nodes x 4
ranks (and 4 x 2): equal to the flat normal-mode ops, sources visible through both steps, inter-node rows
against a NumPy count, the node limit of jaxseek's router, FP8 within DeepEP's tolerance, and gradients
against ``jax.grad`` of a single-device dense reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxseek.model.router import route
from ep_fixtures import assert_gradients_match, calc_diff, moe_reference, per_rank
from sharding.ep import combine, dispatch, hierarchical_combine, hierarchical_dispatch, inter_node_bytes, row_bytes

T, H, E, K = 16, 128, 16, 4  # tokens per rank, hidden, experts, top-k
SPEC = P(("node", "local"))
SHAPES = {"2x4": (2, 4), "4x2": (4, 2)}


@pytest.fixture(scope="module", params=list(SHAPES))
def mesh(request, devices):
    return Mesh(np.asarray(devices).reshape(SHAPES[request.param]), ("node", "local"))


@pytest.fixture(scope="module")
def mesh2x4(devices):
    return Mesh(np.asarray(devices).reshape(2, 4), ("node", "local"))


def shape_of(mesh):
    return mesh.shape["node"], mesh.shape["local"]


def random_routing(seed: int, ranks: int, *, holes: float = 0.1):
    """DeepEP's test routing (top-k of random scores, some slots -1, a few tokens with none) and weights."""
    rng = np.random.default_rng(seed)
    idx = np.argsort(-rng.random((ranks * T, E)), axis=1)[:, :K].astype(np.int32)
    idx[rng.random(idx.shape) < holes] = -1
    idx[::37] = -1
    return idx, rng.random(idx.shape).astype(np.float32)


def router_routing(seed: int, nodes: int, max_nodes: int, ranks: int):
    """jaxseek's group-limited router with one group per node and topk_group = max_nodes."""
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((ranks * T, E)), jnp.float32)
    r = route(logits, jnp.zeros((E,)), top_k=K, n_group=nodes, topk_group=max_nodes, routed_scaling_factor=1.0)
    return np.asarray(r.expert_ids), np.asarray(r.weights)


def nodes_per_token(idx, nodes):
    node = np.where(idx >= 0, idx // (E // nodes), -1)
    return np.stack([(node == n).any(1) for n in range(nodes)], 1).sum(1)


@functools.lru_cache(maxsize=None)
def both_paths(mesh):
    """Hierarchical (max_nodes = nodes / 2) and flat dispatch/combine of the same tokens, compiled once per mesh."""
    max_nodes = mesh.shape["node"] // 2

    def fn(x, idx, w):
        h = hierarchical_dispatch(x, idx, w, num_experts=E, max_nodes=max_nodes)
        v1 = hierarchical_dispatch(x, idx, w, num_experts=E, expand=False)
        f = dispatch(x, idx, w, num_experts=E, axis_name=("node", "local"))
        return dict(rows=h.x, ids=h.expert_ids, weights=h.weights, per_expert=h.tokens_per_expert,
                    dropped=h.num_dropped, crossing=h.inter_node_rows, violations=h.num_node_violations,
                    bytes=h.inter_node_bytes, y=hierarchical_combine(h.x, h.handle, h.weights),
                    v1_rows=v1.x, v1_ids=v1.expert_ids, v1_weights=v1.weights,
                    v1_y=hierarchical_combine(v1.x, v1.handle),
                    flat_rows=f.x, flat_ids=f.expert_ids, flat_per_expert=f.tokens_per_expert,
                    flat_y=combine(f.x, f.handle, f.weights))
    return per_rank(mesh, fn, SPEC)


def test_inter_node_bytes_counts_one_row_per_node_or_per_rank():
    """2 nodes x 2 ranks, 1 token each, 8 experts (2 per rank): hand-counted rows."""
    idx = np.array([[0, 2, 4, 6],  # rank 0 (node 0): ranks 0, 1, 2, 3 -> node 1 once, ranks 2 and 3
                    [4, 6, -1, -1],  # rank 1 (node 0): ranks 2, 3 -> node 1 once
                    [1, 5, 7, -1],  # rank 2 (node 1): ranks 0, 2, 3 -> node 0 once, rank 0
                    [6, 7, -1, -1]], np.int32)  # rank 3 (node 1): rank 3 only, never leaves the node
    count = functools.partial(inter_node_bytes, idx, num_experts=8, num_nodes=2, ranks_per_node=2, row_bytes=10)
    np.testing.assert_array_equal(count(), [10, 10, 10, 0])
    np.testing.assert_array_equal(count(hierarchical=False), [20, 20, 10, 0])
    assert row_bytes(7168, jnp.float8_e4m3fn) == 7168 + 7168 // 128 * 4 and row_bytes(7168, jnp.bfloat16) == 2 * 7168


def test_equals_flat_dispatch_and_the_dense_weighted_sum(mesh):
    nodes, local = shape_of(mesh)
    idx, w = random_routing(1, nodes * local)
    x = np.random.default_rng(1).standard_normal((nodes * local * T, H)).astype(np.float32)
    out = both_paths(mesh)(x, idx, w)
    assert (out["dropped"] == 0).all()
    np.testing.assert_array_equal(out["per_expert"], out["flat_per_expert"])
    for me in range(nodes * local):  # each local expert receives the same rows as in the flat dispatch
        n = out["per_expert"][me].sum()
        grouped = np.repeat(np.arange(E // (nodes * local)), out["per_expert"][me])
        np.testing.assert_array_equal(out["ids"][me][:n], grouped)
        assert (out["ids"][me][n:] == -1).all() and (out["weights"][me][n:] == 0).all()
        for e in np.unique(out["ids"][me][:n]):
            got, want = out["rows"][me][out["ids"][me] == e], out["flat_rows"][me][out["flat_ids"][me] == e]
            np.testing.assert_array_equal(got[np.argsort(got[:, 0])], want[np.argsort(want[:, 0])])
    reference = np.einsum("tk,td->td", np.where(idx >= 0, w, 0), x)
    np.testing.assert_allclose(out["y"].reshape(-1, H), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["y"], out["flat_y"], rtol=1e-5, atol=1e-5)


def test_rows_cross_nodes_on_the_same_local_rank_and_fan_out_inside_the_node(mesh2x4):
    """x = (source rank, token, noise). Unexpanded, block l' of rank (n, l) came through rank (n, l'), so it
    holds exactly the tokens of source ranks with local index l' bound for (n, l), in (source, token) order;
    the unweighted combine returns x times the number of destination ranks (reduced in the node first)."""
    nodes, local = shape_of(mesh2x4)
    ranks, per_rank_experts = nodes * local, E // (nodes * local)
    idx, w = random_routing(2, ranks)
    x = np.random.default_rng(2).standard_normal((ranks * T, H)).astype(np.float32)
    x[:, 0], x[:, 1] = np.repeat(np.arange(ranks), T), np.tile(np.arange(T), ranks)
    out = both_paths(mesh2x4)(x, idx, w)
    dest = np.where(idx >= 0, idx // per_rank_experts, -1)
    for me in range(ranks):
        blocks = out["v1_rows"][me].reshape(local, nodes * T, H)
        ids = out["v1_ids"][me].reshape(local, nodes * T, K)
        weights = out["v1_weights"][me].reshape(local, nodes * T, K)
        for via in range(local):
            sources = [g for g in range(ranks) if g % local == via]
            bound = [(g, t) for g in sources for t in range(T) if (dest[g * T + t] == me).any()]
            rows = np.array([g * T + t for g, t in bound], int).reshape(-1)
            m = len(rows)
            np.testing.assert_array_equal(blocks[via, :m], x[rows])  # provenance and order
            assert (ids[via, m:] == -1).all() and (weights[via, m:] == 0).all()
            expect = np.where(dest[rows] == me, idx[rows] - me * per_rank_experts, -1)
            np.testing.assert_array_equal(ids[via, :m], expect)
            np.testing.assert_array_equal(weights[via, :m], np.where(expect >= 0, w[rows], 0))
    copies = np.stack([(dest == r).any(1) for r in range(ranks)], 1).sum(1)
    assert calc_diff(out["v1_y"].reshape(-1, H), x * copies[:, None]) < 5e-6


def test_router_routing_is_node_limited_and_crosses_nodes_once_per_node(mesh):
    """n_group = nodes, topk_group = max_nodes: every token touches <= max_nodes nodes, no violations; the
    rows sent across nodes equal the NumPy count, stay within tokens * max_nodes, and are fewer than the
    flat dispatch's (one row per destination rank). A random routing breaks the limit: counted, delivered."""
    nodes, local = shape_of(mesh)
    ranks, max_nodes = nodes * local, nodes // 2
    x = np.random.default_rng(3).standard_normal((ranks * T, H)).astype(np.float32)
    count = functools.partial(inter_node_bytes, num_experts=E, num_nodes=nodes, ranks_per_node=local,
                              row_bytes=row_bytes(H, jnp.float32))

    idx, w = router_routing(3, nodes, max_nodes, ranks)
    assert (nodes_per_token(idx, nodes) <= max_nodes).all()
    out = both_paths(mesh)(x, idx, w)
    np.testing.assert_array_equal(out["violations"], 0)
    np.testing.assert_array_equal(out["bytes"], count(idx))
    np.testing.assert_array_equal(out["crossing"] * row_bytes(H, jnp.float32), count(idx))
    assert (out["crossing"] <= T * max_nodes).all()
    assert count(idx).sum() < count(idx, hierarchical=False).sum()
    np.testing.assert_allclose(out["y"].reshape(-1, H), np.einsum("tk,td->td", w, x), rtol=1e-5, atol=1e-5)

    idx, w = random_routing(4, ranks, holes=0.0)
    out = both_paths(mesh)(x, idx, w)
    over = (nodes_per_token(idx, nodes) > max_nodes).reshape(ranks, T).sum(1)
    assert over.sum() > 0
    np.testing.assert_array_equal(out["violations"], over)
    np.testing.assert_array_equal(out["crossing"] * row_bytes(H, jnp.float32), count(idx))
    np.testing.assert_allclose(out["y"].reshape(-1, H), np.einsum("tk,td->td", np.where(idx >= 0, w, 0), x),
                               rtol=1e-5, atol=1e-5)


def test_fp8_within_deepep_tolerance_and_fp8_pairs_pass_through(mesh2x4):
    from pallas_kernels.quant import FP8Array, dequantize_per_token, per_token_cast_to_fp8

    idx, w = random_routing(5, 8)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((8 * T, H)), jnp.bfloat16)
    q = per_token_cast_to_fp8(x)

    def fn(x, data, scale, idx, w):
        cast = hierarchical_dispatch(x, idx, w, num_experts=E, use_fp8=True)
        plain = hierarchical_dispatch(x, idx, w, num_experts=E)
        pair = hierarchical_dispatch((data, scale), idx, w, num_experts=E)
        return (cast.x, plain.x, pair.x.data, pair.x.scale, hierarchical_combine(cast.x, cast.handle, cast.weights),
                cast.inter_node_bytes, plain.inter_node_bytes)

    cast, plain, data, scale, combined, fp8_bytes, bf16_bytes = per_rank(mesh2x4, fn, SPEC)(x, q.data, q.scale, idx, w)
    assert cast.dtype == jnp.bfloat16 and data.dtype == jnp.float8_e4m3fn
    assert calc_diff(cast, plain) < 9e-4
    moved = dequantize_per_token(FP8Array(data.reshape(-1, H), scale.reshape(-1, H // 128)))
    np.testing.assert_array_equal(np.asarray(moved.astype(jnp.bfloat16)), cast.reshape(-1, H))
    reference = np.einsum("tk,td->td", np.where(idx >= 0, w, 0), np.asarray(x, np.float32))
    assert calc_diff(combined.reshape(-1, H), reference) < 9e-4
    count = functools.partial(inter_node_bytes, idx, num_experts=E, num_nodes=2, ranks_per_node=4)
    np.testing.assert_array_equal(fp8_bytes, count(row_bytes=H + H // 128 * 4))
    np.testing.assert_array_equal(bf16_bytes, count(row_bytes=2 * H))


@pytest.mark.parametrize("use_fp8", [False, True])
def test_gradients_match_a_single_device_dense_reference(mesh2x4, use_fp8):
    idx, w = random_routing(6, 8)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8 * T, H)).astype(np.float32)
    experts = (rng.standard_normal((E, H, H)) / np.sqrt(H)).astype(np.float32)
    cotangent = rng.standard_normal((8 * T, H)).astype(np.float32)

    def ep_loss(x, w, experts, idx, cotangent):
        def fn(x, w, experts, idx, cotangent):
            d = hierarchical_dispatch(x, idx, w, num_experts=E, max_nodes=1, use_fp8=use_fp8)
            y_rows = jnp.einsum("nd,ndh->nh", d.x, experts[jnp.maximum(d.expert_ids, 0)])
            return (hierarchical_combine(y_rows, d.handle, d.weights) * cotangent).sum()[None]
        return jax.shard_map(fn, mesh=mesh2x4, in_specs=SPEC, out_specs=SPEC)(x, w, experts, idx, cotangent).sum()

    def dense_loss(x, w, experts, idx, cotangent):
        return (moe_reference(x, idx, w, experts) * cotangent).sum()

    put = lambda a: jax.device_put(a, NamedSharding(mesh2x4, SPEC))
    got = jax.jit(jax.grad(ep_loss, argnums=(0, 1, 2)))(*(put(a) for a in (x, w, experts, idx, cotangent)))
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(x, w, experts, idx, cotangent)
    assert_gradients_match(got, want, use_fp8)


def test_one_hot_expert_is_dropless_by_default_and_counts_drops_with_a_capacity(mesh2x4):
    idx = np.full((8 * T, K), -1, np.int32)
    idx[:, 0] = 3  # every token of every rank to expert 3 (rank 1 of node 0)
    w = np.ones(idx.shape, np.float32)
    x = np.random.default_rng(7).standard_normal((8 * T, H)).astype(np.float32)

    def fn(x, idx, w):
        out = []
        for max_nodes, capacity_factor in ((None, None), (None, 1.0), (1, 1.0)):
            d = hierarchical_dispatch(x, idx, w, num_experts=E, max_nodes=max_nodes, capacity_factor=capacity_factor)
            out += [hierarchical_combine(d.x, d.handle, d.weights), d.num_dropped]
        return out

    y, dropped, y_capped, dropped_capped, y_node_capped, dropped_node_capped = per_rank(mesh2x4, fn, SPEC)(x, idx, w)
    np.testing.assert_allclose(y.reshape(-1, H), x, rtol=1e-6)
    assert (dropped == 0).all()
    for got, lost in ((y_capped, dropped_capped), (y_node_capped, dropped_node_capped)):
        got = got.reshape(-1, H)
        kept = (got != 0).any(1)
        assert 0 < lost.sum() and kept.sum() + lost.sum() == 8 * T  # every copy either arrives whole or is counted
        np.testing.assert_allclose(got[kept], x[kept], rtol=1e-6)
    # C2 = T * K / L = 16 rows per (forwarder, rank): node 0's forwarders get 2T rows and drop T each
    np.testing.assert_array_equal(dropped_capped, [T] * 4 + [0] * 4)
    # max_nodes = 1 also caps step 1 at C1 = T / 2 rows per (source, node): half of each rank's tokens
    np.testing.assert_array_equal(dropped_node_capped, T // 2)


def test_bad_inputs_raise_value_errors_naming_the_argument(mesh2x4):
    idx, w = random_routing(8, 1)
    x = np.zeros((T, H), np.float32)

    def attempt(x, idx, w, **kw):
        fn = lambda x, idx, w: hierarchical_dispatch(x, idx, w, num_experts=kw.pop("num_experts", E), **kw).x
        jax.eval_shape(jax.shard_map(fn, mesh=mesh2x4, in_specs=SPEC, out_specs=SPEC),
                       *(jax.ShapeDtypeStruct((8 * a.shape[0],) + a.shape[1:], a.dtype) for a in (x, idx, w)))

    for bad, kw, name in ((x[:, :, None], {}, "x"), (x.astype(np.int32), {}, "x"), (x[:, :96], {"use_fp8": True}, "x")):
        with pytest.raises(ValueError, match=name):
            attempt(bad, idx, w, **kw)
    with pytest.raises(ValueError, match="topk_idx"):
        attempt(x, idx.astype(np.float32), w)
    with pytest.raises(ValueError, match="topk_weights"):
        attempt(x, idx, w[:, :2])
    for kw, name in (({"num_experts": 12}, "num_experts"), ({"max_nodes": 0}, "max_nodes"),
                     ({"capacity_factor": 0.0}, "capacity_factor"), ({"local_axis": "node"}, "node_axis")):
        with pytest.raises(ValueError, match=name):
            attempt(x, idx, w, **kw)
    with pytest.raises(ValueError, match="topk_idx"):
        inter_node_bytes(idx[:5], num_experts=E, num_nodes=2, ranks_per_node=4, row_bytes=1)

    def combine_with(y_rows, weights_rows):
        def fn(x, idx, w):
            d = hierarchical_dispatch(x, idx, w, num_experts=E)
            weights = None if weights_rows is None else d.weights[:weights_rows]
            return hierarchical_combine(d.x[:y_rows], d.handle, weights)
        jax.eval_shape(jax.shard_map(fn, mesh=mesh2x4, in_specs=SPEC, out_specs=SPEC),
                       *(jax.ShapeDtypeStruct((8 * a.shape[0],) + a.shape[1:], a.dtype) for a in (x, idx, w)))

    with pytest.raises(ValueError, match="y"):
        combine_with(5, None)
    with pytest.raises(ValueError, match="topk_weights"):
        combine_with(None, 5)
