"""The deterministic tile heuristic (DeepGEMM's rule, no autotuning).

For each candidate output-tile width ``tile_n``: count the work tiles, the waves they make over the SMs
and the last wave's utilisation; pick the fewest waves, then the fullest last wave, then the widest
tile, preferring widths that divide N (no padding copy). DeepGEMM's "unaligned" widths (112, 144, ...)
are candidates, which is what lets, e.g., N = 7168 fill 128 SMs instead of 112. The pipeline depth is
the largest that fits Hopper's 227 KB of shared memory. The heuristic picks the default variant (128-row
tiles, per-column promotion, no clusters, a pipeline per tile: the measured best); the others (``KernelConfig``'s
tile_m, promotion, cluster_n, tile_n up to 256, pipeline_across_tiles, epilogue_buffers, early_release) are chosen
by config, e.g. by ``benchmarks/fp8_gemm.py --sweep``.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig, round_up

HOPPER_SMEM_BYTES = 232448  # per-block opt-in shared memory on H100 / H200 / H800
SMEM_RESERVE = 2048  # barriers and bookkeeping
# Two f32 accumulators of 64 x tile_n per warpgroup live in registers. Measured on an H200
# (4096x7168x16384, benchmarks/gpu_suite.py): tile_n 128 with 4 stages ran at 932 TFLOPS, 160 at 834,
# 112 at 844, and 5 stages at 894-899; so tiles stop at 128 and the pipeline at 4 stages.
MAX_TILE_N = 128
MIN_TILE_N = 16
MAX_STAGES = 4


@dataclasses.dataclass(frozen=True)
class TileChoice:
    tile_n: int
    n_pad: int  # N rounded up to a multiple of tile_n
    waves: int
    last_wave_utilisation: float


def choose_tile_n(row_tiles: int, n: int, num_sms: int) -> TileChoice:
    """The tile width for ``row_tiles`` row tiles of 128 and ``n`` output columns."""
    best = None
    for tile_n in range(MIN_TILE_N, MAX_TILE_N + 1, 8):
        n_pad = round_up(n, tile_n)
        if n_pad - n > max(n // 8, 8) and tile_n > MIN_TILE_N:  # too much padding to be worth it
            continue
        tiles = max(row_tiles, 1) * (n_pad // tile_n)
        waves = -(-tiles // num_sms)
        utilisation = (tiles - (waves - 1) * num_sms) / num_sms
        key = (waves, -utilisation, n_pad != n, -tile_n)
        if best is None or key < best[0]:
            best = (key, TileChoice(tile_n, n_pad, waves, utilisation))
    return best[1]


def pipeline_depth(tile_n: int, out_itemsize: int, max_stages: int = MAX_STAGES, **variant) -> int:
    """The deepest TMA pipeline (at most ``max_stages``) that fits in shared memory; ``variant``: other
    KernelConfig fields (tile_m, promotion) that change the buffers."""
    for stages in range(max_stages, 1, -1):
        probe = KernelConfig(tile_n=tile_n, max_concurrent_steps=stages, num_sms=variant.get("cluster_n", 1), **variant)
        if probe.smem_bytes(out_itemsize) + SMEM_RESERVE <= HOPPER_SMEM_BYTES:
            return stages
    return 2


def select_config(row_tiles: int, n: int, out_itemsize: int, *, num_sms: int, k_grouped: bool = False,
                  for_interpreter: bool = False) -> tuple[KernelConfig, int]:
    """(kernel config, padded N) for a launch with ``row_tiles`` row tiles and ``n`` output columns."""
    choice = choose_tile_n(row_tiles, n, num_sms)
    stages = pipeline_depth(choice.tile_n, out_itemsize)
    config = KernelConfig(tile_n=choice.tile_n, max_concurrent_steps=stages, num_sms=num_sms,
                          k_grouped=k_grouped, for_interpreter=for_interpreter)
    return config, choice.n_pad
