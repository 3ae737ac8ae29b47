"""The Mosaic GPU kernel's machinery: schedules, the tile heuristic, and lowering for a real GPU
(``jax.export`` for CUDA runs the Mosaic GPU compiler's checks on the CPU)."""

import functools
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.fp8_gemm import kernel_ops, schedule
from pallas_kernels.fp8_gemm.config import HOPPER_SMEM_BYTES, TileChoice, choose_tile_n, pipeline_depth, select_config
from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig, tile_coordinates


def _stored_rows(tiles, tile_m):
    """output row -> how many tiles store it, and the group each storing tile says it has."""
    rows = {}
    for group, _, out_block, lo, hi, _, _ in np.asarray(tiles):
        for r in range(lo, hi):
            rows.setdefault(out_block * tile_m + r, []).append(group)
    return rows


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), gap=st.integers(0, 5))
def test_contiguous_tiles_store_every_grouped_row_exactly_once(sizes, gap):
    starts, ends, row = [], [], 0
    for size in sizes:
        starts.append(row)
        ends.append(row + size)
        row += size + gap  # skipped rows between groups
    m_pad = -(-max(row, 1) // 128) * 128
    tiles = schedule.contiguous_tiles(jnp.array(starts, jnp.int32), jnp.array(ends, jnp.int32), m_pad, 128, 4)
    assert tiles.shape[0] == m_pad // 128 + len(sizes) - 1  # megablox's bound
    stored = _stored_rows(tiles, 128)
    expected = {r: [g] for g, (s, e) in enumerate(zip(starts, ends)) for r in range(s, e)}
    assert stored == expected
    assert all(a == o for _, a, o, *_ in np.asarray(tiles))  # rows are read where they are written


def test_masked_and_k_grouped_tiles():
    tiles = schedule.masked_tiles(jnp.array([130, 0, 256], jnp.int32), 256, 128, 2)
    stored = _stored_rows(tiles, 128)
    assert sorted(stored) == list(range(130)) + list(range(512, 768))
    k_tiles = np.asarray(schedule.k_grouped_tiles(jnp.array([256, 0, 384], jnp.int32), 100, 128, 128, 128))
    assert k_tiles[:, 5].tolist() == [0, 2, 2] and k_tiles[:, 6].tolist() == [2, 0, 3]  # K step ranges
    assert k_tiles[1, 4] == 0  # the empty group stores nothing
    assert k_tiles[:, 1].tolist() == [0, 0, 0] and k_tiles[:, 2].tolist() == [0, 1, 2]  # A shared, out stacked


@pytest.mark.parametrize("rows, cols, band", [(5, 3, 2), (4, 4, 2), (1, 7, 8), (7, 2, 3), (32, 56, 8)])
def test_tile_raster_visits_every_tile_once(rows, cols, band):
    seen = [tuple(int(v) for v in tile_coordinates(jnp.int32(i), rows, cols, band)) for i in range(rows * cols)]
    assert sorted(seen) == [(r, c) for r in range(rows) for c in range(cols)]


def test_tile_heuristic():
    # DeepSeek-V3 shapes on 132 SMs, worked out by hand from the rule (fewest waves, fullest last wave, no
    # padding, widest tile). 4096 x 7168: 32 row tiles x 56 columns of 128 = 1792 tiles = 14 waves, 76 in the
    # last; no width > 128 is allowed, narrower ones need more waves. 4 stages: 4 x (256 x 128 + 4 x 256) +
    # 128 x 128 x 2 (bf16 out) = 167,936 bytes + 2,048 reserved <= 232,448.
    assert select_config(32, 7168, 2, num_sms=132) == (KernelConfig(tile_n=128, max_concurrent_steps=4, num_sms=132),
                                                       7168)
    # 1 row tile x 2112 columns: 16-wide tiles make exactly 132 tiles, one full wave (24 gives 88: 67%).
    assert choose_tile_n(1, 2112, 132) == TileChoice(tile_n=16, n_pad=2112, waves=1, last_wave_utilisation=1.0)
    # 32 x 2112: 5 waves need <= 20 column tiles (width >= 112); 112 -> 19 columns (2128, padded), 608 tiles,
    # 80 in the last wave, beats 120 (18 columns, 48) and 128 (17 columns, 16).
    assert choose_tile_n(32, 2112, 132) == TileChoice(tile_n=112, n_pad=2128, waves=5, last_wave_utilisation=80 / 132)
    # 4 x 2048, f32 out: one wave needs <= 33 columns (width >= 64); 64 -> 128 tiles (97%), 72 -> 116.
    # 4 stages: 4 x (192 x 128 + 4 x 192) + 128 x 64 x 4 = 134,144 + 2,048 fits.
    config, n_pad = select_config(4, 2048, 4, num_sms=132, k_grouped=True)
    assert (config.tile_n, config.max_concurrent_steps, config.k_grouped, n_pad) == (64, 4, True, 2048)
    for tile_n in (16, 64, 128):
        config = KernelConfig(tile_n=tile_n, max_concurrent_steps=pipeline_depth(tile_n, 2), num_sms=132)
        assert config.smem_bytes(2) <= HOPPER_SMEM_BYTES


S = jax.ShapeDtypeStruct
F8, F32, I32 = jnp.float8_e4m3fn, jnp.float32, jnp.int32
EXPORT_CASES = {
    "fp8_gemm_nt": (lambda a, sa, b, sb, config=None: kernel_ops.fp8_gemm_nt(
        a, sa, b, sb, out_dtype=jnp.bfloat16, interpret=False, config=config),
                    [S((300, 520), F8), S((300, 5), F32), S((200, 520), F8), S((2, 5), F32)]),
    "contiguous": (lambda a, sa, b, sb, s, e, config=None: kernel_ops.m_grouped_contiguous(
        a, sa, b, sb, s, e, out_dtype=jnp.bfloat16, interpret=False, config=config),
                   [S((300, 512), F8), S((300, 4), F32), S((3, 256, 512), F8), S((3, 2, 4), F32), S((3,), I32),
                    S((3,), I32)]),
    "masked": (lambda a, sa, b, sb, mm, config=None: kernel_ops.m_grouped_masked(
        a, sa, b, sb, mm, 64, out_dtype=jnp.bfloat16, interpret=False, config=config),
               [S((3, 150, 512), F8), S((3, 150, 4), F32), S((3, 256, 512), F8), S((3, 2, 4), F32), S((3,), I32)]),
    "k_grouped": (lambda a, sa, b, sb, ks, config=None: kernel_ops.k_grouped_contiguous(
        a, sa, b, sb, ks, interpret=False, config=config),
                  [S((96, 640), F8), S((96, 5), F32), S((136, 640), F8), S((136, 5), F32), S((3,), I32)]),
}


def _export(name, config=None):
    fn, args = EXPORT_CASES[name]
    return jax.export.export(jax.jit(functools.partial(fn, config=config)), platforms=["cuda"])(*args).mlir_module()


def _kernel_operand_types(module: str, with_result: bool = False):
    """The tensor types the Mosaic GPU custom call takes (what the XLA glue hands the kernel) [and returns]."""
    call = re.search(r"custom_call @mosaic_gpu\S*\(.*\} : \(([^)]*)\) -> (tensor<[^>]*>)", module)
    assert call, "no Mosaic GPU kernel in the module (an XLA fallback?)"
    operands = [t.strip() for t in call.group(1).split(",")]
    return (operands, call.group(2)) if with_result else operands


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_kernel_lowers_for_cuda(name):
    operands = _kernel_operand_types(_export(name))
    assert len(operands) == 5  # a, A scales, b, B scales, the tile schedule


# Variants chosen by config (promotion.py, KernelConfig): each must lower through the real CUDA lowering, with
# its tile width in the wgmma instruction, its row tile in A's padding and its B scales in their own layout.
VARIANTS = {"tile_scalar_n48": dict(tile_n=48, promotion="tile_scalar"),
            "tile_scalar_m64_n112": dict(tile_n=112, tile_m=64, promotion="tile_scalar"),
            "per_column_n192": dict(tile_n=192, max_concurrent_steps=3),
            "per_column_m64_n128": dict(tile_n=128, tile_m=64),
            "tile_scalar_n112_cluster2": dict(tile_n=112, promotion="tile_scalar", cluster_n=2),
            "per_column_n48_unpadded_b": dict(tile_n=48, pad_b=False),
            "per_column_m256_n128": dict(tile_n=128, tile_m=256, max_concurrent_steps=3),
            "tile_scalar_m256_n112": dict(tile_n=112, tile_m=256, promotion="tile_scalar", max_concurrent_steps=3)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", ["fp8_gemm_nt", "masked"])  # contiguous: the default export and the interpreter
def test_kernel_variants_lower_for_cuda(name, variant):
    config = KernelConfig(**{"max_concurrent_steps": 4, "num_sms": 132, **VARIANTS[variant]})
    module = _export(name, config)
    assert f"wgmma.mma_async.sync.aligned.m64n{config.tile_n}k32.f32.e4m3.e4m3" in module
    (a_type, _, b_type, sb_type, _), out_type = _kernel_operand_types(module, with_result=True)
    rows = int(re.match(r"tensor<(\d+)x", a_type).group(1))
    tile_m = config.tile_m  # A padded to the row tile only: 300 rows, or 3 groups of 150
    assert rows == {"fp8_gemm_nt": -(-300 // tile_m) * tile_m, "masked": 3 * (-(-150 // tile_m) * tile_m)}[name]
    n = int(re.match(r"tensor<\d+x(\d+)x", out_type).group(1))  # the output: [rows, n_pad]
    assert n % (config.tile_n * config.cluster_n) == 0
    b_rows = int(re.match(r"tensor<\d+x(\d+)x", b_type).group(1))  # [g, n, k]: K-major B on the GPU
    n_true = EXPORT_CASES[name][1][2].shape[-2]
    assert b_rows == (n if config.pad_b else n_true)  # unpadded: TMA zero-fills the rows past n_true
    assert config.pad_b or n_true < n  # (the unpadded variant's tile width does not divide these N)
    # a cluster's CTAs map each other's shared memory (the multicast's barriers): only in cluster launches
    assert ("gpu.cluster_dim_blocks" in module and "mapa.shared" in module) == (config.cluster_n > 1)
    scale_cols = int(re.search(r"x(\d+)xf32>", sb_type).group(1))
    if config.promotion == "per_column":
        assert scale_cols == n + 32  # one scale per output column (+ the TMA box's padding)
    else:
        assert scale_cols == -(-(-(-n // 128) + 32) // 4) * 4  # compact: one per 128-column block


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", [dict(tile_n=192), dict(tile_n=160, promotion="tile_scalar"),
                                     dict(tile_n=128, tile_m=64), dict(tile_n=128, epilogue_buffers=2),
                                     dict(tile_n=128, tile_m=256)],
                         ids=["n192", "tile_scalar_n160", "m64_n128", "n128_two_epilogue_buffers", "m256_n128"])
def test_pipeline_depth_is_what_fits_in_shared_memory(variant):
    """The heuristic's SMEM accounting against Mosaic GPU's own check (Hopper's 232,448 bytes per block):
    the deepest pipeline it allows lowers, one stage more does not."""
    depth = pipeline_depth(variant["tile_n"], 2, max_stages=12, **variant_fields(variant))
    fn, args = EXPORT_CASES["fp8_gemm_nt"]
    args = [S((256, 2048), F8), S((256, 16), F32), S((768, 2048), F8), S((6, 16), F32)]  # 16 K steps: no clamping
    for stages, fits in ((depth, True), (depth + 1, False)):
        config = KernelConfig(max_concurrent_steps=stages, num_sms=132, **variant)
        export = jax.export.export(jax.jit(functools.partial(fn, config=config)), platforms=["cuda"])
        if fits:
            export(*args)
        else:
            with pytest.raises(ValueError, match="exceeds available shared memory"):
                export(*args)


def variant_fields(variant):
    return {key: value for key, value in variant.items() if key != "tile_n"}


@pytest.mark.slow  # ~15-30 s: 36 exports
@pytest.mark.timeout(300)
def test_sweep_dry_run_exports_every_quick_config():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import fp8_sweep
    rows = fp8_sweep.dry_run(quick=True)
    assert len(rows) == sum(len(fp8_sweep.sweep_configs(m, n, 132, quick=True, k=k))
                            for m, n, k in fp8_sweep.QUICK_SHAPES)
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    assert {row["config"].split()[0] for row in rows} == {"per_column", "tile_scalar"}
    assert {row["config"].split()[-1] for row in rows} == {"c1", "c2"}  # with and without 2-CTA clusters
    assert {"across-tiles", "early-release", "epilogue-x2"} <= {word for row in rows for word in row["config"].split()}
