"""Paged MLA decoding against a float64 NumPy reference, with FlashMLA's test invariants: every cache slot
past ``cache_seqlens`` and every unused page NaN-poisoned, block tables that are random permutations,
lengths 0, 1 and non-multiples of 64, s_q in {1, 2} with causal masking, FlashMLA's tolerances."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.interpret import reset_interpreter
from pallas_kernels.mla_decode.api import flash_mla_with_kvcache
from pallas_kernels.mla_decode.combine import combine_splits
from pallas_kernels.mla_decode.fp8_cache import (dequantize_kv_cache, pack_flashmla, quantize_kv_cache,
                                                 unpack_flashmla)
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE, get_mla_metadata


@pytest.fixture(autouse=True)
def _reset_interpreter_after_failure(request):
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        reset_interpreter()


def make_case(seqlens, s_q, h_q, d=576, dv=512, dtype=jnp.bfloat16, seed=0, spare_blocks=3, score_std=None):
    """Random q, a NaN-poisoned paged cache under a shuffled block table. ``score_std``: scale q so the
    scores q k * d ** -0.5 have about this standard deviation (peaky softmax); default: FlashMLA's inputs
    (q and k ~ N(0, 0.01) clipped to [-1, 1], scores ~ 0.01, an almost uniform softmax)."""
    rng = np.random.default_rng(seed)
    batch = len(seqlens)
    max_blocks = max(-(-max(seqlens) // BLOCK_SIZE), 1) + 1
    num_blocks = batch * max_blocks + spare_blocks
    cache = np.full((num_blocks, BLOCK_SIZE, 1, d), np.nan, np.float32)  # unused pages stay NaN
    table = rng.permutation(num_blocks)[: batch * max_blocks].reshape(batch, max_blocks).astype(np.int32)
    for b, length in enumerate(seqlens):
        for t in range(length):
            cache[table[b, t // BLOCK_SIZE], t % BLOCK_SIZE, 0] = np.clip(rng.normal(size=d) / 10, -1, 1)
    q = np.clip(rng.normal(size=(batch, s_q, h_q, d)) / 10, -1, 1)
    if score_std is not None:  # k ~ 0.1 per column: q k / sqrt(d) ~ 0.1 |q| / sqrt(d)
        q = rng.normal(size=q.shape) * score_std * 10
    return (jnp.asarray(q, dtype), jnp.asarray(cache, dtype), jnp.asarray(table), jnp.asarray(seqlens, jnp.int32))


def reference64(q, cache, table, seqlens, dv, scale, causal):
    """Per sequence, per query token, in float64: gather the visible tokens and softmax."""
    q, cache, table = np.asarray(q, np.float64), np.asarray(cache, np.float64), np.asarray(table)
    batch, s_q, h_q, d = q.shape
    out = np.zeros((batch, s_q, h_q, dv))
    lse = np.full((batch, h_q, s_q), np.inf)
    for b, length in enumerate(np.asarray(seqlens)):
        keys = np.concatenate([cache[p, :, 0] for p in table[b]])[:length]  # [length, d]
        for i in range(s_q):
            visible = length - s_q + i + 1 if causal else length
            if visible <= 0:
                continue
            scores = q[b, i] @ keys[:visible].T * scale  # [h_q, visible]
            peak = scores.max(-1, keepdims=True)
            weights = np.exp(scores - peak)
            out[b, i] = weights @ keys[:visible, :dv] / weights.sum(-1, keepdims=True)
            lse[b, :, i] = (peak[:, 0] + np.log(weights.sum(-1)))
    return out, lse


def assert_flashmla_close(out, lse, ref_out, ref_lse):
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    assert np.isfinite(out).all(), "NaN from a poisoned cache slot"
    close = np.abs(out - ref_out) <= np.maximum(8e-4, 2.01 / 128 * np.abs(ref_out))
    assert close.all(), f"out: max error {np.abs(out - ref_out).max()}"
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert np.all(np.abs(lse[finite] - ref_lse[finite]) <= np.maximum(1e-6, 8.01 / 65536 * np.abs(ref_lse[finite])))


XLA_CASES = [((0, 1, 63, 64, 65, 300), 1, 16, False), ((7, 130, 1, 200), 2, 32, True),
             ((256, 129), 1, 64, False), ((100, 2, 70), 2, 128, True)]


@pytest.mark.parametrize("seqlens, s_q, h_q, causal", XLA_CASES)
def test_xla_path_matches_float64_reference(seqlens, s_q, h_q, causal):
    q, cache, table, lens = make_case(seqlens, s_q, h_q)
    out, lse = flash_mla_with_kvcache(q, cache, table, lens, 512, causal=causal, implementation="xla")
    assert out.shape == (len(seqlens), s_q, h_q, 512) and out.dtype == jnp.bfloat16
    assert lse.shape == (len(seqlens), h_q, s_q) and lse.dtype == jnp.float32
    assert_flashmla_close(out, lse, *reference64(q, cache, table, lens, 512, 576 ** -0.5, causal))


def test_metadata_covers_every_block_once_and_splits_long_sequences():
    seqlens = jnp.array([0, 1, 64, 65, 4096, 300], jnp.int32)
    meta = get_mla_metadata(seqlens, 16, 1, num_sms=8)
    work = np.asarray(meta.work)
    for b, length in enumerate(np.asarray(seqlens)):
        items = work[(work[:, 0] == b) & (work[:, 1] < work[:, 2])]
        covered = sorted(block for _, lo, hi, _ in items for block in range(lo, hi))
        assert covered == list(range(-(-length // BLOCK_SIZE)))
        assert len(items) == int(meta.num_splits[b])
        offsets = np.asarray(meta.split_offsets)
        assert sorted(items[:, 3]) == list(range(offsets[b], offsets[b + 1]))
    assert int(meta.num_splits[4]) > 1  # the 4096-token sequence is split over several SM parts
    assert int(meta.num_splits[0]) == 0
    # Part by part (one CTA each): a part's items are consecutive rows, in sequence order, and take
    # consecutive block windows; every row's slot is distinct.
    parts = np.asarray(meta.part_offsets)
    assert meta.num_sm_parts == 8 and parts[0] == 0 and parts[-1] == int(meta.num_splits.sum())
    positions = []
    for p in range(meta.num_sm_parts):
        items = work[parts[p]:parts[p + 1]]
        assert (items[:, 1] < items[:, 2]).all() and (np.diff(items[:, 0]) > 0).all()
        positions += [(b, lo) for b, lo, _, _ in items]
    assert positions == sorted(positions)  # parts walk the sequences in order, each taking the next window
    assert (work[parts[-1]:, 1] >= work[parts[-1]:, 2]).all()
    assert sorted(work[:, 3]) == list(range(meta.num_slots))


def test_schedule_plans_for_the_device_sms():
    """The metadata plans for the device's SMs (Hopper's 132 on a CPU), not for the implementation (the
    interpreted kernel runs such a schedule in test_generate's decode test)."""
    seqlens = jnp.array([5, 200, 70], jnp.int32)
    default = get_mla_metadata(seqlens, 64, 1)
    assert default.num_sm_parts == 132  # one 64-row tile: every SM a part
    for x, y in zip(default, get_mla_metadata(seqlens, 64, 1, num_sms=132)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_combine_of_any_split_equals_the_whole_softmax():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 3, 50))  # [batch, rows, keys]
    values = rng.normal(size=(2, 50, 4))
    work = np.array([[0, 0, 2, 0], [0, 2, 5, 1], [1, 0, 5, 2], [0, 0, 0, 3]], np.int32)  # keys by tens; by slot
    partial_out, partial_lse = [], []
    for b, lo, hi, _ in work:
        s = scores[b, :, lo * 10:hi * 10]
        lse = np.log(np.exp(s).sum(-1)) if hi > lo else np.full(3, -np.inf)
        partial_lse.append(lse)
        partial_out.append(np.exp(s - lse[:, None]) @ values[b, lo * 10:hi * 10] if hi > lo else np.zeros((3, 4)))
    work = work[[2, 1, 0, 3]]  # items listed part by part, not in slot order: the combine goes by slot
    meta = get_mla_metadata(jnp.array([50, 50]), 3, 1)._replace(work=jnp.asarray(work))
    out, lse = combine_splits(jnp.asarray(np.array(partial_out), jnp.float32),
                              jnp.asarray(np.array(partial_lse), jnp.float32), meta, batch=2)
    exact = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out), (exact / exact.sum(-1, keepdims=True)) @ values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.log(np.exp(scores).sum(-1)), rtol=1e-6)


