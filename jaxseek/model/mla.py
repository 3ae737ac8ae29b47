"""Multi-head latent attention (DeepSeek-V2/V3) in its two execution forms.

Training ("expanded") form: the compressed KV latent ``c_kv`` is up-projected per head to keys
``[k_nope | k_rope]`` and values, then ordinary causal attention runs per head.

Absorbed form: the key up-projection is folded into the query (``q_nope @ W_uk`` gives a query in
latent space) and the value up-projection into the output (``o_latent @ W_uv``), so attention runs
directly over the cached ``[c_kv | k_rope]`` rows: one 576-wide "key" per token (512 latent + 64 RoPE
for DeepSeek-V3) whose first 512 columns are also the "value". This is the layout MLA decoding kernels
(FlashMLA, ``pallas_kernels/mla_decode``) consume; both forms compute the same function.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.fp8_gemm.vjp import FP8Recipe
from jaxseek.config import MLAConfig
from jaxseek.model import rope
from jaxseek.model.layers import linear, rms_norm
from sharding.rules import constrain

HEADS = ("batch", "length", "heads", None)  # per-head activations

AttentionForm = Literal["expanded", "absorbed"]


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """[batch, q_len], [batch, k_len] int32 -> [batch, 1, q_len, k_len] bool, True where attending is allowed."""
    return (q_positions[:, :, None] >= k_positions[:, None, :])[:, None]


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """[batch, heads, q, k] f32 logits -> probabilities, f32; masked entries get exactly 0."""
    scores = jnp.where(mask, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def expanded_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Per-head attention.

    Args:
      q: [batch, q_len, heads, qk_dim]; k: [batch, k_len, heads, qk_dim]; v: [batch, k_len, heads, v_dim].
      mask: [batch, 1, q_len, k_len] bool.
    Returns:
      [batch, q_len, heads, v_dim] in v's dtype; softmax in float32.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = _masked_softmax(scores, mask)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def latent_attention(q_latent: jax.Array, kv_latent: jax.Array, mask: jax.Array, scale: float,
                     value_dim: int) -> jax.Array:
    """Multi-query attention over the compressed cache, the contract of MLA decoding kernels.

    Args:
      q_latent: [batch, q_len, heads, latent_dim] queries already absorbed into latent space (576 for V3).
      kv_latent: [batch, k_len, latent_dim] one shared row per token, ``[c_kv | k_rope]``.
      mask: [batch, 1, q_len, k_len] bool.
      value_dim: the first ``value_dim`` columns of ``kv_latent`` are the values (kv_lora_rank, 512 for V3).
    Returns:
      [batch, q_len, heads, value_dim] in kv_latent's dtype; softmax in float32.
    """
    scores = jnp.einsum("bqhd,bkd->bhqk", q_latent, kv_latent, preferred_element_type=jnp.float32) * scale
    probs = _masked_softmax(scores, mask)
    return jnp.einsum("bhqk,bkd->bqhd", probs.astype(kv_latent.dtype), kv_latent[..., :value_dim])


class MultiHeadLatentAttention(nnx.Module):
    """MLA with DeepSeek's RoPE (adjacent pairs) and, when ``max_seq_len`` exceeds the config's
    ``original_seq_len``, YaRN frequencies and softmax scale (``jaxseek.model.rope``)."""

    def __init__(self, hidden_size: int, config: MLAConfig, *, eps: float, dtype, init_std: float, rngs: nnx.Rngs,
                 fp8: FP8Recipe | None = None, max_seq_len: int | None = None):
        self.config = config
        max_seq_len = config.original_seq_len if max_seq_len is None else max_seq_len
        self.rope_frequencies = tuple(float(f) for f in rope.rope_frequencies(config, max_seq_len))  # static
        self.softmax_scale = rope.softmax_scale(config, max_seq_len)
        h = config.num_heads
        dense = dict(dtype=dtype, init_std=init_std, fp8=fp8, rngs=rngs)
        if config.q_lora_rank > 0:
            self.wq_a = linear(hidden_size, config.q_lora_rank, axes=("embed", "q_lora"), **dense)
            self.q_norm = rms_norm(config.q_lora_rank, eps=eps, dtype=dtype, rngs=rngs)
            self.wq_b = linear(config.q_lora_rank, h * config.qk_head_dim, axes=("q_lora", "heads"), **dense)
        else:
            self.wq = linear(hidden_size, h * config.qk_head_dim, axes=("embed", "heads"), **dense)
        self.wkv_a = linear(hidden_size, config.latent_dim, axes=("embed", "kv_latent"), **dense)
        self.kv_norm = rms_norm(config.kv_lora_rank, eps=eps, dtype=dtype, rngs=rngs)
        self.wkv_b = linear(config.kv_lora_rank, h * (config.qk_nope_head_dim + config.v_head_dim),
                            axes=("kv_lora", "heads"), **dense)
        self.wo = linear(h * config.v_head_dim, hidden_size, axes=("heads", "embed"), **dense)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return rope.apply_rope(x, positions, self.rope_frequencies)

    def project_queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, seq, hidden], [batch, seq] -> (q_nope [b, s, heads, nope], q_rope [b, s, heads, rope] rotated)."""
        c = self.config
        q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank > 0 else self.wq(x)
        q = constrain(q.reshape(q.shape[:2] + (c.num_heads, c.qk_head_dim)), HEADS)  # [b, s, h, nope + rope]
        q_nope, q_rope = jnp.split(q, [c.qk_nope_head_dim], axis=-1)
        return q_nope, self._rope(q_rope, positions)

    def project_latent(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """[batch, seq, hidden], [batch, seq] -> [batch, seq, kv_lora_rank + rope]: the rows an MLA cache stores,
        the normalised latent ``c_kv`` followed by the rotated shared RoPE key."""
        c = self.config
        kv = self.wkv_a(x)  # [b, s, kv_lora + rope]
        c_kv, k_rope = jnp.split(kv, [c.kv_lora_rank], axis=-1)
        k_rope = self._rope(k_rope[:, :, None, :], positions)[:, :, 0, :]
        return jnp.concatenate([self.kv_norm(c_kv), k_rope], axis=-1)

    def _up_projections(self) -> tuple[jax.Array, jax.Array]:
        """(W_uk [kv_lora, heads, nope], W_uv [kv_lora, heads, v]) views of ``wkv_b``."""
        c = self.config
        w = self.wkv_b.kernel[...].reshape(c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        return w[..., :c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]

    def absorb_queries(self, q_nope: jax.Array, q_rope: jax.Array) -> jax.Array:
        """[b, s, h, nope], [b, s, h, rope] -> [b, s, h, kv_lora + rope]: queries in the cache's latent space."""
        w_uk, _ = self._up_projections()
        q_latent = jnp.einsum("bshn,chn->bshc", q_nope, w_uk.astype(q_nope.dtype))
        return jnp.concatenate([q_latent, q_rope], axis=-1)

    def output_from_latent(self, o_latent: jax.Array) -> jax.Array:
        """[b, s, h, kv_lora] attention output in latent space -> [b, s, hidden]."""
        _, w_uv = self._up_projections()
        o = jnp.einsum("bshc,chv->bshv", o_latent, w_uv.astype(o_latent.dtype))
        return self.wo(o.reshape(o.shape[:2] + (-1,)))

    def __call__(self, x: jax.Array, positions: jax.Array, *, form: AttentionForm = "expanded") -> jax.Array:
        """Causal self-attention over the sequence.

        Args:
          x: [batch, seq, hidden]; positions: [batch, seq] int32.
          form: "expanded" (training: per-head K/V) or "absorbed" (attention over the 576-wide latent).
        Returns:
          [batch, seq, hidden].
        """
        c = self.config
        q_nope, q_rope = self.project_queries(x, positions)
        kv_latent = self.project_latent(x, positions)  # [b, s, kv_lora + rope]
        mask = causal_mask(positions, positions)
        if form == "absorbed":
            o_latent = latent_attention(self.absorb_queries(q_nope, q_rope), kv_latent, mask,
                                        self.softmax_scale, c.kv_lora_rank)
            return self.output_from_latent(o_latent)
        if form != "expanded":
            raise ValueError(f"form: expected 'expanded' or 'absorbed', got {form!r}")
        c_kv, k_rope = jnp.split(kv_latent, [c.kv_lora_rank], axis=-1)
        kv = constrain(self.wkv_b(c_kv).reshape(c_kv.shape[:2] + (c.num_heads, -1)), HEADS)  # [b, s, h, nope + v]
        k_nope, v = jnp.split(kv, [c.qk_nope_head_dim], axis=-1)
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + (c.qk_rope_head_dim,))
        q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [b, s, h, nope + rope]
        k = jnp.concatenate([k_nope, k_rope], axis=-1)
        o = expanded_attention(q, k, v, mask, self.softmax_scale)  # [b, s, h, v]
        return self.wo(o.reshape(o.shape[:2] + (-1,)))
