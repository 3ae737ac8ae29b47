"""Fine-grained FP8 (e4m3) casts, as DeepSeek-V3 trains and DeepGEMM / DeepEP compute them.

* per-token (1x128): each row's every 128 consecutive K values share one scale; activations.
* per-block (128x128): each 128x128 block of a weight shares one scale.
* per-channel (128x1): each column's every 128 consecutive rows share one scale; the activation side
  of a weight-gradient GEMM, whose contraction runs over tokens.

scale = amax / 448 with amax floored at 1e-4 (DeepGEMM's and DeepEP's rule), so that
``value = fp8 * scale``. ``ue8m0=True`` rounds each scale up to a power of two (the UE8M0 format
Blackwell's block-scaled MMA and FlashMLA's FP8 cache use); rounding up keeps |x / scale| <= 448.
Shapes that are not multiples of the group are padded with zeros for the amax only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
AMAX_FLOOR = 1e-4
GROUP = 128


class FP8Array(NamedTuple):
    """A quantised array and its scales: ``(data, scale)``, usable wherever a ``(fp8, scales)`` pair is."""

    data: jax.Array  # e4m3fn
    scale: jax.Array  # float32, one per group


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _scale_from_amax(amax: jax.Array, ue8m0: bool) -> jax.Array:
    scale = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
    if ue8m0:
        scale = jnp.ldexp(jnp.ones_like(scale), jnp.ceil(jnp.log2(scale)).astype(jnp.int32))  # exact powers of two
    return scale.astype(jnp.float32)


def _pad_to(x: jax.Array, multiples: tuple[int, int]) -> jax.Array:
    pads = [(0, ceil_div(d, m) * m - d) for d, m in zip(x.shape, multiples)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _check_2d(x: jax.Array, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {x.shape}")


def per_token_cast_to_fp8(x: jax.Array, group: int = GROUP, *, ue8m0: bool = False) -> FP8Array:
    """1x``group`` scaling: [m, k] -> (e4m3 [m, k], float32 [m, ceil(k / group)])."""
    _check_2d(x, "x")
    m, k = x.shape
    xp = _pad_to(x.astype(jnp.float32), (1, group)).reshape(m, -1, group)  # [m, k/g, g]
    scale = _scale_from_amax(jnp.abs(xp).max(-1), ue8m0)  # [m, k/g]
    data = (xp / scale[..., None]).reshape(m, -1)[:, :k].astype(FP8_DTYPE)
    return FP8Array(data, scale)


def per_block_cast_to_fp8(w: jax.Array, block: int = GROUP, *, ue8m0: bool = False) -> FP8Array:
    """``block``x``block`` scaling: [n, k] -> (e4m3 [n, k], float32 [ceil(n / block), ceil(k / block)])."""
    _check_2d(w, "w")
    n, k = w.shape
    wp = _pad_to(w.astype(jnp.float32), (block, block))
    nb, kb = wp.shape[0] // block, wp.shape[1] // block
    blocks = wp.reshape(nb, block, kb, block)  # [n/b, b, k/b, b]
    scale = _scale_from_amax(jnp.abs(blocks).max(axis=(1, 3)), ue8m0)  # [n/b, k/b]
    data = (blocks / scale[:, None, :, None]).reshape(nb * block, kb * block)[:n, :k].astype(FP8_DTYPE)
    return FP8Array(data, scale)


def per_channel_cast_to_fp8(x: jax.Array, group: int = GROUP, *, ue8m0: bool = False) -> FP8Array:
    """``group``x1 scaling (groups run down the rows): [m, k] -> (e4m3 [m, k], float32 [ceil(m / group), k])."""
    _check_2d(x, "x")
    transposed = per_token_cast_to_fp8(x.T, group, ue8m0=ue8m0)
    return FP8Array(transposed.data.T, transposed.scale.T)


def dequantize_per_token(q: FP8Array, group: int = GROUP) -> jax.Array:
    """(e4m3 [m, k], [m, ceil(k / group)]) -> float32 [m, k]."""
    k = q.data.shape[1]
    return q.data.astype(jnp.float32) * jnp.repeat(q.scale, group, axis=1)[:, :k]


def dequantize_per_block(q: FP8Array, block: int = GROUP) -> jax.Array:
    """(e4m3 [..., n, k], [..., ceil(n / block), ceil(k / block)]) -> float32 [..., n, k]."""
    n, k = q.data.shape[-2:]
    scale = jnp.repeat(jnp.repeat(q.scale, block, axis=-2), block, axis=-1)[..., :n, :k]
    return q.data.astype(jnp.float32) * scale


def dequantize_per_channel(q: FP8Array, group: int = GROUP) -> jax.Array:
    """(e4m3 [m, k], [ceil(m / group), k]) -> float32 [m, k]."""
    m = q.data.shape[0]
    return q.data.astype(jnp.float32) * jnp.repeat(q.scale, group, axis=0)[:m]
