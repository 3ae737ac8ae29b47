"""DeepEP's low-latency mode (sharding/ep/low_latency.py) on 8 fake devices, checked as DeepEP's
test_low_latency.py checks itself: rows that encode their source rank and token, per-expert counts against
the all-gathered routing, the weighted combine within calc_diff tolerances; plus the order we define,
NaN-poisoned padding rows, the masked layout fed to the masked grouped FP8 GEMM, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ep_fixtures import calc_diff, per_rank
from ep_fixtures import mesh  # noqa: F401 - a pytest fixture
from pallas_kernels.fp8_gemm.api import m_grouped_fp8_gemm_nt_masked
from pallas_kernels.quant import FP8Array, dequantize_per_token, per_block_cast_to_fp8
from sharding.ep import low_latency_bytes, low_latency_combine, low_latency_dispatch

R, T, H, E, K = 8, 16, 256, 32, 4  # ranks, tokens per rank, hidden, experts, top-k
LOCAL = E // R


def routing(seed: int, holes_per_rank: int = 10):
    """DeepEP's test routing: top-k of |randn| + 1 scores (distinct experts), 10 slots per rank set to -1."""
    rng = np.random.default_rng(seed)
    idx = np.argsort(-(np.abs(rng.standard_normal((R * T, E))) + 1), axis=1)[:, :K].astype(np.int32)
    for r in range(R):
        flat = idx[r * T:(r + 1) * T].reshape(-1)  # a view
        flat[rng.choice(flat.size, holes_per_rank, replace=False)] = -1
    return idx, np.abs(rng.standard_normal(idx.shape)).astype(np.float32)


