"""The XLA implementation of paged MLA decoding: gather each sequence's pages, float32 softmax.

Conventions (FlashMLA's): V is the first ``head_dim_v`` columns of K; query token i of s_q (causal)
sees keys ``t <= len - s_q + i``; a query with no visible key gives out = 0 and lse = +inf. Cache slots
past ``cache_seqlens`` and unused pages may hold anything (the tests fill them with NaN): they are
masked out of the scores and zeroed out of the values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp



def visible_keys(cache_seqlens: jax.Array, s_q: int, k_len: int, causal: bool) -> jax.Array:
    """[batch] lengths -> [batch, s_q, k_len] bool, which cached tokens each query token sees."""
    t = jnp.arange(k_len)[None, None, :]
    lengths = cache_seqlens[:, None, None]
    visible = t < lengths
    if causal:
        visible &= t <= lengths - s_q + jnp.arange(s_q)[None, :, None]
    return visible


def mla_decode_reference(q, k_cache, block_table, cache_seqlens, *, head_dim_v: int, softmax_scale: float,
                         causal: bool) -> tuple[jax.Array, jax.Array]:
    """Multi-query attention over a paged cache.

    Args:
      q: [batch, s_q, h_q, d]; k_cache: [num_blocks, 64, h_kv, d]; block_table: [batch, max_blocks] int32;
      cache_seqlens: [batch] int32.
    Returns:
      (out [batch, s_q, h_q, head_dim_v] in q's dtype, lse [batch, h_q, s_q] float32).
    """
    batch, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    pages = jnp.clip(block_table, 0, k_cache.shape[0] - 1)
    kv = k_cache[pages].reshape(batch, -1, h_kv, d).astype(jnp.float32)  # [b, t, h_kv, d]
    visible = visible_keys(cache_seqlens, s_q, kv.shape[1], causal)  # [b, s_q, t]
    kv = jnp.where(visible.any(1)[:, :, None, None], kv, 0.0)  # never multiply by unwritten slots
    qg = q.astype(jnp.float32).reshape(batch, s_q, h_kv, h_q // h_kv, d)
    scores = jnp.einsum("bshgd,bthd->bhgst", qg, kv, precision=jax.lax.Precision.HIGHEST) * softmax_scale
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [b, h_kv, g, s_q]; -inf where nothing is visible
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("bhgst,bthd->bshgd", probs, kv[..., :head_dim_v], precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(batch, s_q, h_q, head_dim_v).astype(q.dtype)
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf).reshape(batch, h_q, s_q)
    return out, lse
