"""The DeepSeek-V3-style decoder: embed -> dense blocks -> MoE blocks -> final norm -> head, plus MTP.

Blocks of one kind live in one ``BlockStack`` (a leading layer axis, scanned by ``stack.scan_layers``).
The model is cut into three stage functions a pipeline can place on different ranks:
- ``pre_stage``: the embedding and the dense blocks;
- ``moe_blocks`` (or any ``moe_blocks.slice``): the MoE blocks;
- ``post_stage``: the final norm, the output head and the multi-token-prediction modules
  (``jaxseek.model.loss.head_loss`` adds the losses).

Multi-token prediction (DeepSeek-V3 §2.2, the released layout): MTP module k (1..D) combines the previous
depth's hidden state at position i with the embedding of token i+k,
``h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)])``, runs one block, and predicts token i+k+1 through its
own final norm and the shared output head. The embedding and head are shared with the main model.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseek.config import ModelConfig
from jaxseek.model.layers import SwiGLU, embedding, linear, rms_norm
from jaxseek.model.mla import MultiHeadLatentAttention
from jaxseek.model.moe import MoE, MoEStats
from jaxseek.model.stack import BlockStack, layer_count, scan_layers, slice_layers, stacked
from sharding.rules import constrain

HIDDEN = ("batch", "length", "embed")  # the logical axes of the residual stream

Form = Literal["expanded", "absorbed"]


class ModelOutput(NamedTuple):
    logits: jax.Array  # [batch, seq, vocab] float32, next-token logits
    mtp_logits: jax.Array  # [mtp_depth, batch, seq, vocab] float32; depth k predicts token i+k+1
    expert_load: jax.Array  # [moe_layers, experts] int32, main-model MoE layers then MTP MoE layers
    balance_loss: jax.Array  # [] float32, sum of the layers' sequence-wise balance losses


class HeadOutput(NamedTuple):
    """What the post-stage computes from the last block's hidden states."""

    logits: jax.Array  # [batch, seq, vocab] float32
    mtp_logits: jax.Array  # [mtp_depth, batch, seq, vocab] float32
    mtp_stats: MoEStats | None  # per MTP module ([mtp_depth, ...]), None without MoE MTP blocks


def compute_dtype(config: ModelConfig):
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


class Block(nnx.Module):
    """Pre-norm residual block: h + MLA(norm(h)), then h + FFN(norm(h)) with FFN dense or MoE."""

    def __init__(self, config: ModelConfig, *, use_moe: bool, rngs: nnx.Rngs):
        dtype, std, eps = compute_dtype(config), config.init_std, config.rms_norm_eps
        self.attn_norm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadLatentAttention(config.hidden_size, config.mla, eps=eps, dtype=dtype, init_std=std,
                                             rngs=rngs, fp8=config.fp8_recipe, max_seq_len=config.max_seq_len)
        self.ffn_norm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.ffn = (MoE(config.hidden_size, config.moe, dtype=dtype, init_std=std, rngs=rngs, fp8=config.fp8_recipe)
                    if use_moe else SwiGLU(config.hidden_size, config.intermediate_size, dtype=dtype, init_std=std,
                                           rngs=rngs, fp8=config.fp8_recipe))
        self.remat_attention = config.remat == "attention"

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def __call__(self, h: jax.Array, positions: jax.Array, *, form: Form = "expanded"
                 ) -> tuple[jax.Array, MoEStats | None]:
        """[batch, seq, hidden], [batch, seq] int32 -> ([batch, seq, hidden], MoEStats or None for dense)."""

        def attention(attn, x):
            return attn(x, positions, form=form)

        if self.remat_attention:
            attention = nnx.remat(attention)
        with jax.named_scope("attention"):  # profile scopes (jaxseek.trace_analysis.TRACKED_SCOPES)
            h = h + attention(self.attn, self.attn_norm(h))
        h, stats = self.feed_forward(h)
        return constrain(h, HIDDEN), stats

    def feed_forward(self, h: jax.Array) -> tuple[jax.Array, MoEStats | None]:
        """The block's second half: h + FFN(norm(h)), with the MoE statistics (None for a dense FFN)."""
        if self.is_moe:
            with jax.named_scope("moe"):
                ffn_out, stats = self.ffn(self.ffn_norm(h))
        else:
            with jax.named_scope("mlp"):
                ffn_out, stats = self.ffn(self.ffn_norm(h)), None
        return h + ffn_out, stats