def test_fp8_cache_round_trip_and_decode():
    q, cache, table, lens = make_case((90, 200), 1, 16, seed=2)
    clean = jnp.nan_to_num(cache)
    fp8 = quantize_kv_cache(clean, 512)
    assert fp8.shape == clean.shape and fp8.values.dtype == jnp.float8_e4m3fn
    assert sum(x[0, 0].nbytes for x in (fp8.values, fp8.rope)) + fp8.scales[0, 0, :, 0].nbytes == 656
    back = dequantize_kv_cache(fp8)
    np.testing.assert_array_equal(np.asarray(back[..., 512:]), np.asarray(clean[..., 512:]))  # RoPE stays bf16
    latent, restored = np.asarray(clean[..., :512], np.float32), np.asarray(back[..., :512], np.float32)
    assert np.all(np.abs(restored - latent) <= 2 ** -3 * np.abs(latent) + 1e-6)  # e4m3: 3 mantissa bits
    assert set(np.unique(np.log2(np.asarray(fp8.scales)) % 1)) == {0.0}  # UE8M0: powers of two
    out, _ = flash_mla_with_kvcache(q, fp8, table, lens, 512, implementation="xla")
    ref_out, _ = reference64(q, back, table, lens, 512, 576 ** -0.5, False)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=8e-4, rtol=2.01 / 128)


