"""The Mosaic GPU kernel's machinery: schedules, the tile heuristic, and lowering for a real GPU
(``jax.export`` for CUDA runs the Mosaic GPU compiler's checks on the CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.fp8_gemm import kernel_ops, schedule
from pallas_kernels.fp8_gemm.config import HOPPER_SMEM_BYTES, choose_tile_n, pipeline_depth, select_config
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
    # DeepSeek-V3 shapes on 132 SMs: 128-wide tiles where N allows, unaligned widths when they fill waves.
    assert choose_tile_n(32, 7168, 132).tile_n == 128
    choice = choose_tile_n(1, 2112, 132)
    assert choice.n_pad == 2112 and choice.waves == 1
    assert select_config(32, 7168, 2, num_sms=132) == select_config(32, 7168, 2, num_sms=132)  # deterministic
    for tile_n in (16, 64, 128):
        config = KernelConfig(tile_n=tile_n, max_concurrent_steps=pipeline_depth(tile_n, 2), num_sms=132)
        assert config.smem_bytes(2) <= HOPPER_SMEM_BYTES


S = jax.ShapeDtypeStruct
F8, F32, I32 = jnp.float8_e4m3fn, jnp.float32, jnp.int32
EXPORT_CASES = {
    "fp8_gemm_nt": (lambda a, sa, b, sb: kernel_ops.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.bfloat16, interpret=False),
                    [S((300, 520), F8), S((300, 5), F32), S((200, 520), F8), S((2, 5), F32)]),
    "contiguous": (lambda a, sa, b, sb, s, e: kernel_ops.m_grouped_contiguous(a, sa, b, sb, s, e, out_dtype=jnp.bfloat16,
                                                                              interpret=False),
                   [S((300, 512), F8), S((300, 4), F32), S((3, 256, 512), F8), S((3, 2, 4), F32), S((3,), I32),
                    S((3,), I32)]),
    "masked": (lambda a, sa, b, sb, mm: kernel_ops.m_grouped_masked(a, sa, b, sb, mm, 64, out_dtype=jnp.bfloat16,
                                                                    interpret=False),
               [S((3, 150, 512), F8), S((3, 150, 4), F32), S((3, 256, 512), F8), S((3, 2, 4), F32), S((3,), I32)]),
    "k_grouped": (lambda a, sa, b, sb, ks: kernel_ops.k_grouped_contiguous(a, sa, b, sb, ks, interpret=False),
                  [S((96, 640), F8), S((96, 5), F32), S((136, 640), F8), S((136, 5), F32), S((3,), I32)]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_kernel_lowers_for_cuda(name):
    fn, args = EXPORT_CASES[name]
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exported.mlir_module()  # the Mosaic GPU kernel, not an XLA fallback
