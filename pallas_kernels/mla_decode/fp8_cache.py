"""FlashMLA's FP8 KV-cache: 656 bytes per token for DeepSeek's 576-wide MLA rows.

Per token: the ``dv`` (512) latent values as e4m3, ``dv / 128`` (4) float32 scales, one per 128 values
(powers of two, UE8M0-compatible, as FlashMLA's quantiser), and the ``d - dv`` (64) RoPE values
unquantised in bfloat16: 512 + 16 + 128 = 656 bytes, 57% of the 1152-byte bf16 row.

``FP8KVCache`` holds the three parts as three arrays, each in the layout the decoding kernel's TMA
copies a page of in one piece (a page's scales are group-major, so each group's 64 scales are one
contiguous row in shared memory). FlashMLA's packed byte rows (values | scales | RoPE per token) are
``pack_flashmla`` / ``unpack_flashmla``: the RoPE bytes start at byte 528 of a row, which is no
multiple of a 128-byte RoPE block, so a page cannot be fetched from that layout with block copies.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.mla_decode.metadata import BLOCK_SIZE
from pallas_kernels.quant import FP8_DTYPE, GROUP, per_token_cast_to_fp8


class FP8KVCache(NamedTuple):
    """A paged MLA cache in FP8: ``value = values * scales`` for the latent, RoPE kept in bf16."""

    values: jax.Array  # [num_blocks, 64, h_kv, dv] float8_e4m3fn
    rope: jax.Array  # [num_blocks, 64, h_kv, d - dv] bfloat16
    scales: jax.Array  # [num_blocks, h_kv, dv // 128, 64] float32, powers of two, group-major per page

    @property
    def head_dim(self) -> int:
        return self.values.shape[-1] + self.rope.shape[-1]

    @property
    def head_dim_v(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[num_blocks, 64, h_kv, d], the shape of the bf16 cache it stands for."""
        return self.values.shape[:3] + (self.head_dim,)

    def check(self) -> None:
        """Raises ValueError when the three parts do not describe one cache."""
        values, rope, scales = self.values, self.rope, self.scales
        if values.ndim != 4 or values.shape[1] != BLOCK_SIZE or values.dtype != FP8_DTYPE:
            raise ValueError(f"k_cache.values: expected [num_blocks, {BLOCK_SIZE}, h_kv, dv] float8_e4m3fn, "
                             f"got {values.dtype} {values.shape}")
        if rope.shape[:3] != values.shape[:3] or rope.dtype != jnp.bfloat16:
            raise ValueError(f"k_cache.rope: expected {values.shape[:3]} + (d - dv,) bfloat16, got {rope.dtype} "
                             f"{rope.shape}")
        blocks, _, h_kv, dv = values.shape
        expected = (blocks, h_kv, dv // GROUP, BLOCK_SIZE)
        if dv % GROUP or scales.shape != expected or scales.dtype != jnp.float32:
            raise ValueError(f"k_cache.scales: expected float32 {expected} (dv a multiple of {GROUP}), got "
                             f"{scales.dtype} {scales.shape}")


def fp8_row_bytes(d: int, dv: int) -> int:
    return dv + 4 * (dv // GROUP) + 2 * (d - dv)


def quantize_rows(rows: jax.Array, dv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[..., d] rows -> (values [..., dv] e4m3, scales [..., dv / 128] float32, rope [..., d - dv] bf16)."""
    if dv % GROUP or not 0 < dv < rows.shape[-1]:
        raise ValueError(f"head_dim_v: the FP8 cache scales groups of {GROUP} latent values and keeps the "
                         f"RoPE columns after them: need a multiple of {GROUP} below d={rows.shape[-1]}, got {dv}")
    lead = rows.shape[:-1]
    q = per_token_cast_to_fp8(rows[..., :dv].reshape(-1, dv).astype(jnp.float32), ue8m0=True)
    return q.data.reshape(lead + (dv,)), q.scale.reshape(lead + (dv // GROUP,)), rows[..., dv:].astype(jnp.bfloat16)


def quantize_kv_cache(kv: jax.Array, dv: int) -> FP8KVCache:
    """[num_blocks, 64, h_kv, d] rows -> FP8KVCache (``dv`` a multiple of 128)."""
    if kv.ndim != 4 or kv.shape[1] != BLOCK_SIZE:
        raise ValueError(f"kv: expected [num_blocks, {BLOCK_SIZE}, h_kv, d], got {kv.shape}")
    values, scales, rope = quantize_rows(kv, dv)
    return FP8KVCache(values, rope, scales.transpose(0, 2, 3, 1))


def dequantize_kv_cache(cache: FP8KVCache, dtype=jnp.bfloat16) -> jax.Array:
    """FP8KVCache -> [num_blocks, 64, h_kv, d] ``dtype``."""
    blocks, _, h_kv, dv = cache.values.shape
    per_token = cache.scales.transpose(0, 3, 1, 2)  # [num_blocks, 64, h_kv, groups]
    latent = cache.values.astype(jnp.float32).reshape(blocks, BLOCK_SIZE, h_kv, dv // GROUP, GROUP)
    latent = (latent * per_token[..., None]).reshape(blocks, BLOCK_SIZE, h_kv, dv)
    return jnp.concatenate([latent, cache.rope.astype(jnp.float32)], -1).astype(dtype)


def pack_flashmla(cache: FP8KVCache) -> jax.Array:
    """FP8KVCache -> [num_blocks, 64, h_kv, 656] uint8 in FlashMLA's byte order (values, scales, RoPE)."""
    as_bytes = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(x.shape[:3] + (-1,))  # noqa: E731
    per_token = cache.scales.transpose(0, 3, 1, 2)
    return jnp.concatenate([as_bytes(cache.values), as_bytes(per_token), as_bytes(cache.rope)], -1)


def unpack_flashmla(packed: jax.Array, d: int, dv: int) -> FP8KVCache:
    """[num_blocks, 64, h_kv, fp8_row_bytes(d, dv)] uint8 in FlashMLA's byte order -> FP8KVCache."""
    if packed.dtype != jnp.uint8 or packed.ndim != 4 or packed.shape[-1] != fp8_row_bytes(d, dv):
        raise ValueError(f"k_cache: FlashMLA FP8 rows of d={d}, head_dim_v={dv} are uint8 [num_blocks, "
                         f"{BLOCK_SIZE}, h_kv, {fp8_row_bytes(d, dv)}], got {packed.dtype} {packed.shape}")
    groups, lead = dv // GROUP, packed.shape[:3]
    values = jax.lax.bitcast_convert_type(packed[..., :dv], FP8_DTYPE)
    scales = jax.lax.bitcast_convert_type(packed[..., dv:dv + 4 * groups].reshape(lead + (groups, 4)), jnp.float32)
    rope = jax.lax.bitcast_convert_type(packed[..., dv + 4 * groups:].reshape(lead + (d - dv, 2)), jnp.bfloat16)
    return FP8KVCache(values, rope, scales.transpose(0, 2, 3, 1))