def test_flashmla_packed_rows_round_trip_and_decode_the_same():
    """FlashMLA's 656-byte rows (values | 4 f32 scales | 64 bf16 RoPE) unpack to the same cache."""
    q, cache, table, lens = make_case((70, 3), 1, 16, seed=4)
    fp8 = quantize_kv_cache(cache, 512)
    packed = pack_flashmla(fp8)
    assert packed.shape == cache.shape[:3] + (656,) and packed.dtype == jnp.uint8
    row = np.asarray(packed[int(table[0, 0]), 5, 0])
    np.testing.assert_array_equal(row[512:516].view(np.float32), np.asarray(fp8.scales[int(table[0, 0]), 0, 0, 5]))
    np.testing.assert_array_equal(row[528:].view(jnp.bfloat16), np.asarray(cache[int(table[0, 0]), 5, 0, 512:]))
    for part, again in zip(fp8, unpack_flashmla(packed, 576, 512)):
        np.testing.assert_array_equal(np.asarray(part, np.float32), np.asarray(again, np.float32))
    out_packed, lse_packed = flash_mla_with_kvcache(q, packed, table, lens, 512, is_fp8_kvcache=True,
                                                    implementation="xla")
    out, lse = flash_mla_with_kvcache(q, fp8, table, lens, 512, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out_packed, np.float32), np.asarray(out, np.float32))
    np.testing.assert_array_equal(np.asarray(lse_packed), np.asarray(lse))


@pytest.mark.parametrize("change, argument", [
    (lambda c: c._replace(scales=c.scales.transpose(0, 1, 3, 2)), "k_cache.scales"),  # per-token, not per-page
    (lambda c: c._replace(rope=c.rope.astype(jnp.float16)), "k_cache.rope"),
    (lambda c: c._replace(values=c.values.astype(jnp.bfloat16)), "k_cache.values"),
])
def test_bad_fp8_caches_name_the_part(change, argument):
    q, cache, table, lens = make_case((70,), 1, 16)
    with pytest.raises(ValueError, match=argument):
        flash_mla_with_kvcache(q, change(quantize_kv_cache(cache, 512)), table, lens, 512, implementation="xla")
    with pytest.raises(ValueError, match="head_dim_v"):  # no room for the RoPE columns
        quantize_kv_cache(cache, 640)
    with pytest.raises(ValueError, match="k_cache"):  # FlashMLA rows of the wrong width
        flash_mla_with_kvcache(q, jnp.zeros(cache.shape[:3] + (600,), jnp.uint8), table, lens, 512,
                               is_fp8_kvcache=True, implementation="xla")


