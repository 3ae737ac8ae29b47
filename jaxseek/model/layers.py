"""Small building blocks shared by attention, experts and MTP: linear, RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def linear(in_features: int, out_features: int, *, dtype, init_std: float, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection whose fp32 master weight is cast to ``dtype`` for the matmul."""
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(init_std), rngs=rngs)


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

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, init_std: float, rngs: nnx.Rngs):
        self.gate_proj = linear(hidden_size, intermediate_size, dtype=dtype, init_std=init_std, rngs=rngs)
        self.up_proj = linear(hidden_size, intermediate_size, dtype=dtype, init_std=init_std, rngs=rngs)
        self.down_proj = linear(intermediate_size, hidden_size, dtype=dtype, init_std=init_std, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., hidden] -> [..., hidden]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
