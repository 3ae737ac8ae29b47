"""MLA decoding over a paged KV cache (FlashMLA's API, JAX style: it returns the outputs).

The cache holds one row per token of width d (576 for DeepSeek: 512 compressed latent + 64 RoPE key);
V is its first ``head_dim_v`` (512) columns. ``q`` carries the absorbed queries (``MultiHeadLatentAttention
.absorb_queries``). Pages hold 64 tokens; ``block_table[b, j]`` is the page of sequence b's tokens
64 j .. 64 j + 63.

An ``FP8KVCache`` (``fp8_cache.py``: e4m3 latent with power-of-two scales per 128 values, bf16 RoPE, 656
bytes a token) may stand in for the cache: the XLA path dequantises it, the kernel dequantises each page
in shared memory.

``implementation``: ``"xla"`` (gather pages, f32 softmax), ``"mosaic_gpu"`` (the split-KV Pallas kernel,
Hopper) or ``"interpret"`` (that kernel in the CPU interpreter). None runs ``xla``: the kernel matches the
reference in the interpreter and lowers for CUDA, but this version of it has not been validated or
measured on a GPU yet, so it is never picked without being asked for by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import check_implementation, dispatch, known_value
from pallas_kernels.mla_decode import reference
from pallas_kernels.mla_decode.fp8_cache import FP8KVCache, dequantize_kv_cache, unpack_flashmla
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE, MLAMetadata

Q_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _validate(q, k_cache, block_table, cache_seqlens, head_dim_v):
    if q.ndim != 4:
        raise ValueError(f"q: expected [batch, s_q, h_q, d], got shape {q.shape}")
    batch, _, h_q, d = q.shape
    if jnp.dtype(q.dtype) not in [jnp.dtype(t) for t in Q_DTYPES]:
        raise ValueError(f"q: expected bfloat16, float16 or float32, got {q.dtype}")
    if len(k_cache.shape) != 4 or k_cache.shape[1] != BLOCK_SIZE:
        raise ValueError(f"k_cache: expected [num_blocks, {BLOCK_SIZE}, h_kv, d], got shape {k_cache.shape}")
    h_kv = k_cache.shape[2]
    if isinstance(k_cache, FP8KVCache):
        k_cache.check()
    if k_cache.shape[3] != d:
        raise ValueError(f"q: head dim {d} does not match k_cache's {k_cache.shape[3]}")
    if isinstance(k_cache, FP8KVCache):
        if k_cache.head_dim_v != head_dim_v:
            raise ValueError(f"head_dim_v: {head_dim_v} does not match the FP8 cache's {k_cache.head_dim_v}")
    elif k_cache.dtype != q.dtype:
        raise ValueError(f"k_cache: dtype {k_cache.dtype} does not match q's {q.dtype}")
    if not 0 < head_dim_v <= d:
        raise ValueError(f"head_dim_v: must be in (0, {d}], got {head_dim_v}")
    if h_q % h_kv:
        raise ValueError(f"q: h_q={h_q} must be a multiple of the cache's h_kv={h_kv}")
    if block_table.dtype != jnp.int32 or block_table.ndim != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected int32 [{batch}, max_blocks], got {block_table.dtype} "
                         f"{block_table.shape}")
    if cache_seqlens.dtype != jnp.int32 or cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens: expected int32 [{batch}], got {cache_seqlens.dtype} {cache_seqlens.shape}")
    lengths = known_value(cache_seqlens)
    if lengths is not None and lengths.size and lengths.max() > block_table.shape[1] * BLOCK_SIZE:
        raise ValueError(f"block_table: {block_table.shape[1]} pages hold {block_table.shape[1] * BLOCK_SIZE} "
                         f"tokens, fewer than the longest sequence ({lengths.max()})")


def flash_mla_with_kvcache(q: jax.Array, k_cache: jax.Array | FP8KVCache, block_table: jax.Array,
                           cache_seqlens: jax.Array, head_dim_v: int = 512, metadata: MLAMetadata | None = None,
                           softmax_scale: float | None = None, causal: bool = False, *,
                           is_fp8_kvcache: bool = False, implementation: str | None = None
                           ) -> tuple[jax.Array, jax.Array]:
    """Decoding attention of ``s_q`` new tokens per sequence over its cached tokens.

    Args:
      q: [batch, s_q, h_q, d] bf16/fp16 (float32 for the xla path).
      k_cache: [num_blocks, 64, h_kv, d] same dtype; or an ``FP8KVCache`` (656 bytes a token, dequantised by
        the kernel); or, with ``is_fp8_kvcache``, FlashMLA's packed uint8 [num_blocks, 64, h_kv, 656] rows,
        which are first unpacked into an ``FP8KVCache`` (a copy of the cache: keep ``FP8KVCache`` instead).
      block_table: [batch, max_blocks] int32 pages of each sequence.
      cache_seqlens: [batch] int32 tokens in each sequence's cache (the s_q new ones included).
      head_dim_v: V width (the first columns of K).
      metadata: ``get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)``, computed once per decode step
        and passed to every layer; the split-KV kernel's schedule (the XLA path needs none).
      softmax_scale: default d ** -0.5.
      causal: query token i sees cached tokens ``t <= len - s_q + i`` (forced off when s_q == 1).
    Returns:
      (out [batch, s_q, h_q, head_dim_v] in q's dtype, lse [batch, h_q, s_q] float32). A query that sees
      no token gets out 0 and lse +inf.
    """
    if is_fp8_kvcache and not isinstance(k_cache, FP8KVCache):
        k_cache = unpack_flashmla(k_cache, q.shape[-1], head_dim_v)
    _validate(q, k_cache, block_table, cache_seqlens, head_dim_v)
    check_implementation(implementation)
    s_q, d = q.shape[1], q.shape[3]
    causal = causal and s_q > 1
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)

    def xla():
        cache, table = k_cache, block_table
        if isinstance(k_cache, FP8KVCache):  # dequantise only the pages the batch refers to
            pages = jnp.clip(block_table, 0, k_cache.shape[0] - 1).reshape(-1)
            cache = dequantize_kv_cache(jax.tree.map(lambda x: x[pages], k_cache), q.dtype)
            table = jnp.arange(pages.size, dtype=jnp.int32).reshape(block_table.shape)
        return reference.mla_decode_reference(q, cache, table, cache_seqlens, head_dim_v=head_dim_v,
                                              softmax_scale=scale, causal=causal)

    def kernel(interpret: bool):
        from pallas_kernels.mla_decode.kernel_ops import flash_mla

        return flash_mla(q, k_cache, block_table, cache_seqlens, metadata, head_dim_v=head_dim_v,
                         softmax_scale=scale, causal=causal, interpret=interpret)

    return dispatch(implementation or "xla", xla, kernel)