@pytest.mark.parametrize("change, argument", [
    (lambda q, c, t, l: (q[..., :512], c, t, l), "q"),  # wrong head dim
    (lambda q, c, t, l: (q, c, t[:, :1], l), "block_table"),  # too short for the longest sequence
    (lambda q, c, t, l: (q, c.astype(jnp.float16), t, l), "k_cache"),  # dtype mismatch
    (lambda q, c, t, l: (q, c, t, l.astype(jnp.float32)), "cache_seqlens"),
])
def test_bad_inputs_name_the_argument(change, argument):
    args = change(*make_case((70, 200), 1, 16))
    with pytest.raises(ValueError, match=argument):
        flash_mla_with_kvcache(*args, 512, implementation="xla")
    with pytest.raises(ValueError, match="head_dim_v"):
        flash_mla_with_kvcache(*make_case((70,), 1, 16), 600, implementation="xla")


# Interpret mode is slow (each warpgroup a thread, every wgmma a host callback): h_q and d scaled down
# where the case is about masking and splits, full 576/512 once. Each kernel call costs the interpreter its
# whole run again, so one case (the full-size one, with its empty and one-token sequences) serves a second
# "layer" from the same metadata; the others run one.
INTERPRET_CASES = [((0, 1, 63, 65, 600), 1, 16, False, 576, 512, 2), ((7, 530, 64), 2, 32, True, 128, 128, 1),
                   ((500, 3), 2, 64, True, 128, 128, 1), ((70, 1000), 1, 128, False, 192, 128, 1)]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("seqlens, s_q, h_q, causal, d, dv, layers", INTERPRET_CASES)