def as_rows(received):
    """The masked layout as float32 [..., L, R*M, H] (FP8 pairs dequantized, as DeepEP's per_token_cast_back)."""
    if isinstance(received, FP8Array):
        shape = received.data.shape
        flat = FP8Array(received.data.reshape(-1, shape[-1]), received.scale.reshape(-1, shape[-1] // 128))
        return dequantize_per_token(flat).reshape(shape)
    return received.astype(jnp.float32)


@pytest.mark.parametrize("use_fp8,round_scale,max_tokens", [(False, False, 16), (True, False, 24), (True, True, 24)])
def test_masked_layout_carries_source_rank_and_token_and_combine_weights_them(mesh, use_fp8, round_scale, max_tokens):
    idx, w = routing(0)
    x = np.zeros((R * T, H), np.float32)
    x[:, :-128] = np.repeat(np.arange(R) - 128, T)[:, None]  # rank - 128 ...
    x[:, -128:] = np.tile(np.arange(T), R)[:, None]  # ... except the last 128 channels: the token index
    x = jnp.asarray(x, jnp.bfloat16)

    fewer = np.where(np.arange(K) == 2, -1, idx)  # combine skips the -1 slots of the topk_idx it is given

    def fn(x, idx, w, fewer):
        d = low_latency_dispatch(x, idx, max_tokens, E, use_fp8=use_fp8, round_scale=round_scale)
        y = as_rows(d.x).astype(jnp.bfloat16)  # the "expert output" is the received row
        poisoned = jnp.where(jnp.arange(R * max_tokens)[None, :, None] < d.count[:, None, None], y, jnp.nan)
        scales = d.x.scale if use_fp8 else jnp.ones((1,), jnp.float32)
        return (y, d.count, d.handle.src_info, d.handle.layout_range, d.num_dropped, scales,
                low_latency_combine(y, idx, w, d.handle), low_latency_combine(poisoned, idx, w, d.handle),
                low_latency_combine(y, fewer, w, d.handle))

    y, count, src_info, layout_range, dropped, scales, combined, combined_poisoned, combined_fewer = per_rank(mesh, fn)(
        x, idx, w, fewer)
    assert y.shape == (R, LOCAL, R * max_tokens, H) and count.shape == (R, LOCAL) and (dropped == 0).all()
    for me in range(R):
        for local in range(LOCAL):
            expert, n = me * LOCAL + local, count[me, local]
            begin, per_source = layout_range[me, local, :, 0], layout_range[me, local, :, 1]
            assert n == (idx == expert).sum() == per_source.sum()
            np.testing.assert_array_equal(begin, np.cumsum(per_source) - per_source)  # source ranks in order
            rows, src = y[me, local], src_info[me, local]
            assert (src[n:] == -1).all() and (rows[n:] == 0).all(), "padding rows hold nothing"
            assert (rows[:n, :-128].min(1) == rows[:n, :-128].max(1)).all(), "rows constant but the last 128"
            np.testing.assert_array_equal(rows[:n, -128:], np.broadcast_to(src[:n, None], (n, 128)))
            for j in range(R):
                block = slice(begin[j], begin[j] + per_source[j])
                chose = np.flatnonzero((idx[j * T:(j + 1) * T] == expert).any(1))
                np.testing.assert_array_equal(src[block], chose)  # this source's tokens, in token order
                if not round_scale:  # power-of-two scales round rank - 128 (DeepEP skips this check too)
                    assert (rows[block, :-128] == j - 128).all()
    if round_scale:
        valid_scales = scales[np.arange(R * max_tokens)[None, None] < count[..., None]]
        mantissa = np.frexp(valid_scales)[0]  # 0.5 for a power of two; 1 - 2**-24 when XLA:CPU's exp2 misses one
        assert ((mantissa == 0.5) | (mantissa == np.float32(1 - 2**-24))).all(), "round_scale: power-of-two scales"

    tolerance = 9e-4 if use_fp8 else 1e-5
    for routed, got in ((idx, combined), (fewer, combined_fewer)):
        reference = np.asarray(x, np.float64) * np.where(routed != -1, w, 0).sum(1, keepdims=True)
        assert not np.isnan(got).any()
        assert calc_diff(reference, got.reshape(R * T, H)) < tolerance
    combined = combined.reshape(R * T, H)
    np.testing.assert_array_equal(combined_poisoned.reshape(R * T, H), combined)  # padding never read


def test_masked_layout_feeds_the_masked_grouped_gemm_for_a_whole_moe_decode_step(mesh):
    """dispatch (FP8) -> m_grouped_fp8_gemm_nt_masked(masked_m=count) -> combine equals the float64 MoE
    sum_k w[t, k] * x[t] @ W[idx[t, k]]^T; a token naming one expert twice sends two rows; an out-of-range
    id under jit selects nothing and is counted."""
    n_out, max_tokens = 128, 24
    idx, w = routing(1)
    idx[3 * T + 5, 1] = E + 7  # traced inside the map: treated as -1, counted as dropped
    idx[5 * T + 2, :2] = 9  # two rows for expert 9, both weighted
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((R * T, H)), jnp.bfloat16)
    experts = rng.standard_normal((E, n_out, H)).astype(np.float32) / np.sqrt(H)
    quantized = [per_block_cast_to_fp8(jnp.asarray(e)) for e in experts]
    b = jnp.stack([q.data for q in quantized])  # [E, N, H] e4m3
    sb = jnp.stack([q.scale for q in quantized])  # [E, N/128, H/128]

    def fn(x, idx, w, b, sb):
        d = low_latency_dispatch(x, idx, max_tokens, E)
        out = m_grouped_fp8_gemm_nt_masked(d.x, (b, sb), d.count, expected_m=R * T * K // E,
                                           out_dtype=jnp.bfloat16, implementation="xla")  # [L, R*M, N]
        valid = jnp.arange(R * max_tokens)[None, :, None] < d.count[:, None, None]
        out = jnp.where(valid, out, jnp.nan)  # rows past masked_m are unspecified: poison them
        combined = low_latency_combine(out, idx, w, d.handle)
        return out, d.count, d.handle.src_info, d.handle.layout_range, d.num_dropped, combined

    # check_vma=False: the XLA reference GEMM's fori_loop carry starts unvarying inside shard_map
    out, count, src_info, layout_range, dropped, combined = per_rank(mesh, fn, check_vma=False)(x, idx, w, b, sb)
    np.testing.assert_array_equal(dropped, [0, 0, 0, 1, 0, 0, 0, 0])
    x64, w64 = np.asarray(x, np.float64), experts.astype(np.float64)
    got, want = [], []
    for me in range(R):
        for local in range(LOCAL):
            expert = me * LOCAL + local
            for j in range(R):
                begin, n = layout_range[me, local, j]
                rows = j * T + src_info[me, local, begin:begin + n]
                got.append(out[me, local, begin:begin + n])
                want.append(x64[rows] @ w64[expert].T)
    assert sum(len(g) for g in got) == count.sum() == ((idx >= 0) & (idx < E)).sum()
    assert calc_diff(np.concatenate(want), np.concatenate(got)) < 1e-3
    valid = (idx >= 0) & (idx < E)
    moe = np.einsum("tk,tkn->tn", np.where(valid, w, 0), np.einsum("th,tknh->tkn", x64, w64[np.where(valid, idx, 0)]))
    assert calc_diff(moe, combined.reshape(R * T, n_out)) < 1e-3


def test_an_expert_named_twice_beyond_the_buffer_is_dropped_and_counted_never_overwritten(mesh):
    """Every token names expert 9 twice: 2T pairs for M = T slots. The first M pairs in (token, k) order
    travel, the rest are counted in num_dropped and contribute nothing (DeepEP assumes distinct experts)."""
    idx = np.full((R * T, K), -1, np.int32)
    idx[:, :2] = 9
    w = np.abs(np.random.default_rng(3).standard_normal(idx.shape)).astype(np.float32)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((R * T, H)), jnp.float32)

    def fn(x, idx, w):
        d = low_latency_dispatch(x, idx, T, E, use_fp8=False)
        return d.count, d.num_dropped, low_latency_combine(d.x, idx, w, d.handle)

    count, dropped, combined = per_rank(mesh, fn)(x, idx, w)
    np.testing.assert_array_equal(dropped, T)
    np.testing.assert_array_equal(count[9 // LOCAL], np.eye(LOCAL, dtype=int)[9 % LOCAL] * R * T)
    sent = (np.arange(T) < T // 2)[None].repeat(R, 0).reshape(-1, 1)  # tokens 0..T/2-1 of each rank, both slots
    reference = np.asarray(x) * np.where(sent, w[:, :2].sum(1, keepdims=True), 0)
    np.testing.assert_allclose(combined.reshape(R * T, H), reference, rtol=1e-6, atol=1e-6)


def test_wire_bytes_follow_deepeps_message_format():
    sizes = low_latency_bytes(7168, 128 * 8)  # DeepEP's benchmark: 128 tokens, top-8, hidden 7168
    assert sizes.dispatch == 128 * 8 * (7168 + 7168 // 128 * 4 + 16) and sizes.combine == 128 * 8 * 7168 * 2
    assert low_latency_bytes(H, 10, use_fp8=False).dispatch == 10 * (H * 2 + 16)
    with pytest.raises(ValueError, match="num_selections"):
        low_latency_bytes(H, -1)


def test_bad_inputs_raise_value_errors_naming_the_argument(mesh):
    idx, w = routing(2)
    x = np.zeros((R * T, H), jnp.bfloat16)

    def attempt(x, idx, max_tokens=T, num_experts=E, **kw):
        fn = lambda x, idx: low_latency_dispatch(x, idx, max_tokens, num_experts, **kw).count
        jax.eval_shape(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")),
                       *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, idx)))

    attempt(x, idx)  # the valid call traces
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
        attempt(x, idx, max_tokens=T - 1)
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
        attempt(x, idx, max_tokens=0)
    with pytest.raises(ValueError, match="x"):
        attempt(x[:, :, None], idx)
    with pytest.raises(ValueError, match="x"):
        attempt(x.astype(np.int32), idx)
    with pytest.raises(ValueError, match="hidden must be a multiple of 128"):
        attempt(x[:, :96], idx)
    with pytest.raises(ValueError, match="topk_idx"):
        attempt(x, idx.astype(np.float32))
    with pytest.raises(ValueError, match="topk_idx"):
        attempt(x, idx[: R * (T - 1)])
    with pytest.raises(ValueError, match="num_experts"):
        attempt(x, idx, num_experts=12)  # 8 ranks do not divide 12 experts
    with pytest.raises(ValueError, match="round_scale"):
        attempt(x, idx, use_fp8=False, round_scale=True)

    def attempt_combine(y_shape, y_dtype=jnp.bfloat16, w_cols=K):
        def fn(x, idx, w):
            d = low_latency_dispatch(x, idx, T, E)
            return low_latency_combine(jnp.zeros(y_shape, y_dtype), idx, w[:, :w_cols], d.handle)
        jax.eval_shape(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")),
                       *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, idx, w)))

    attempt_combine((LOCAL, R * T, H))  # the valid call traces
    with pytest.raises(ValueError, match="y"):
        attempt_combine((LOCAL, R * T + 1, H))
    with pytest.raises(ValueError, match="y"):
        attempt_combine((LOCAL, R * T, H), jnp.int32)
    with pytest.raises(ValueError, match="topk_weights"):
        attempt_combine((LOCAL, R * T, H), w_cols=2)
