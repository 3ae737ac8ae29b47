"""The Mosaic GPU implementation of each op (``reference.py`` is the XLA one): operand layout,
schedule, launch. Shared by the ``mosaic_gpu`` and ``interpret`` paths; inputs are validated by ``api.py``.

The kernel wants: M padded to the row tile (128, or 64 for ``tile_m=64`` configs), K to 128, N to the
tile width; A's 1x128 scales transposed (MN-major, one contiguous row of M scales per K step, as
DeepGEMM's TMA-aligned layout); B's scales in the layout of the config's promotion
(``promotion.b_scale_operand``: expanded to one per output column for ``per_column``, so any tile width
reads its own scales; the compact 128x128 blocks, transposed, for ``tile_scalar``). Pads copy only when a
shape is not aligned; DeepSeek's shapes are. Every op takes an optional ``config`` (tile sweeps, tests);
otherwise the heuristic (``config.py``) picks one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import num_sms_of_device
from pallas_kernels.fp8_gemm import config as tile_config
from pallas_kernels.fp8_gemm import schedule
from pallas_kernels.fp8_gemm.interpreter_differences import b_operand, check_interpretable, pads_b
from pallas_kernels.fp8_gemm.mosaic_gpu import BLOCK_K, KernelConfig, grouped_fp8_gemm, round_up
from pallas_kernels.fp8_gemm.promotion import b_scale_operand
from pallas_kernels.interpret import INTERPRET_SMS, gpu_interpret_params

TILE_M = 128  # the heuristic's row tile


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads)


def _tile_m(config: KernelConfig | None) -> int:
    return TILE_M if config is None else config.tile_m


def run(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *, sb_kind: str = "blocks",
        make_tiles: Callable[[int, int, int], tuple[jax.Array, int]], row_tiles: int, out_dtype,
        interpret: bool, k_grouped: bool = False, config: KernelConfig | None = None) -> jax.Array:
    """Pads and lays out the operands, picks the tiles, launches.

    Args:
      a: [m, k] e4m3; sa: [m, ceil(k / 128)] float32.
      b: [g, n, k] e4m3.
      sb: [g, ceil(n / 128), ceil(k / 128)] float32 128x128 block scales (``sb_kind="blocks"``), or
        [g, ceil(k / 128), n] float32 per output column (``sb_kind="columns"``).
      make_tiles: (m_pad, k_steps, tile_m) -> ([tiles, 7] int32 schedule, rows of the output).
      row_tiles: the expected number of non-empty row tiles of 128, for the tile heuristic.
      config: a kernel config to use instead of the heuristic's (sweeps, tests); its k_grouped and
        for_interpreter are set from this call.
    Returns:
      [out_rows, n] out_dtype.
    """
    m, k = a.shape
    n = b.shape[1]
    k_pad = round_up(k, BLOCK_K)
    num_sms = INTERPRET_SMS if interpret else num_sms_of_device()
    if config is None:
        config, n_pad = tile_config.select_config(row_tiles, n, jnp.dtype(out_dtype).itemsize, num_sms=num_sms,
                                                  k_grouped=k_grouped, for_interpreter=interpret)
    else:  # the caller's tiles; the execution mode is this call's
        config = dataclasses.replace(config, k_grouped=k_grouped, for_interpreter=interpret)
        n_pad = round_up(n, config.n_multiple)
    check_interpretable(config)
    m_pad = round_up(max(m, 1), config.tile_m)
    a = _pad(_pad(a, 0, m_pad), 1, k_pad)
    sa_t = _pad(sa, 0, m_pad).T  # [k_pad / 128, m_pad]
    b = b_operand(_pad(_pad(b, 2, k_pad), 1, n_pad if pads_b(config) else n), config)
    sb = b_scale_operand(sb, sb_kind, n, n_pad, config.promotion)
    tiles, out_rows = make_tiles(m_pad, k_pad // BLOCK_K, config.tile_m)
    out = grouped_fp8_gemm(a, sa_t, b, sb, tiles, out_rows=out_rows, out_dtype=out_dtype, config=config, n=n_pad,
                           interpret=gpu_interpret_params() if interpret else None)
    return out[:, :n]


def fp8_gemm_nt(a, sa, b, sb, *, out_dtype, interpret: bool, config: KernelConfig | None = None) -> jax.Array:
    """[m, k] x [n, k] (1x128, 128x128 scales) -> [m, n]."""
    m = a.shape[0]

    def tiles(m_pad, k_steps, tile_m):
        return schedule.dense_tiles(m, m_pad, tile_m, k_steps), m_pad

    out = run(a, sa, b[None], sb[None], make_tiles=tiles, row_tiles=-(-m // TILE_M), out_dtype=out_dtype,
              interpret=interpret, config=config)
    return out[:m]


def m_grouped_contiguous(a, sa, b, sb, group_starts, group_ends, *, out_dtype, interpret: bool,
                         config: KernelConfig | None = None) -> jax.Array:
    """Rows [group_starts[g], group_ends[g]) use b[g]; other rows are left unwritten. -> [m, n]."""
    m, num_groups = a.shape[0], b.shape[0]

    def tiles(m_pad, k_steps, tile_m):
        return schedule.contiguous_tiles(group_starts, group_ends, m_pad, tile_m, k_steps), m_pad

    out = run(a, sa, b, sb, make_tiles=tiles, row_tiles=-(-m // TILE_M) + num_groups - 1, out_dtype=out_dtype,
              interpret=interpret, config=config)
    return out[:m]


def m_grouped_masked(a, sa, b, sb, masked_m, expected_m: int, *, out_dtype, interpret: bool,
                     config: KernelConfig | None = None) -> jax.Array:
    """[g, m_max, k] x [g, n, k] -> [g, m_max, n]; rows past masked_m[g] are left unwritten."""
    num_groups, m_max, k = a.shape
    n = b.shape[1]
    m_max_pad = round_up(max(m_max, 1), _tile_m(config))
    rows = ((0, 0), (0, m_max_pad - m_max), (0, 0))
    a_flat, sa_flat = jnp.pad(a, rows).reshape(-1, k), jnp.pad(sa, rows).reshape(num_groups * m_max_pad, -1)

    def tiles(m_pad, k_steps, tile_m):
        return schedule.masked_tiles(masked_m, m_max_pad, tile_m, k_steps), m_pad

    out = run(a_flat, sa_flat, b, sb, make_tiles=tiles, row_tiles=num_groups * max(-(-expected_m // TILE_M), 1),
              out_dtype=out_dtype, interpret=interpret, config=config)
    return out.reshape(num_groups, m_max_pad, n)[:, :m_max]


def k_grouped_contiguous(a, sa, b, sb, group_ks, *, interpret: bool, config: KernelConfig | None = None) -> jax.Array:
    """[m, K] x [n, K] with 1x128 scales on both, K split into groups -> [g, m, n] float32 (empty groups 0)."""
    m, n, num_groups = a.shape[0], b.shape[0], group_ks.shape[0]
    m_pad = round_up(max(m, 1), _tile_m(config))

    def tiles(m_pad_, k_steps, tile_m):
        return schedule.k_grouped_tiles(group_ks, m, m_pad_, tile_m, BLOCK_K), num_groups * m_pad_

    out = run(a, sa, b[None], sb.T[None], sb_kind="columns", make_tiles=tiles,
              row_tiles=num_groups * -(-m // TILE_M), out_dtype=jnp.float32, interpret=interpret, k_grouped=True,
              config=config)
    out = out.reshape(num_groups, m_pad, n)[:, :m]
    return jnp.where((group_ks > 0)[:, None, None], out, 0.0)
