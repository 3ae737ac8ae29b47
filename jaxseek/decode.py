"""The model's forward pass over a paged KV cache: prefill and decode through absorbed MLA.

Per layer (a scan over each block stack): the new tokens' latent rows ``[c_kv | k_rope]`` are written into their pages, the absorbed
queries attend over the sequence's pages with ``flash_mla_with_kvcache`` (``implementation``: its XLA path
by default, the split-KV Mosaic GPU kernel with "mosaic_gpu", or that kernel in the CPU interpreter with
"interpret"), and the latent output is projected back through W_uv and W_o. The same function serves
prefill (s new tokens, causal) and decode (1 new token per sequence); the split-KV schedule is computed
once per call and shared by every layer.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxseek.kv_cache import KVPages, write_rows
from jaxseek.model.transformer import Transformer
from pallas_kernels.mla_decode.api import flash_mla_with_kvcache
from pallas_kernels.mla_decode.metadata import get_mla_metadata
from sharding.rules import activation_sharding, get_rules


def paged_forward(model: Transformer, tokens: jax.Array, start: jax.Array, new_tokens: jax.Array, pages: KVPages,
                  block_table: jax.Array, *, implementation: str | None = None) -> tuple[jax.Array, KVPages]:
    """Runs new tokens through the model, reading and extending the cache.

    Args:
      tokens: [batch, s] int32 new tokens (rows past ``new_tokens`` are padding).
      start: [batch] int32 tokens already cached per sequence (the position of tokens[:, 0]).
      new_tokens: [batch] int32 valid new tokens per sequence (0..s).
      pages: the cache ([num_layers, ...]: the dense blocks' layers, then the MoE blocks');
      block_table: [batch, max_blocks] int32, pages reserved for start + new_tokens.
    Returns:
      (logits [batch, s, vocab] float32, updated pages).
    """
    config = model.config
    batch, s = tokens.shape
    positions = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]  # [batch, s]
    valid = jnp.arange(s)[None] < new_tokens[:, None]
    # Causal rows see t <= len - s + i: with len = start + s, row i sees exactly the cache and the new
    # tokens up to itself. Padding rows (i >= new_tokens) write nothing and their outputs are ignored.
    attend_len = (start + s).astype(jnp.int32)
    metadata = get_mla_metadata(attend_len, s * config.mla.num_heads, 1)  # the device's SMs, any implementation

    def block_step(h, block, layer_pages):
        """One block over the cache: [batch, s, hidden], one layer's pages -> (next h, updated pages)."""
        attn = block.attn
        with jax.named_scope("attention"):  # profile scopes (jaxseek.trace_analysis.TRACKED_SCOPES)
            x = block.attn_norm(h)
            q = attn.absorb_queries(*attn.project_queries(x, positions))  # [batch, s, heads, latent]
            layer_pages = write_rows(layer_pages, attn.project_latent(x, positions), block_table, positions, valid)
            out, _ = flash_mla_with_kvcache(q.astype(pages.query_dtype), layer_pages, block_table, attend_len,
                                            head_dim_v=config.mla.kv_lora_rank, metadata=metadata,
                                            softmax_scale=attn.softmax_scale, causal=True,
                                            implementation=implementation)
            h = h + attn.output_from_latent(out.astype(x.dtype))
        h, _ = block.feed_forward(h)
        return h, layer_pages

    scan_blocks = nnx.scan(block_step, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    h, updated, first = model.embed(tokens), [], 0
    for stack in (model.dense_blocks, model.moe_blocks):
        if stack is not None:
            count = stack.num_layers
            h, stack_pages = scan_blocks(h, stack.layers, jax.tree.map(lambda x: x[first:first + count], pages.data))
            updated.append(stack_pages)
            first += count
    return model.logits(h), KVPages(jax.tree.map(lambda *parts: jnp.concatenate(parts), *updated))


@functools.partial(jax.jit, static_argnames=("graphdef", "implementation", "mesh"), donate_argnames=("pages",))
def paged_forward_jit(graphdef: nnx.GraphDef, state, tokens, start, new_tokens, pages, block_table,
                      implementation=None, mesh: Mesh | None = None):
    """``paged_forward`` of ``nnx.merge(graphdef, state)``, jit-compiled once per token-block shape. With a
    ``mesh`` whose ``ep`` axis is > 1 the MoE layers run expert-parallel over it (DeepEP's normal mode for
    prefill, its low-latency mode for one-token decode steps)."""
    with activation_sharding(mesh, get_rules("ep")) if mesh is not None else contextlib.nullcontext():
        return paged_forward(nnx.merge(graphdef, state), tokens, start, new_tokens, pages, block_table,
                             implementation=implementation)
