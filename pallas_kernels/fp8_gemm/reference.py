"""The XLA implementation of every FP8 GEMM: exact e4m3 products, promoted per 128 of K.

Each 128-wide K block is multiplied in float32 (products of e4m3 values are exact in f32) and added to
the float32 accumulator scaled by its A-row and B-column scales: the same two-level accumulation as the
kernel, so the two agree to float32 rounding. This is the path used on CPUs and the tests' oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_gemm.mosaic_gpu import BLOCK_K, round_up

HIGHEST = jax.lax.Precision.HIGHEST


def block_scales_per_column(sb: jax.Array, n: int) -> jax.Array:
    """[..., ceil(n / 128), kb] 128x128-block scales -> [..., kb, n], the scale of each output column."""
    return jnp.swapaxes(jnp.repeat(sb, BLOCK_K, axis=-2)[..., :n, :], -1, -2)


def _k_blocks(x: jax.Array) -> jax.Array:
    """[rows, k] e4m3 -> [kb, rows, 128] float32, zero-padded along k."""
    rows, k = x.shape
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, round_up(k, BLOCK_K) - k)))
    return jnp.swapaxes(x.reshape(rows, -1, BLOCK_K), 0, 1)


def promoted_matmul(a: jax.Array, sa: jax.Array, b: jax.Array, sb_cols: jax.Array) -> jax.Array:
    """sum over K blocks of (a_blk @ b_blk^T) * sa[:, blk, None] * sb_cols[blk, None, :].

    Args:
      a: [m, k] e4m3; sa: [m, kb] float32; b: [n, k] e4m3; sb_cols: [kb, n] float32.
    Returns:
      [m, n] float32.
    """
    a_blocks, b_blocks = _k_blocks(a), _k_blocks(b)  # [kb, m, 128], [kb, n, 128]

    def add_block(i, acc):
        partial = jnp.dot(a_blocks[i], b_blocks[i].T, precision=HIGHEST)  # [m, n]
        return acc + partial * sa[:, i, None] * sb_cols[i][None, :]

    return jax.lax.fori_loop(0, a_blocks.shape[0], add_block, jnp.zeros((a.shape[0], b.shape[0]), jnp.float32))


def fp8_gemm_nt(a, sa, b, sb, out_dtype) -> jax.Array:
    """[m, k] x [n, k] with 1x128 / 128x128 scales -> [m, n] out_dtype."""
    return promoted_matmul(a, sa, b, block_scales_per_column(sb, b.shape[0])).astype(out_dtype)


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, row_groups, out_dtype) -> jax.Array:
    """Row r uses group ``row_groups[r]`` of b ([g, n, k]); rows with -1 give zeros. -> [m, n]."""
    cols = block_scales_per_column(sb, b.shape[1])  # [g, kb, n]

    def add_group(g, out):
        return jnp.where((row_groups == g)[:, None], promoted_matmul(a, sa, b[g], cols[g]), out)

    out = jax.lax.fori_loop(0, b.shape[0], add_group, jnp.zeros((a.shape[0], b.shape[1]), jnp.float32))
    return out.astype(out_dtype)


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, out_dtype) -> jax.Array:
    """[g, m_max, k] x [g, n, k] -> [g, m_max, n]; rows at or past masked_m[g] are zero here."""
    out = jax.vmap(promoted_matmul)(a, sa, b, block_scales_per_column(sb, b.shape[1]))
    rows = jnp.arange(a.shape[1])[None, :, None]
    return jnp.where(rows < masked_m[:, None, None], out, 0.0).astype(out_dtype)


def k_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, group_ks) -> jax.Array:
    """Groups of K (tokens): out[g] = a[:, K_g] @ b[:, K_g]^T with 1x128 scales on both sides.

    Args:
      a: [m, k] e4m3; sa: [m, k / 128]; b: [n, k] e4m3; sb: [n, k / 128]; group_ks: [g] int32, multiples of 128.
    Returns:
      [g, m, n] float32.
    """
    a_blocks, b_blocks = _k_blocks(a), _k_blocks(b)
    ends = jnp.cumsum(group_ks.astype(jnp.int32) // BLOCK_K)  # K blocks of group g: [ends[g-1], ends[g])
    num_groups = group_ks.shape[0]

    def add_block(i, out):
        group = jnp.searchsorted(ends, i, side="right")  # == num_groups past the last group: dropped
        partial = jnp.dot(a_blocks[i], b_blocks[i].T, precision=HIGHEST) * sa[:, i, None] * sb[:, i][None, :]
        return out.at[group].add(partial, mode="drop")

    init = jnp.zeros((num_groups, a.shape[0], b.shape[0]), jnp.float32)
    return jax.lax.fori_loop(0, a_blocks.shape[0], add_block, init)
