"""Grouped matmul variants against a float64 NumPy loop over groups, their gradients, tiling and cost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseek.model import grouped_matmul as gm

VARIANTS = tuple(gm.GROUPED_MATMULS)


def numpy_reference(x, w, group_sizes):
    """[rows, out] float64: row r of group g is x[r] @ w[g]; rows past sum(group_sizes) are 0."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        y[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return y


def gathered_weight_reference(x, w, group_sizes):
    """The same product in differentiable jnp, each row times its own gathered weight (the gradient oracle)."""
    rows = jnp.arange(x.shape[0])
    owner = jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right")  # [rows], groups past the sum
    w_rows = w[jnp.minimum(owner, w.shape[0] - 1)]  # [rows, in, out]
    y = jnp.einsum("ri,rio->ro", x, w_rows, precision="highest")
    return jnp.where((owner < w.shape[0])[:, None], y, 0.0)


def random_inputs(seed, rows, k, n, group_sizes, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(group_sizes), k, n)) / np.sqrt(k), dtype)
    return x, w, jnp.asarray(group_sizes, jnp.int32)


def random_sizes(seed, rows, groups, empty=2):
    """Random group sizes summing to less than ``rows`` with ``empty`` empty groups."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(rows - rng.integers(1, 5), np.ones(groups) / groups)
    sizes[rng.choice(groups, empty, replace=False)] = 0
    return sizes


CASES = {
    "random_with_empty": (37, 13, 7, random_sizes(0, 37, 6)),
    "one_group_all_rows": (29, 16, 9, [0, 29, 0, 0]),
    "all_empty": (11, 5, 3, [0, 0, 0]),
    "single_group": (8, 3, 5, [8]),
    "many_groups": (100, 24, 40, random_sizes(1, 100, 33, empty=5)),
}
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


@pytest.mark.parametrize("case,dtype", [(case, jnp.float32) for case in CASES]
                         + [("random_with_empty", jnp.bfloat16), ("many_groups", jnp.bfloat16)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_numpy_loop(variant, case, dtype):
    rows, k, n, sizes = CASES[case]
    x, w, group_sizes = random_inputs(3, rows, k, n, sizes, dtype)
    y = jax.jit(gm.GROUPED_MATMULS[variant])(x, w, group_sizes)
    assert y.shape == (rows, n) and y.dtype == dtype
    expected = numpy_reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert not np.asarray(y[int(np.sum(sizes)):]).any(), "rows past sum(group_sizes) must be 0"


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_past_the_sum_are_zero_even_if_nan(variant):
    x, w, group_sizes = random_inputs(4, 20, 6, 5, [3, 0, 9], jnp.float32)
    x = x.at[12:].set(jnp.nan)
    y = jax.jit(gm.GROUPED_MATMULS[variant])(x, w, group_sizes)
    np.testing.assert_allclose(np.asarray(y), numpy_reference(x[:12], w, [3, 0, 9]).tolist() + [[0.0] * 5] * 8,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_rows(variant):
    fn = gm.GROUPED_MATMULS[variant]
    x, w, sizes = jnp.ones((0, 4)), jnp.ones((3, 4, 5)), jnp.zeros(3, jnp.int32)
    assert fn(x, w, sizes).shape == (0, 5)
    dx, dw = jax.grad(lambda x, w: fn(x, w, sizes).sum(), (0, 1))(x, w)
    assert dx.shape == (0, 4) and not np.asarray(dw).any()


@pytest.mark.parametrize("tile", [1, 3, 16])
def test_tiled_any_tile_size(tile):
    x, w, group_sizes = random_inputs(5, 50, 9, 11, random_sizes(5, 50, 7), jnp.float32)
    y = jax.jit(gm.tiled_grouped_matmul, static_argnames="tile")(x, w, group_sizes, tile=tile)
    np.testing.assert_allclose(np.asarray(y), numpy_reference(x, w, group_sizes), rtol=1e-5, atol=1e-5)


def test_tiled_unrolled_equals_looped():
    x, w, group_sizes = random_inputs(5, 50, 9, 11, random_sizes(5, 50, 7), jnp.float32)
    for unroll in (False, True):
        y = jax.jit(gm.tiled_grouped_matmul, static_argnames="unroll")(x, w, group_sizes, unroll=unroll)
        np.testing.assert_allclose(np.asarray(y), numpy_reference(x, w, group_sizes), rtol=1e-5, atol=1e-5)


def _grad_inputs(case):
    rows, k, n, sizes = CASES[case]
    x, w, group_sizes = random_inputs(6, rows, k, n, sizes, jnp.float32)
    return x, w, group_sizes, jax.random.normal(jax.random.key(7), (rows, n))


def _grads(fn, x, w, group_sizes, cotangent):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, group_sizes) * cotangent), (0, 1)))(x, w)


@pytest.fixture(scope="module")
def reference_grads():
    """case -> (dx, dw) of the gathered-weight reference, computed once per case for all variants."""
    cache = {}

    def grads(case):
        if case not in cache:
            cache[case] = _grads(gathered_weight_reference, *_grad_inputs(case))
        return cache[case]

    return grads


@pytest.mark.parametrize("case", ["random_with_empty", "one_group_all_rows", "many_groups"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_matches_gathered_reference(variant, case, reference_grads):
    x, w, group_sizes, cotangent = _grad_inputs(case)
    dx, dw = _grads(gm.GROUPED_MATMULS[variant], x, w, group_sizes, cotangent)
    ex, ew = reference_grads(case)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ex), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(ew), rtol=1e-4, atol=1e-4)
    assert not np.asarray(dx[int(np.sum(CASES[case][3])):]).any(), "rows past the sum get no gradient"


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_grads_keep_dtypes(variant):
    x, w, group_sizes = random_inputs(8, 30, 8, 6, [10, 0, 15], jnp.bfloat16)
    w32 = w.astype(jnp.float32)
    dx, dw = jax.jit(jax.grad(lambda x, w: gm.GROUPED_MATMULS[variant](x, w, group_sizes).astype(jnp.float32).sum(),
                              (0, 1)))(x, w32)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    ex, ew = jax.grad(lambda x, w: gathered_weight_reference(x, w, group_sizes).sum(), (0, 1))(
        x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ex), rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(ew), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_jit_matches_eager_with_traced_sizes(variant):
    traces = []
    jitted = jax.jit(lambda *args: traces.append(1) or gm.GROUPED_MATMULS[variant](*args))
    x, w, _ = random_inputs(9, 40, 12, 10, [0] * 5, jnp.float32)
    for seed in range(3):  # one compilation, new sizes each call
        sizes = random_sizes(seed, 40, 5, empty=1)
        y = jitted(x, w, jnp.asarray(sizes, jnp.int32))
        np.testing.assert_allclose(np.asarray(y), numpy_reference(x, w, sizes), rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


def test_tile_map_covers_every_row_once():
    rng = np.random.default_rng(10)
    tile_map = jax.jit(gm.tile_map, static_argnums=1)
    for rows, groups in [(1, 1), (37, 6), (150, 33), (64, 64)]:
        for tile in (None, int(rng.integers(1, 9))):
            plan = gm.plan_tiles(rows, groups, tile)
            sizes = rng.multinomial(rng.integers(0, rows + 1), np.ones(groups) / groups)
            sizes[rng.random(groups) < 0.2] = 0
            tiles = jax.tree.map(np.asarray, tile_map(jnp.asarray(sizes, jnp.int32), plan))
            ends = np.cumsum(sizes)
            owner = np.searchsorted(ends, np.arange(ends[-1]), side="right")  # [sum] group of each row
            covered = np.zeros(ends[-1], int)
            assert tiles.num_tiles <= plan.max_tiles
            for t in range(tiles.num_tiles):
                span = np.arange(tiles.row_start[t], min(tiles.row_start[t] + plan.tile, tiles.row_end[t]))
                assert len(span) > 0, "a used tile covers at least one row"
                assert (owner[span] == tiles.group[t]).all()
                covered[span] += 1
            assert (covered == 1).all(), (rows, groups, plan, sizes)
            assert (tiles.row_end[tiles.num_tiles:] <= tiles.row_start[tiles.num_tiles:]).all()


def test_max_tiles_bound_is_reached_and_kept():
    rows, groups = 64, 8
    plan = gm.plan_tiles(rows, groups)  # tile 8
    worst = jnp.asarray([plan.tile + 1] * 7 + [rows - 7 * (plan.tile + 1)], jnp.int32)  # each group one row over
    assert int(jax.jit(gm.tile_map, static_argnums=1)(worst, plan).num_tiles) == plan.max_tiles
    assert plan.max_tiles * plan.tile <= 2 * rows


def test_backend_pick():
    assert gm.grouped_matmul_for("cpu") == "tiled"
    assert gm.grouped_matmul_for("gpu") == "ragged_dot"
    assert gm.grouped_matmul_for("cuda") == "ragged_dot"
    assert gm.grouped_matmul_for("tpu") == "ragged_dot"
    assert gm.get_grouped_matmul() is gm.GROUPED_MATMULS[gm.grouped_matmul_for(jax.default_backend())]
    assert set(gm.grouped_matmul_for(p) for p in ("cpu", "gpu", "tpu")) <= set(gm.GROUPED_MATMULS)
    with pytest.raises(ValueError, match="name"):
        gm.get_grouped_matmul("megablox")


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_shapes_name_the_argument(variant):
    fn = gm.GROUPED_MATMULS[variant]
    x, w, sizes = jnp.ones((6, 4)), jnp.ones((2, 4, 3)), jnp.array([3, 3], jnp.int32)
    with pytest.raises(ValueError, match="^x:"):
        fn(jnp.ones((6,)), w, sizes)
    with pytest.raises(ValueError, match="^w:.*in-dim 4"):
        fn(x, jnp.ones((2, 5, 3)), sizes)
    with pytest.raises(ValueError, match="^w:"):
        fn(x, jnp.ones((4, 3)), sizes)
    with pytest.raises(ValueError, match="^group_sizes:.*\\(2,\\)"):
        fn(x, w, jnp.array([3, 1, 2], jnp.int32))
    with pytest.raises(ValueError, match="^group_sizes:.*integer"):
        fn(x, w, jnp.array([3.0, 3.0]))


# ------------------------------------------------------------------------------------------------ cost


def _flops(lowered_or_compiled) -> float:
    return lowered_or_compiled.cost_analysis()["flops"]


def _moe_inputs(rows, d, groups):
    sizes = np.bincount(np.random.default_rng(0).integers(0, groups, rows), minlength=groups)
    return jnp.zeros((rows, d)), jnp.zeros((groups, d, d)), jnp.asarray(sizes, jnp.int32)


def test_xla_counts_a_loop_body_once():
    """Why the cost tests analyse the unrolled program: XLA's cost_analysis counts a while body once."""
    x, w, sizes = _moe_inputs(256, 32, 8)
    ideal = 2 * 256 * 32 * 32
    looped = _flops(jax.jit(gm.tiled_grouped_matmul).lower(x, w, sizes).compile())
    unrolled = jax.jit(lambda *a: gm.tiled_grouped_matmul(*a, unroll=True)).lower(x, w, sizes)
    assert looped < ideal / 2  # the body (one tile) counted once
    assert ideal <= _flops(unrolled.compile()) <= 2 * ideal
    assert _flops(unrolled) == pytest.approx(_flops(unrolled.compile()), rel=0.01)  # lowered count agrees


def test_tiled_flops_within_2x_of_ideal_at_256_experts_where_ragged_dot_is_not():
    rows, d, groups = 4096, 256, 256
    x, w, sizes = _moe_inputs(rows, d, groups)
    ideal = 2 * rows * d * d
    tiled = _flops(jax.jit(lambda *a: gm.tiled_grouped_matmul(*a, unroll=True)).lower(x, w, sizes))
    assert ideal <= tiled <= 2 * ideal
    ragged = _flops(jax.jit(gm.ragged_dot_grouped_matmul).lower(x, w, sizes).compile())
    assert ragged > 2 * ideal  # XLA:CPU's masked dense ragged_dot fails the same bound


def test_tiled_forward_backward_flops_within_2x_of_ideal():
    rows, d, groups = 2048, 128, 64
    x, w, sizes = _moe_inputs(rows, d, groups)
    cotangent = jnp.zeros((rows, d))
    step = jax.value_and_grad(lambda x, w: jnp.sum(gm.tiled_grouped_matmul(x, w, sizes, unroll=True) * cotangent),
                              (0, 1))
    ideal = 3 * 2 * rows * d * d  # y, dx, dw
    assert ideal <= _flops(jax.jit(step).lower(x, w)) <= 2 * ideal
