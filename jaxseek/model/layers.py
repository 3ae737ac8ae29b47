"""Small building blocks shared by attention, experts and MTP: dense projections (optionally FP8), RMSNorm,
RoPE, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.fp8_gemm.vjp import fp8_linear


class Dense(nnx.Module):
    """A bias-free projection ``x @ kernel`` with an fp32 master ``kernel`` [in, out].

    The matmul runs in ``dtype`` (float32 or bfloat16), or, with ``fp8``, as DeepSeek-V3's FP8 GEMMs
    (1x128 activation and 128x128 weight scaling in forward, dgrad and wgrad; ``pallas_kernels.fp8_gemm``).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype, init_std: float, fp8: bool, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.normal(init_std)(rngs.params(), (in_features, out_features),
                                                                  jnp.float32))
        self.dtype = dtype
        self.fp8 = fp8

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in ``dtype``."""
        x = x.astype(self.dtype)
        if self.fp8:
            return fp8_linear(x, self.kernel[...].T)
        return x @ self.kernel[...].astype(self.dtype)


def linear(in_features: int, out_features: int, *, dtype, init_std: float, rngs: nnx.Rngs, fp8: bool = False) -> Dense:
    return Dense(in_features, out_features, dtype=dtype, init_std=init_std, fp8=fp8, rngs=rngs)


def rms_norm(features: int, *, eps: float, dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split convention.

    Args:
      x: [batch, seq, ..., dim] the rotated part of queries or keys (dim even).
      positions: [batch, seq] int32, absolute token positions.
      theta: the RoPE base.
    Returns:
      [batch, seq, ..., dim] same dtype as ``x``; the rotation is computed in float32.
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [dim/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, dim/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, init_std: float, rngs: nnx.Rngs,
                 fp8: bool = False):
        dense = dict(dtype=dtype, init_std=init_std, fp8=fp8, rngs=rngs)
        self.gate_proj = linear(hidden_size, intermediate_size, **dense)
        self.up_proj = linear(hidden_size, intermediate_size, **dense)
        self.down_proj = linear(intermediate_size, hidden_size, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., hidden] -> [..., hidden]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
