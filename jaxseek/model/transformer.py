"""The DeepSeek-V3-style decoder: embed -> blocks -> final norm -> head, plus multi-token prediction.

Each ``Block`` is a pure function of (its parameters, hidden states, positions) once split with
``nnx.split``, so a pipeline schedule can cut ``Transformer.blocks`` into stages. The first
``first_k_dense`` blocks use a dense SwiGLU FFN, the rest the MoE layer.

Multi-token prediction (DeepSeek-V3 §2.2): MTP module k (1..D) combines the previous depth's hidden
state at position i with the embedding of token i+k, ``h' = W [norm(h); norm(emb(t_{i+k}))]``, runs one
block, and predicts token i+k+1 through the shared output head. The embedding and head are shared
with the main model.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseek.config import ModelConfig
from jaxseek.model.layers import SwiGLU, linear, rms_norm
from jaxseek.model.mla import MultiHeadLatentAttention
from jaxseek.model.moe import MoE, MoEStats


class ModelOutput(NamedTuple):
    logits: jax.Array  # [batch, seq, vocab] float32, next-token logits
    mtp_logits: jax.Array  # [mtp_depth, batch, seq, vocab] float32; depth k predicts token i+k+1
    expert_load: jax.Array  # [moe_layers, experts] int32, main-model MoE layers then MTP MoE layers
    balance_loss: jax.Array  # [] float32, sum of the layers' sequence-wise balance losses


def _dtype(config: ModelConfig):
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


class Block(nnx.Module):
    """Pre-norm residual block: h + MLA(norm(h)), then h + FFN(norm(h)) with FFN dense or MoE."""

    def __init__(self, config: ModelConfig, *, use_moe: bool, rngs: nnx.Rngs):
        dtype, std, eps = _dtype(config), config.init_std, config.rms_norm_eps
        self.attn_norm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadLatentAttention(config.hidden_size, config.mla, eps=eps, dtype=dtype, init_std=std,
                                             rngs=rngs, fp8=config.fp8)
        self.ffn_norm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.ffn = (MoE(config.hidden_size, config.moe, dtype=dtype, init_std=std, rngs=rngs, fp8=config.fp8)
                    if use_moe else SwiGLU(config.hidden_size, config.intermediate_size, dtype=dtype, init_std=std,
                                           rngs=rngs, fp8=config.fp8))

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def __call__(self, h: jax.Array, positions: jax.Array, *, form: Literal["expanded", "absorbed"] = "expanded"
                 ) -> tuple[jax.Array, MoEStats | None]:
        """[batch, seq, hidden], [batch, seq] int32 -> ([batch, seq, hidden], MoEStats or None for dense)."""
        return self.feed_forward(h + self.attn(self.attn_norm(h), positions, form=form))

    def feed_forward(self, h: jax.Array) -> tuple[jax.Array, MoEStats | None]:
        """The block's second half: h + FFN(norm(h)), with the MoE statistics (None for a dense FFN)."""
        if self.is_moe:
            ffn_out, stats = self.ffn(self.ffn_norm(h))
        else:
            ffn_out, stats = self.ffn(self.ffn_norm(h)), None
        return h + ffn_out, stats


class MTPModule(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype, eps = _dtype(config), config.rms_norm_eps
        self.hidden_norm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.embed_norm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.proj = linear(2 * config.hidden_size, config.hidden_size, dtype=dtype, init_std=config.init_std, rngs=rngs,
                           fp8=config.fp8)
        self.block = Block(config, use_moe=config.num_moe_layers > 0, rngs=rngs)

    def __call__(self, h_prev: jax.Array, next_embeddings: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, MoEStats | None]:
        """[b, s, d] previous depth's states, [b, s, d] embeddings of tokens i+k -> ([b, s, d], stats)."""
        h = self.proj(jnp.concatenate([self.hidden_norm(h_prev), self.embed_norm(next_embeddings)], axis=-1))
        return self.block(h, positions)


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = _dtype(config)
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.blocks = nnx.List([Block(config, use_moe=i >= config.first_k_dense, rngs=rngs)
                                for i in range(config.num_layers)])
        self.final_norm = rms_norm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.head = linear(config.hidden_size, config.vocab_size, dtype=dtype, init_std=config.init_std, rngs=rngs)
        self.mtp = nnx.List([MTPModule(config, rngs=rngs) for _ in range(config.mtp_depth)])

    def trunk(self, tokens: jax.Array, positions: jax.Array, *, form: Literal["expanded", "absorbed"] = "expanded"
              ) -> tuple[jax.Array, list[MoEStats]]:
        """[batch, seq] int32 tokens and positions -> ([batch, seq, hidden] last block's output, MoE stats)."""
        h = self.embed(tokens)
        stats = []
        for block in self.blocks:
            h, block_stats = block(h, positions, form=form)
            if block_stats is not None:
                stats.append(block_stats)
        return h, stats

    def logits(self, h: jax.Array) -> jax.Array:
        """[batch, seq, hidden] -> [batch, seq, vocab] float32 through the final norm and the shared head."""
        return self.head(self.final_norm(h)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, *, with_mtp: bool = True,
                 form: Literal["expanded", "absorbed"] = "expanded") -> ModelOutput:
        """Runs the model over a batch.

        Args:
          tokens: [batch, seq + D] int32 with D = mtp_depth when ``with_mtp`` (the last D columns only feed
            the MTP modules' look-ahead embeddings), else [batch, seq].
          form: the MLA execution form (both give the same result).
        Returns:
          ModelOutput for the first ``seq`` positions.
        """
        depth = self.config.mtp_depth if with_mtp else 0
        seq = tokens.shape[1] - depth
        if seq <= 0:
            raise ValueError(f"tokens: need more than mtp_depth={depth} columns, got shape {tokens.shape}")
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (tokens.shape[0], seq))
        h, stats = self.trunk(tokens[:, :seq], positions, form=form)
        logits = self.logits(h)
        mtp_logits = []
        for k, module in enumerate(self.mtp[:depth], start=1):
            h, block_stats = module(h, self.embed(tokens[:, k:seq + k]), positions)
            mtp_logits.append(self.logits(h))
            if block_stats is not None:
                stats.append(block_stats)
        experts = self.config.moe.num_routed_experts
        return ModelOutput(
            logits=logits,
            mtp_logits=jnp.stack(mtp_logits) if mtp_logits else jnp.zeros((0,) + logits.shape, jnp.float32),
            expert_load=(jnp.stack([s.tokens_per_expert for s in stats]) if stats
                         else jnp.zeros((0, experts), jnp.int32)),
            balance_loss=sum((s.balance_loss for s in stats), jnp.zeros((), jnp.float32)),
        )

    def moe_layers(self) -> list[MoE]:
        """The MoE layers in the order of ``ModelOutput.expert_load`` rows."""
        blocks = list(self.blocks) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if b.is_moe]

    def update_expert_bias(self, expert_load: jax.Array) -> None:
        """Applies the auxiliary-loss-free bias update to every MoE layer from [moe_layers, experts] loads."""
        for layer, load in zip(self.moe_layers(), expert_load):
            layer.update_bias(load)
