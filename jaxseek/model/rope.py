"""Rotary position embedding as DeepSeek-V3 applies it: adjacent pairs, with YaRN context extension.

RoPE treats dimensions (2i, 2i+1) of the rotated part as one complex number and multiplies it by
``exp(1j * position * freq_i)`` with ``freq_i = theta^(-2i / dim)``. YaRN (DeepSeek's reference, used when
the model's context exceeds the one the frequencies were trained for) interpolates the low frequencies:

    freq_i <- freq_i / factor * (1 - smooth_i) + freq_i * smooth_i,
    smooth_i = 1 - clip((i - low) / (high - low), 0, 1),

where [low, high] is the range of dimensions that complete between ``beta_fast`` and ``beta_slow``
rotations over the original context; and it sharpens attention by multiplying the softmax scale by
``(0.1 * mscale * ln(factor) + 1)^2``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxseek.config import MLAConfig


def _correction_dim(rotations: float, dim: int, theta: float, original_seq_len: int) -> float:
    """The (fractional) pair index whose frequency completes ``rotations`` turns over the original context."""
    return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_frequencies(config: MLAConfig, max_seq_len: int) -> np.ndarray:
    """[qk_rope_head_dim / 2] float64 angular frequency of each rotated pair, YaRN-scaled when active."""
    dim, theta = config.qk_rope_head_dim, config.rope_theta
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if not config.uses_yarn(max_seq_len):
        return freqs
    low = max(math.floor(_correction_dim(config.beta_fast, dim, theta, config.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(config.beta_slow, dim, theta, config.original_seq_len)), dim - 1)
    span = high - low if high > low else 0.001  # the reference's guard against an empty range
    ramp = np.clip((np.arange(dim // 2) - low) / span, 0, 1)
    smooth = 1 - ramp  # 1: keep the frequency (fast dims), 0: interpolate by the factor (slow dims)
    return freqs / config.rope_factor * (1 - smooth) + freqs * smooth


def softmax_scale(config: MLAConfig, max_seq_len: int) -> float:
    """qk_head_dim^-0.5, times YaRN's mscale^2 when active."""
    scale = config.qk_head_dim ** -0.5
    if config.uses_yarn(max_seq_len):
        mscale = 0.1 * config.mscale * math.log(config.rope_factor) + 1.0
        scale *= mscale * mscale
    return scale


def apply_rope(x: jax.Array, positions: jax.Array, frequencies: np.ndarray) -> jax.Array:
    """Rotates adjacent pairs (2i, 2i+1) of the last dimension by ``position * frequencies[i]``.

    Args:
      x: [batch, seq, ..., dim] the rotated part of queries or keys (dim even).
      positions: [batch, seq] int32, absolute token positions.
      frequencies: [dim / 2] from ``rope_frequencies``.
    Returns:
      [batch, seq, ..., dim] same dtype as ``x``; the rotation is computed in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(frequencies, jnp.float32)  # [b, s, dim/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
