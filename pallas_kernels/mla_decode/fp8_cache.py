"""FlashMLA's FP8 KV-cache format: 656 bytes per token for DeepSeek's 576-wide MLA rows.

Per token: the ``dv`` (512) latent values as e4m3, then ``dv / 128`` (4) float32 scales, one per 128
values (powers of two, UE8M0-compatible, as FlashMLA's quantiser), then the ``d - dv`` (64) RoPE values
unquantised in bfloat16: 512 + 16 + 128 = 656 bytes, 57% of the 1152-byte bf16 row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant import GROUP, per_token_cast_to_fp8


def fp8_row_bytes(d: int, dv: int) -> int:
    return dv + 4 * (dv // GROUP) + 2 * (d - dv)


def quantize_kv_cache(kv: jax.Array, dv: int) -> jax.Array:
    """[..., d] bf16 rows -> [..., fp8_row_bytes(d, dv)] uint8 packed rows (``dv`` a multiple of 128)."""
    if dv % GROUP:
        raise ValueError(f"head_dim_v: the FP8 cache scales groups of {GROUP}, got {dv}")
    lead, d = kv.shape[:-1], kv.shape[-1]
    rows = kv.reshape(-1, d)
    q = per_token_cast_to_fp8(rows[:, :dv].astype(jnp.float32), ue8m0=True)
    as_bytes = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(rows.shape[0], -1)  # noqa: E731
    packed = jnp.concatenate([as_bytes(q.data), as_bytes(q.scale), as_bytes(rows[:, dv:].astype(jnp.bfloat16))], -1)
    return packed.reshape(lead + (packed.shape[-1],))


def dequantize_kv_cache(packed: jax.Array, d: int, dv: int, dtype=jnp.bfloat16) -> jax.Array:
    """[..., fp8_row_bytes(d, dv)] uint8 -> [..., d] ``dtype``."""
    if packed.shape[-1] != fp8_row_bytes(d, dv):
        raise ValueError(f"k_cache: FP8 rows of d={d}, dv={dv} take {fp8_row_bytes(d, dv)} bytes, "
                         f"got {packed.shape[-1]}")
    lead = packed.shape[:-1]
    rows = packed.reshape(-1, packed.shape[-1])
    groups = dv // GROUP
    values = jax.lax.bitcast_convert_type(rows[:, :dv], jnp.float8_e4m3fn).astype(jnp.float32)
    scales = jax.lax.bitcast_convert_type(rows[:, dv:dv + 4 * groups].reshape(-1, groups, 4), jnp.float32)
    rope = jax.lax.bitcast_convert_type(rows[:, dv + 4 * groups:].reshape(-1, d - dv, 2), jnp.bfloat16)
    latent = (values.reshape(-1, groups, GROUP) * scales[..., None]).reshape(-1, dv)
    return jnp.concatenate([latent, rope.astype(jnp.float32)], -1).astype(dtype).reshape(lead + (d,))
