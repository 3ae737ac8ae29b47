"""FP8 training: linear layers whose forward, input-gradient and weight-gradient GEMMs all run in FP8.

DeepSeek-V3's recipe (§3.3), through the public ops of ``api.py``:
  forward  y  = x @ W^T        x per-token 1x128, W per-block 128x128       (``fp8_gemm_nt``)
  dgrad    dx = dy @ W         dy per-token 1x128, W^T per-block 128x128    (``fp8_gemm_nt``)
  wgrad    dW = dy^T @ x       K = tokens: dy^T and x^T both 1x128 along tokens
                                                                           (``k_grouped_fp8_gemm_nt_contiguous``)
The grouped (MoE expert) version uses the m-grouped contiguous op for forward and dgrad and the
k-grouped op for wgrad, with each expert's tokens padded to whole 128-token blocks. Master weights stay
in their own dtype (fp32); every quantisation happens inside the op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_gemm import api
from pallas_kernels.fp8_gemm.mosaic_gpu import BLOCK_K, round_up
from pallas_kernels.quant import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8


def _out_dtype(dtype):
    return jnp.float32 if dtype == jnp.float32 else jnp.bfloat16


def _token_major_pair(x: jax.Array):
    """[tokens, features] (tokens a multiple of 128) -> ([features, tokens] e4m3, [features, tokens / 128] f32):
    the K-major operand of a GEMM that contracts over tokens, 1x128 scales along tokens."""
    q = per_channel_cast_to_fp8(x)
    return q.data.T, q.scale.T


def _block_scaled_transpose(w: jax.Array):
    """[n, k] -> W^T quantised per 128x128 block: ([k, n] e4m3, [ceil(k / 128), ceil(n / 128)])."""
    return per_block_cast_to_fp8(w.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_linear(x: jax.Array, w: jax.Array, implementation: str | None = None) -> jax.Array:
    """y = x @ w^T with FP8 GEMMs in forward and backward.

    Args:
      x: [..., k] float32 or bfloat16 activations.
      w: [n, k] weight (the master copy, any float dtype).
    Returns:
      [..., n] in x's dtype (float32 stays float32, everything else bfloat16).
    """
    return _fp8_linear_fwd(x, w, implementation)[0]


def _fp8_linear_fwd(x, w, implementation):
    k = x.shape[-1]
    y = api.fp8_gemm_nt(per_token_cast_to_fp8(x.reshape(-1, k)), per_block_cast_to_fp8(w),
                        out_dtype=_out_dtype(x.dtype), implementation=implementation)
    return y.reshape(x.shape[:-1] + (w.shape[0],)).astype(x.dtype), (x, w)


def _fp8_linear_bwd(implementation, residuals, dy):
    x, w = residuals
    k, n = x.shape[-1], w.shape[0]
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dx = api.fp8_gemm_nt(per_token_cast_to_fp8(dy2), _block_scaled_transpose(w), out_dtype=_out_dtype(x.dtype),
                         implementation=implementation)
    tokens = round_up(max(x2.shape[0], 1), BLOCK_K)  # zero rows pad the token axis to whole 128-blocks
    pad = ((0, tokens - x2.shape[0]), (0, 0))
    dw = api.k_grouped_fp8_gemm_nt_contiguous(_token_major_pair(jnp.pad(dy2, pad)), _token_major_pair(jnp.pad(x2, pad)),
                                              jnp.array([tokens], jnp.int32), implementation=implementation)[0]
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def _padded_token_layout(group_sizes: jax.Array, rows: int):
    """Where each row goes when every group is padded to whole 128-token blocks.

    Returns:
      (destination [rows] int32, out of range for rows past the groups; padded_sizes [g] int32;
       padded_rows: the static size of the padded buffer).
    """
    num_groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    padded_sizes = (sizes + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
    padded_rows = round_up(rows + num_groups * (BLOCK_K - 1), BLOCK_K)
    row = jnp.arange(rows, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), row, side="right"), num_groups - 1)
    destination = jnp.where(row < sizes.sum(), padded_starts[group] + row - starts[group], padded_rows)
    return destination, padded_sizes, padded_rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str | None = None
                       ) -> jax.Array:
    """Expert matmul over rows sorted by expert, FP8 in forward and backward.

    Args:
      x: [rows, k] activations, group g's rows contiguous and in order.
      w: [g, n, k] expert weights.
      group_sizes: [g] int32 rows per group (rows past their sum give zeros).
    Returns:
      [rows, n] in x's dtype.
    """
    return _fp8_grouped_fwd(x, w, group_sizes, implementation)[0]


def _group_offsets(group_sizes):
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes.astype(jnp.int32))])


def _fp8_grouped_fwd(x, w, group_sizes, implementation):
    qw = jax.vmap(per_block_cast_to_fp8)(w)
    y = api.m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(x), qw, group_offsets=_group_offsets(group_sizes),
                                             out_dtype=_out_dtype(x.dtype), implementation=implementation)
    return y.astype(x.dtype), (x, w, group_sizes)


def _fp8_grouped_bwd(implementation, residuals, dy):
    x, w, group_sizes = residuals
    qwt = jax.vmap(_block_scaled_transpose)(w)  # [g, k, n]
    dx = api.m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(dy), qwt, group_offsets=_group_offsets(group_sizes),
                                              out_dtype=_out_dtype(x.dtype), implementation=implementation)
    destination, padded_sizes, padded_rows = _padded_token_layout(group_sizes, x.shape[0])

    def padded(v):  # [rows, d] -> [padded_rows, d], each group starting on a 128-row boundary
        return jnp.zeros((padded_rows, v.shape[1]), v.dtype).at[destination].set(v, mode="drop")

    dw = api.k_grouped_fp8_gemm_nt_contiguous(_token_major_pair(padded(dy)), _token_major_pair(padded(x)),
                                              padded_sizes, implementation=implementation)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


fp8_grouped_linear.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)
