"""The Mosaic GPU path of ``flash_mla_with_kvcache``: layout, the split-KV kernel, the combine."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.interpret import INTERPRET_SMS, check_interpreter_threads, gpu_interpret_params
from pallas_kernels.mla_decode.combine import combine_splits
from pallas_kernels.mla_decode.fp8_cache import FP8KVCache
from pallas_kernels.mla_decode.metadata import MLAMetadata, get_mla_metadata
from pallas_kernels.mla_decode.mosaic_gpu import NUM_COMPUTE_WGS, ROWS, DecodeConfig, check_supported, partial_attention
from pallas_kernels.mla_decode.pages import DensePages, FP8Pages


def flash_mla(q, k_cache, block_table, cache_seqlens, metadata: MLAMetadata | None, *, head_dim_v: int,
              softmax_scale: float, causal: bool, interpret: bool, kernel_options: dict | None = None):
    """[batch, s_q, h_q, d] queries over a [num_blocks, 64, 1, d] cache (or an ``FP8KVCache``) ->
    (out [batch, s_q, h_q, dv], lse [batch, h_q, s_q] float32). ``kernel_options``: ``DecodeConfig`` fields
    to override (the GPU variants a sweep compares, e.g. ``{"approx_math": True}``)."""
    batch, s_q, h_q, d = q.shape
    fp8 = isinstance(k_cache, FP8KVCache)
    check_supported(q.dtype, d, head_dim_v, k_cache.shape[2], fp8=fp8)
    if interpret:
        check_interpreter_threads(NUM_COMPUTE_WGS + 1)
    if metadata is None:
        metadata = get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    rows = s_q * h_q
    rows_pad = -(-rows // ROWS) * ROWS
    units = metadata.num_sm_parts * (rows_pad // ROWS)  # (SM part, row tile) pairs: one CTA each on a GPU
    num_ctas = min(units, INTERPRET_SMS) if interpret else units  # the interpreter simulates a few SMs
    q_rows = jnp.pad(q.reshape(batch, rows, d), ((0, 0), (0, rows_pad - rows), (0, 0)))
    pages = FP8Pages(d=d, dv=head_dim_v) if fp8 else DensePages(d=d)
    config = DecodeConfig(d=d, dv=head_dim_v, s_q=s_q, heads=h_q, softmax_scale=softmax_scale, causal=causal,
                          num_sms=num_ctas, pages=pages, for_interpreter=interpret,
                          **(kernel_options or {}))
    out, lse = partial_attention(q_rows, k_cache, block_table, cache_seqlens, metadata.work, metadata.part_offsets,
                                 config=config, num_slots=metadata.num_slots,
                                 interpret=gpu_interpret_params() if interpret else None)
    out, lse = combine_splits(out[:, :rows], lse[:, :rows], metadata, batch)  # f32 partials
    out = out.reshape(batch, s_q, h_q, head_dim_v).astype(q.dtype)
    return out, jnp.swapaxes(lse.reshape(batch, s_q, h_q), 1, 2)