def test_kernel_in_interpreter_matches_float64_reference(seqlens, s_q, h_q, causal, d, dv, layers):
    """The split-KV kernel, run by the Mosaic GPU interpreter over a schedule that splits long sequences
    (4 SM parts), against float64 with FlashMLA's tolerances; in one case one metadata serves two "layers"."""
    q, cache, table, lens = make_case(seqlens, s_q, h_q, d=d, dv=dv, seed=len(seqlens))
    metadata = get_mla_metadata(lens, s_q * h_q, 1, num_sms=4 * -(-s_q * h_q // 64))  # 4 parts
    assert int(metadata.num_splits.max()) > 1, "the case must exercise the split-KV combine"
    ref = reference64(q, cache, table, lens, dv, d ** -0.5, causal)
    for layer in range(layers):  # metadata reused across layers, as a decode step does
        q_layer = q if layer == 0 else -q
        out, lse = flash_mla_with_kvcache(q_layer, cache, table, lens, dv, metadata, causal=causal,
                                          implementation="interpret")
        assert out.shape == (len(seqlens), s_q, h_q, dv) and out.dtype == q.dtype
        expected = ref if layer == 0 else reference64(q_layer, cache, table, lens, dv, d ** -0.5, causal)
        assert_flashmla_close(out, lse, *expected)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("seqlens, s_q, h_q, causal, d, dv", [((0, 1, 530, 64), 2, 32, True, 576, 512),
                                                              ((63, 1000), 1, 64, False, 320, 256)])
def test_fp8_cache_kernel_in_interpreter_matches_float64_reference(seqlens, s_q, h_q, causal, d, dv):
    """The kernel dequantises the FP8 pages itself (values x per-token group scale, poisoned rows zeroed):
    against float64 over the dequantised cache, with FlashMLA's tolerances and a split sequence."""
    q, cache, table, lens = make_case(seqlens, s_q, h_q, d=d, dv=dv, seed=5)
    fp8 = quantize_kv_cache(cache, dv)  # the NaN-poisoned slots quantise to NaN values; poison their scales too
    unused = jnp.isnan(cache[..., 0]).transpose(0, 2, 1)[:, :, None, :]  # [num_blocks, 1, 1, 64]
    fp8 = fp8._replace(scales=jnp.where(unused, jnp.nan, fp8.scales))
    assert np.isnan(np.asarray(fp8.values, np.float32)).any() and np.isnan(np.asarray(fp8.scales)).any()
    metadata = get_mla_metadata(lens, s_q * h_q, 1, num_sms=4 * -(-s_q * h_q // 64))
    assert int(metadata.num_splits.max()) > 1
    out, lse = flash_mla_with_kvcache(q, fp8, table, lens, dv, metadata, causal=causal, implementation="interpret")
    assert_flashmla_close(out, lse, *reference64(q, dequantize_kv_cache(fp8), table, lens, dv, d ** -0.5, causal))


PEAKY_CASES = [((7, 530, 64), 2, 16, True, 128, 128, False), ((63, 1, 500), 1, 16, False, 320, 256, True)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seqlens, s_q, h_q, causal, d, dv, fp8", PEAKY_CASES)
def test_kernel_in_interpreter_with_peaky_softmax_matches_float64_and_xla(seqlens, s_q, h_q, causal, d, dv, fp8):
    """Scores ~ N(0, 3^2), so P is peaky and lse moves ~0.2 with a 2% softmax-scale error (FlashMLA's inputs
    give scores ~ 0.01: an almost uniform softmax hides a wrong scale, P or mask). The kernel against float64
    and against the XLA path on the same inputs, with tolerances a few times its own error."""
    q, cache, table, lens = make_case(seqlens, s_q, h_q, d=d, dv=dv, seed=3, score_std=3.0)
    if fp8:
        cache = quantize_kv_cache(cache, dv)
        unused = jnp.isnan(cache.rope[..., 0]).transpose(0, 2, 1)[:, :, None, :]  # [num_blocks, 1, 1, 64]
        cache = cache._replace(scales=jnp.where(unused, jnp.nan, cache.scales))  # poison the unused scales too
    metadata = get_mla_metadata(lens, s_q * h_q, 1, num_sms=4)
    assert int(metadata.num_splits.max()) > 1, "the case must exercise the split-KV combine"
    out, lse = flash_mla_with_kvcache(q, cache, table, lens, dv, metadata, causal=causal, implementation="interpret")
    xla_out, xla_lse = flash_mla_with_kvcache(q, cache, table, lens, dv, causal=causal, implementation="xla")
    ref_out, ref_lse = reference64(q, dequantize_kv_cache(cache) if fp8 else cache, table, lens, dv, d ** -0.5, causal)
    out, xla_out = np.asarray(out, np.float64), np.asarray(xla_out, np.float64)
    assert np.isfinite(out).all(), "NaN from a poisoned cache slot"
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    peak = np.abs(ref_out).max()
    for name, (o, l) in {"float64": (ref_out, ref_lse), "xla": (xla_out, np.asarray(xla_lse))}.items():
        lse_error = np.abs(np.asarray(lse)[finite] - l[finite]).max()
        assert lse_error < 1e-4, f"lse vs {name}: {lse_error}"  # ~2e-6; a 1.02x softmax scale moves it by ~0.2
        out_error = np.abs(out - o).max() / peak
        assert out_error < 8e-3, f"out vs {name}: {out_error} of the largest output"  # 1.02x scale: ~1.8e-2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seqlens, fp8, split_scores, d, dv", [((63, 1, 500), False, False, 128, 128),
                                                                ((63, 1000), True, True, 320, 256)])
def test_kernel_in_interpreter_with_the_other_score_schedule(seqlens, fp8, split_scores, d, dv):
    """The score schedule each cache does not take by default (bf16: both warpgroups score all 64 tokens of a
    page; FP8: each scores its own 32 and they swap row maxima and P), peaky softmax, against float64."""
    from pallas_kernels.mla_decode.kernel_ops import flash_mla

    q, cache, table, lens = make_case(seqlens, 1, 16, d=d, dv=dv, seed=6, score_std=3.0)
    if fp8:
        cache = quantize_kv_cache(jnp.nan_to_num(cache), dv)
    metadata = get_mla_metadata(lens, 16, 1, num_sms=4)
    assert int(metadata.num_splits.max()) > 1, "the case must exercise the split-KV combine"
    out, lse = flash_mla(q, cache, table, lens, metadata, head_dim_v=dv, softmax_scale=d ** -0.5, causal=False,
                         interpret=True, kernel_options={"split_scores": split_scores})
    ref_out, ref_lse = reference64(q, dequantize_kv_cache(cache) if fp8 else cache, table, lens, dv, d ** -0.5, False)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert np.abs(np.asarray(lse) - ref_lse).max() < 1e-4
    assert np.abs(np.asarray(out, np.float64) - ref_out).max() / np.abs(ref_out).max() < 8e-3


def test_interpreter_refuses_to_start_with_too_few_xla_threads(monkeypatch):
    """With fewer XLA:CPU threads than warpgroups the interpreter would hang; it must say why instead."""
    monkeypatch.setenv("NPROC", "2")
    q, cache, table, lens = make_case((5,), 1, 16, d=128, dv=128)
    with pytest.raises(RuntimeError, match="NPROC"):
        flash_mla_with_kvcache(q, cache, table, lens, 128, implementation="interpret")