class MTPModule(nnx.Module):
    """One multi-token-prediction depth: enorm, hnorm, eh_proj, a block and its own final norm."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype, eps = compute_dtype(config), config.rms_norm_eps
        self.enorm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.hnorm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.eh_proj = linear(2 * config.hidden_size, config.hidden_size, axes=("mtp_concat", "embed"), dtype=dtype,
                              init_std=config.init_std, rngs=rngs, fp8=config.fp8_recipe)
        self.block = Block(config, use_moe=config.num_moe_layers > 0, rngs=rngs)
        self.norm = rms_norm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)

    def __call__(self, h_prev: jax.Array, ahead_embeddings: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, MoEStats | None]:
        """[b, s, d] previous depth's states, [b, s, d] embeddings of tokens i+k -> ([b, s, d], stats)."""
        h = self.eh_proj(jnp.concatenate([self.enorm(ahead_embeddings), self.hnorm(h_prev)], axis=-1))
        return self.block(h, positions)


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = compute_dtype(config)
        self.embed = embedding(config.vocab_size, config.hidden_size, dtype=dtype, init_std=config.init_std,
                               rngs=rngs)
        self.dense_blocks = (BlockStack(lambda r: Block(config, use_moe=False, rngs=r), config.first_k_dense,
                                        rngs=rngs, remat=config.remat) if config.first_k_dense else None)
        self.moe_blocks = (BlockStack(lambda r: Block(config, use_moe=True, rngs=r), config.num_moe_layers,
                                      rngs=rngs, remat=config.remat) if config.num_moe_layers else None)
        self.final_norm = rms_norm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.head = linear(config.hidden_size, config.vocab_size, axes=("embed", "vocab"), dtype=dtype,
                           init_std=config.init_std, rngs=rngs)
        self.mtp = (stacked(lambda r: MTPModule(config, rngs=r), config.mtp_depth, rngs)
                    if config.mtp_depth else None)

    def positions(self, batch: int, seq: int) -> jax.Array:
        """[batch, seq] int32 positions 0..seq-1; refuses sequences longer than ``max_seq_len``."""
        if seq > self.config.max_seq_len:
            raise ValueError(f"tokens: {seq} positions exceed max_seq_len={self.config.max_seq_len}")
        return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def pre_stage(self, tokens: jax.Array, positions: jax.Array, *, form: Form = "expanded") -> jax.Array:
        """[batch, seq] int32 tokens and positions -> [batch, seq, hidden]: the embedding and the dense blocks."""
        h = constrain(self.embed(tokens), HIDDEN)
        if self.dense_blocks is not None:
            h, _ = self.dense_blocks(h, positions, form=form)
        return h

    def moe_stage(self, h: jax.Array, positions: jax.Array, *, form: Form = "expanded"
                  ) -> tuple[jax.Array, MoEStats | None]:
        """[batch, seq, hidden] -> ([batch, seq, hidden], MoEStats with a leading [moe_layers] axis or None)."""
        if self.moe_blocks is None:
            return h, None
        return self.moe_blocks(h, positions, form=form)

    def logits(self, h: jax.Array) -> jax.Array:
        """[..., hidden] -> [..., vocab] float32 through the final norm and the shared head."""
        return self.head(self.final_norm(h)).astype(jnp.float32)

    def post_stage(self, h: jax.Array, tokens: jax.Array, positions: jax.Array) -> HeadOutput:
        """The final norm, the head and the first D MTP modules.

        Args:
          h: [batch, seq, hidden] the last block's output.
          tokens: [batch, seq + D] int32, the model's input tokens followed by D look-ahead tokens: MTP depth k
            embeds ``tokens[:, k:seq + k]`` (token i+k at position i). D = 0 runs no MTP module.
          positions: [batch, seq] int32.
        """
        seq = h.shape[1]
        depth = tokens.shape[1] - seq
        logits = self.logits(h)
        if depth == 0:
            return HeadOutput(logits, jnp.zeros((0,) + logits.shape, jnp.float32), None)
        available = layer_count(self.mtp) if self.mtp is not None else 0
        if not 0 < depth <= available:
            raise ValueError(f"tokens: {depth} look-ahead columns but the model has {available} MTP modules")
        ahead = jnp.stack([self.embed(tokens[:, k:seq + k]) for k in range(1, depth + 1)])  # [D, b, s, d]
        modules = self.mtp if depth == available else slice_layers(self.mtp, 0, depth)

        _, (normed, stats) = scan_layers(modules, _mtp_step, (h, positions), ahead)
        return HeadOutput(logits, self.head(normed).astype(jnp.float32), stats)

    def __call__(self, tokens: jax.Array, *, with_mtp: bool = True, form: Form = "expanded") -> ModelOutput:
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
        positions = self.positions(tokens.shape[0], seq)
        h, stats = self.moe_stage(self.pre_stage(tokens[:, :seq], positions, form=form), positions, form=form)
        head = self.post_stage(h, tokens[:, :seq + depth], positions)
        load, balance = expert_statistics([stats, head.mtp_stats], self.config.moe.num_routed_experts)
        return ModelOutput(head.logits, head.mtp_logits, load, balance)

    def moe_stacks(self) -> list[nnx.Module]:
        """The stacked modules holding MoE layers, in the order of ``ModelOutput.expert_load`` rows:
        the MoE blocks' ``layers``, then the MTP modules' blocks."""
        stacks = [self.moe_blocks.layers] if self.moe_blocks is not None else []
        if self.mtp is not None and self.config.num_moe_layers:
            stacks.append(self.mtp.block)
        return stacks

    def moe_layers(self) -> list[MoE]:
        """The MoE layers of ``moe_stacks``, each with a leading layer axis."""
        return [stack.ffn for stack in self.moe_stacks()]

    def update_expert_bias(self, expert_load: jax.Array) -> None:
        """Applies the auxiliary-loss-free bias update to every MoE layer from [moe_layers, experts] loads."""
        start = 0
        for layer in self.moe_layers():
            count = layer.expert_bias.shape[0]
            layer.update_bias(expert_load[start:start + count])
            start += count


def _mtp_step(module: MTPModule, carry, ahead_embeddings):
    """One MTP depth: (h of the previous depth, positions), [b, s, d] embeddings of tokens i+k ->
    (carry for the next depth, (its final-normed states, MoE stats))."""
    h, positions = carry
    h, stats = module(h, ahead_embeddings, positions)
    return (h, positions), (module.norm(h), stats)


def expert_statistics(stats: list[MoEStats | None], num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Per-stage MoE statistics ([layers, ...] each, None for none) -> ([moe_layers, experts] int32 loads,
    [] float32 summed balance loss)."""
    present = [s for s in stats if s is not None]
    if not present:
        return jnp.zeros((0, num_experts), jnp.int32), jnp.zeros((), jnp.float32)
    load = jnp.concatenate([s.tokens_per_expert for s in present])
    balance = sum((s.balance_loss.sum() for s in present), jnp.zeros((), jnp.float32))
    return load, balance


def dropped_tokens(stats: list[MoEStats | None]) -> jax.Array:
    """[] int32 (token, expert) copies the MoE layers dropped over an expert-parallel capacity."""
    return sum((s.dropped_tokens.sum() for s in stats if s is not None), jnp.zeros((), jnp.int32))
