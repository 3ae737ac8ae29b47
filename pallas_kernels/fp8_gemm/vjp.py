"""FP8 training: linear layers whose forward, input-gradient and weight-gradient GEMMs run in FP8.

DeepSeek-V3's recipe (§3.3), through the public ops of ``api.py``:
  forward  y  = x @ W^T        x per-token 1x128, W per-block 128x128       (``fp8_gemm_nt``)
  dgrad    dx = dy @ W         dy per-token 1x128, W^T per-block 128x128    (``fp8_gemm_nt``)
  wgrad    dW = dy^T @ x       K = tokens: dy^T and x^T both 1x128 along tokens
                                                                           (``k_grouped_fp8_gemm_nt_contiguous``)
The grouped (MoE expert) version uses the m-grouped contiguous op for forward and dgrad and the
k-grouped op for wgrad, with each expert's tokens padded to whole 128-token blocks. Master weights stay
in their own dtype (fp32); every quantisation happens inside the op.

An ``FP8Recipe`` picks which of the three GEMMs run in FP8; the others run in the activations' dtype
(``benchmarks/fp8_training.py`` ablates them to find where an FP8 model's loss gap comes from).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_gemm import api
from pallas_kernels.fp8_gemm.mosaic_gpu import BLOCK_K, round_up
from pallas_kernels.quant import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8


FP8_GEMMS = ("forward", "dgrad", "wgrad")


class FP8Recipe(NamedTuple):
    """Which GEMMs of a linear layer run in FP8; the others run in the activations' dtype (f32 accumulation)."""

    forward: bool = True
    dgrad: bool = True
    wgrad: bool = True

    @classmethod
    def parse(cls, gemms: str) -> "FP8Recipe":
        """"forward,dgrad,wgrad" (any non-empty subset, comma-separated) -> FP8Recipe."""
        names = [name.strip() for name in gemms.split(",") if name.strip()]
        unknown = sorted(set(names) - set(FP8_GEMMS))
        if not names or unknown:
            raise ValueError(f"fp8_gemms: expected a comma-separated subset of {FP8_GEMMS}, got {gemms!r}")
        return cls(*(name in names for name in FP8_GEMMS))


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


def _high_precision_linear(x, w):
    """x @ w^T in x's dtype with f32 accumulation: the GEMMs a recipe leaves out of FP8."""
    return jnp.matmul(x, w.astype(x.dtype).T, preferred_element_type=jnp.float32).astype(x.dtype)


def _high_precision_grads(fn, primals, dy):
    """The cotangents of ``fn`` at ``primals`` for ``dy``, by jax's own VJP (for the GEMMs a recipe keeps out
    of FP8; under jit XLA drops the one the recipe quantises)."""
    return jax.vjp(fn, *primals)[1](dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_linear(x: jax.Array, w: jax.Array, implementation: str | None = None,
               recipe: FP8Recipe = FP8Recipe()) -> jax.Array:
    """y = x @ w^T with FP8 GEMMs in forward and backward (those ``recipe`` names).

    Args:
      x: [..., k] float32 or bfloat16 activations.
      w: [n, k] weight (the master copy, any float dtype).
    Returns:
      [..., n] in x's dtype (float32 stays float32, everything else bfloat16).
    """
    return _fp8_linear_fwd(x, w, implementation, recipe)[0]


def _fp8_linear_fwd(x, w, implementation, recipe):
    k = x.shape[-1]
    if not recipe.forward:
        return _high_precision_linear(x, w), (x, w)
    y = api.fp8_gemm_nt(per_token_cast_to_fp8(x.reshape(-1, k)), per_block_cast_to_fp8(w),
                        out_dtype=_out_dtype(x.dtype), implementation=implementation)
    return y.reshape(x.shape[:-1] + (w.shape[0],)).astype(x.dtype), (x, w)


def _fp8_linear_bwd(implementation, recipe, residuals, dy):
    x, w = residuals
    k, n = x.shape[-1], w.shape[0]
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dx, dw = None, None
    if not (recipe.dgrad and recipe.wgrad):
        dx, dw = _high_precision_grads(_high_precision_linear, (x, w), dy)
    if recipe.dgrad:
        dx = api.fp8_gemm_nt(per_token_cast_to_fp8(dy2), _block_scaled_transpose(w), out_dtype=_out_dtype(x.dtype),
                             implementation=implementation).reshape(x.shape)
    if recipe.wgrad:
        tokens = round_up(max(x2.shape[0], 1), BLOCK_K)  # zero rows pad the token axis to whole 128-blocks
        pad = ((0, tokens - x2.shape[0]), (0, 0))
        dw = api.k_grouped_fp8_gemm_nt_contiguous(_token_major_pair(jnp.pad(dy2, pad)),
                                                  _token_major_pair(jnp.pad(x2, pad)),
                                                  jnp.array([tokens], jnp.int32), implementation=implementation)[0]
    return dx.astype(x.dtype), dw.astype(w.dtype)


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


def _high_precision_grouped(x, w, group_sizes):
    """The grouped linear in x's dtype, f32 accumulation: rows past the groups give zeros."""
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2).astype(x.dtype), group_sizes.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fp8_grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str | None = None,
                       recipe: FP8Recipe = FP8Recipe()) -> jax.Array:
    """Expert matmul over rows sorted by expert, FP8 in forward and backward (those ``recipe`` names).

    Args:
      x: [rows, k] activations, group g's rows contiguous and in order.
      w: [g, n, k] expert weights.
      group_sizes: [g] int32 rows per group (rows past their sum give zeros).
    Returns:
      [rows, n] in x's dtype.
    """
    return _fp8_grouped_fwd(x, w, group_sizes, implementation, recipe)[0]


def _group_offsets(group_sizes):
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes.astype(jnp.int32))])


def _fp8_grouped_fwd(x, w, group_sizes, implementation, recipe):
    if not recipe.forward:
        return _high_precision_grouped(x, w, group_sizes), (x, w, group_sizes)
    qw = jax.vmap(per_block_cast_to_fp8)(w)
    y = api.m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(x), qw, group_offsets=_group_offsets(group_sizes),
                                             out_dtype=_out_dtype(x.dtype), implementation=implementation)
    return y.astype(x.dtype), (x, w, group_sizes)


def _fp8_grouped_bwd(implementation, recipe, residuals, dy):
    x, w, group_sizes = residuals
    dx, dw = None, None
    if not (recipe.dgrad and recipe.wgrad):
        dx, dw = _high_precision_grads(lambda x, w: _high_precision_grouped(x, w, group_sizes), (x, w), dy)
    if recipe.dgrad:
        qwt = jax.vmap(_block_scaled_transpose)(w)  # [g, k, n]
        dx = api.m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(dy), qwt,
                                                  group_offsets=_group_offsets(group_sizes),
                                                  out_dtype=_out_dtype(x.dtype), implementation=implementation)
    if recipe.wgrad:
        destination, padded_sizes, padded_rows = _padded_token_layout(group_sizes, x.shape[0])

        def padded(v):  # [rows, d] -> [padded_rows, d], each group starting on a 128-row boundary
            return jnp.zeros((padded_rows, v.shape[1]), v.dtype).at[destination].set(v, mode="drop")

        dw = api.k_grouped_fp8_gemm_nt_contiguous(_token_major_pair(padded(dy)), _token_major_pair(padded(x)),
                                                  padded_sizes, implementation=implementation)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


fp8_grouped_linear.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)
