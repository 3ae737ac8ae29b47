"""An independent float64 NumPy forward pass of DeepSeek-V3 over Hugging Face-named weights.

Written from the semantics of DeepSeek's ``inference/model.py`` (deepseek-ai/DeepSeek-V3) and checked
against transformers' ``modeling_deepseek_v3.py`` for the parts the former leaves out; it imports nothing
from jaxseek. Where the two differ, the choice is stated at the function. Weights are the dict of
``tests.hf_checkpoint.read_hf_tensors`` (float64, FP8 already dequantised, torch layout ``[out, in]``).
"""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """[..., d] -> [..., d]: ``weight * x / sqrt(mean(x^2) + eps)``."""
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[..., in] @ [out, in]^T -> [..., out] (torch Linear layout, no bias anywhere in DeepSeek-V3)."""
    return x @ weight.T


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- RoPE with YaRN (precompute_freqs_cis)

def yarn_active(config: dict) -> bool:
    """inference/model.py applies YaRN when max_seq_len > original_seq_len; here the config's equivalent."""
    scaling = config.get("rope_scaling")
    return (scaling is not None and scaling.get("type", scaling.get("rope_type")) == "yarn"
            and config["max_position_embeddings"] > scaling["original_max_position_embeddings"])


def yarn_correction_range(config: dict) -> tuple[int, int]:
    """(low, high) frequency-pair indices of the YaRN ramp: the dims where beta_fast resp. beta_slow full
    rotations fit in the original context, floored / ceiled and clamped to [0, rope_dim - 1]."""
    dim, base = config["qk_rope_head_dim"], config["rope_theta"]
    scaling = config["rope_scaling"]

    def pair_index_for(rotations: float) -> float:
        wavelength_count = scaling["original_max_position_embeddings"] / (rotations * 2 * math.pi)
        return dim * math.log(wavelength_count) / (2 * math.log(base))

    low = math.floor(pair_index_for(scaling["beta_fast"]))
    high = math.ceil(pair_index_for(scaling["beta_slow"]))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(config: dict) -> np.ndarray:
    """[rope_dim / 2] float64 angular frequency of each rotated pair.

    Plain RoPE: base^(-2j / dim). With YaRN, pairs below ``low`` keep it, pairs above ``high`` are divided by
    ``factor``, and a linear ramp blends the two in between.
    """
    dim, base = config["qk_rope_head_dim"], config["rope_theta"]
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if not yarn_active(config):
        return freqs
    low, high = yarn_correction_range(config)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low if high > low else 0.001), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: plain frequency (extrapolate), 0: interpolated frequency
    return freqs * keep + freqs / config["rope_scaling"]["factor"] * (1.0 - keep)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotates ADJACENT pairs (x[2j], x[2j+1]) as one complex number by angle position * inv_freq[j].

    This is inference/model.py's ``view_as_complex`` convention, not the half-split ``rotate_half`` of Llama
    (transformers reaches the same scores by de-interleaving q and k before rotate_half).
    Args: x [batch, seq, heads, rope_dim]; positions [seq] int; inv_freq [rope_dim / 2].
    """
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [seq, rope_dim/2]
    pairs = x[..., 0::2] + 1j * x[..., 1::2]  # [batch, seq, heads, rope_dim/2] complex
    rotated = pairs * np.exp(1j * angles)[None, :, None, :]
    return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)


def softmax_scale(config: dict) -> float:
    """qk_head_dim^-0.5, times mscale^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN.

    inference/model.py has a single ``mscale``; transformers squares the ``mscale_all_dim`` one here and also
    multiplies cos/sin by mscale(mscale) / mscale(mscale_all_dim). The release sets both to 1.0, where the
    two agree; other values are refused rather than guessed.
    """
    scale = (config["qk_nope_head_dim"] + config["qk_rope_head_dim"]) ** -0.5
    if yarn_active(config):
        scaling = config["rope_scaling"]
        if scaling.get("mscale", 1.0) != scaling.get("mscale_all_dim", 1.0):
            raise NotImplementedError("rope_scaling.mscale != mscale_all_dim is outside inference/model.py")
        mscale = 0.1 * scaling.get("mscale_all_dim", 1.0) * math.log(scaling["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


# ---------------------------------------------------------------- MLA (naive, non-absorbed)

def mla_attention(w: dict, prefix: str, x: np.ndarray, config: dict) -> np.ndarray:
    """Multi-head latent attention, causal, positions 0..seq-1. x [batch, seq, hidden] -> same shape."""
    batch, seq, _ = x.shape
    heads, eps = config["num_attention_heads"], config["rms_norm_eps"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    kv_rank = config["kv_lora_rank"]
    positions, inv_freq = np.arange(seq), rope_inv_freq(config)

    if config["q_lora_rank"] is None:
        q = linear(x, w[prefix + "q_proj.weight"])
    else:
        q_latent = rms_norm(linear(x, w[prefix + "q_a_proj.weight"]), w[prefix + "q_a_layernorm.weight"], eps)
        q = linear(q_latent, w[prefix + "q_b_proj.weight"])
    q = q.reshape(batch, seq, heads, nope + rope)
    q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], positions, inv_freq)

    kv_a = linear(x, w[prefix + "kv_a_proj_with_mqa.weight"])  # [batch, seq, kv_rank + rope]
    c_kv = rms_norm(kv_a[..., :kv_rank], w[prefix + "kv_a_layernorm.weight"], eps)
    k_pe = apply_rope(kv_a[..., None, kv_rank:], positions, inv_freq)  # [batch, seq, 1, rope], shared by heads
    kv = linear(c_kv, w[prefix + "kv_b_proj.weight"]).reshape(batch, seq, heads, nope + v_dim)
    k_nope, v = kv[..., :nope], kv[..., nope:]

    scores = (np.einsum("bshd,bthd->bsht", q_nope, k_nope)
              + np.einsum("bshr,btr->bsht", q_pe, k_pe[:, :, 0])) * softmax_scale(config)  # [b, s, h, t]
    future = np.triu(np.ones((seq, seq), bool), k=1)  # [s, t]: t > s is masked
    scores = np.where(future[None, :, None, :], -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("bsht,bthd->bshd", probs, v).reshape(batch, seq, heads * v_dim)
    return linear(out, w[prefix + "o_proj.weight"])


# ---------------------------------------------------------------- feed-forward: dense MLP and MoE

def swiglu_mlp(w: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    """down_proj(silu(gate_proj(x)) * up_proj(x)); the dense MLP, each expert and the shared experts."""
    return linear(silu(linear(x, w[prefix + "gate_proj.weight"])) * linear(x, w[prefix + "up_proj.weight"]),
                  w[prefix + "down_proj.weight"])


def route(w: dict, prefix: str, x: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """noaux_tc gate: sigmoid scores; the correction bias steers selection only.

    Groups are ranked by the sum of their two best biased scores, the best ``topk_group`` groups are kept,
    the top-k biased experts are chosen among them, and their UNBIASED scores, normalised to sum 1
    (norm_topk_prob), times routed_scaling_factor are the weights. Discarded groups are -inf, as in
    inference/model.py (transformers fills 0.0, which differs only if a biased score is negative).
    inference/model.py creates the bias only when dim == 7168; the HF checkpoint always has it, so it is used.
    Args: x [tokens, hidden]. Returns (weights [tokens, top_k] float64, expert ids [tokens, top_k] int).
    """
    if config["scoring_func"] != "sigmoid" or config["topk_method"] != "noaux_tc":
        raise NotImplementedError("only DeepSeek-V3's sigmoid / noaux_tc routing is modelled")
    n_experts, n_group, top_k = config["n_routed_experts"], config["n_group"], config["num_experts_per_tok"]
    scores = 1.0 / (1.0 + np.exp(-linear(x, w[prefix + "gate.weight"])))  # [tokens, experts]
    biased = scores + w[prefix + "gate.e_score_correction_bias"]
    grouped = biased.reshape(len(x), n_group, n_experts // n_group)
    group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(axis=-1)  # [tokens, groups]
    kept_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :config["topk_group"]]
    group_kept = np.zeros((len(x), n_group), bool)
    np.put_along_axis(group_kept, kept_groups, True, axis=-1)
    candidates = np.where(np.repeat(group_kept, n_experts // n_group, axis=-1), biased, -np.inf)
    expert_ids = np.argsort(-candidates, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, expert_ids, axis=-1)
    if config["norm_topk_prob"]:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights * config["routed_scaling_factor"], expert_ids


def moe(w: dict, prefix: str, x: np.ndarray, config: dict) -> np.ndarray:
    """Routed experts weighted by the gate, plus the shared experts on every token. x [b, s, hidden]."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, expert_ids = route(w, prefix, tokens, config)
    out = swiglu_mlp(w, prefix + "shared_experts.", tokens)
    for expert in np.unique(expert_ids):
        rows, slot = np.nonzero(expert_ids == expert)
        out[rows] += weights[rows, slot, None] * swiglu_mlp(w, f"{prefix}experts.{expert}.", tokens[rows])
    return out.reshape(x.shape)


def is_moe_layer(layer: int, config: dict) -> bool:
    """The first first_k_dense_replace blocks are dense (moe_layer_freq is 1 in the release)."""
    return layer >= config["first_k_dense_replace"] and layer % config["moe_layer_freq"] == 0


def decoder_block(w: dict, layer: int, x: np.ndarray, config: dict) -> np.ndarray:
    """Pre-norm block ``model.layers.{layer}``: x + attn(norm(x)), then + ffn(norm(.)). x [b, s, hidden]."""
    prefix, eps = f"model.layers.{layer}.", config["rms_norm_eps"]
    x = x + mla_attention(w, prefix + "self_attn.", rms_norm(x, w[prefix + "input_layernorm.weight"], eps), config)
    h = rms_norm(x, w[prefix + "post_attention_layernorm.weight"], eps)
    ffn = moe(w, prefix + "mlp.", h, config) if is_moe_layer(layer, config) else swiglu_mlp(w, prefix + "mlp.", h)
    return x + ffn


# ---------------------------------------------------------------- the model and its MTP modules

def mtp_forward(w: dict, config: dict, tokens: np.ndarray, main_hidden: np.ndarray) -> np.ndarray:
    """Multi-token prediction (DeepSeek-V3 paper §2.2, release layout ``model.layers.{L + k - 1}``).

    Module k = 1..D at position i combines the previous depth's hidden state h^{k-1}_i (h^0 = the main model's
    last block output, BEFORE the final norm) with the embedding of token i + k:
        h'_i = eh_proj(concat[enorm(embed(t_{i+k})), hnorm(h^{k-1}_i)])   (embedding first, as the release)
        h^k  = the module's decoder block on h' (causal, RoPE positions 0, 1, ...)
        logits^k_i = shared_head.head(shared_head.norm(h^k_i))             (predicts t_{i+k+1})
    Every depth is evaluated on positions i = 0..seq-1-D so the depths stack; this truncation is exact
    because everything is causal. Uses the module's own stored embed_tokens / shared_head.head (copies of
    the main ones in the release). Args: tokens [b, seq] int; main_hidden [b, seq, hidden].
    Returns [D, b, seq - D, vocab] float64.
    """
    depth, layers, eps = config["num_nextn_predict_layers"], config["num_hidden_layers"], config["rms_norm_eps"]
    length = tokens.shape[1] - depth
    h = main_hidden[:, :length]
    logits = []
    for k in range(1, depth + 1):
        prefix = f"model.layers.{layers + k - 1}."
        embedded = w[prefix + "embed_tokens.weight"][tokens[:, k:k + length]]  # [b, length, hidden]
        joined = np.concatenate([rms_norm(embedded, w[prefix + "enorm.weight"], eps),
                                 rms_norm(h, w[prefix + "hnorm.weight"], eps)], axis=-1)
        h = decoder_block(w, layers + k - 1, linear(joined, w[prefix + "eh_proj.weight"]), config)
        logits.append(linear(rms_norm(h, w[prefix + "shared_head.norm.weight"], eps),
                             w[prefix + "shared_head.head.weight"]))
    vocab = config["vocab_size"]
    return np.stack(logits) if logits else np.zeros((0, tokens.shape[0], length, vocab))


def numpy_forward(weights: dict, config: dict, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the main model and of the MTP modules, in float64.

    Args:
      weights: HF tensor name -> float64 array (``read_hf_tensors``).
      config: the checkpoint's config.json as a dict.
      tokens: [batch, seq] int token ids; positions are 0..seq-1.
    Returns:
      logits [batch, seq, vocab]: logits[:, i] predicts token i + 1.
      mtp_logits [D, batch, seq - D, vocab] with D = num_nextn_predict_layers: mtp_logits[k - 1, :, i] is
        MTP module k at position i, which sees tokens 0..i+k and predicts token i + k + 1 (see ``mtp_forward``).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be [batch, seq] integers, got {tokens.dtype} {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= config["vocab_size"]:
        raise ValueError(f"tokens must lie in [0, {config['vocab_size']})")
    h = weights["model.embed_tokens.weight"][tokens]  # [batch, seq, hidden]
    for layer in range(config["num_hidden_layers"]):
        h = decoder_block(weights, layer, h, config)
    logits = linear(rms_norm(h, weights["model.norm.weight"], config["rms_norm_eps"]), weights["lm_head.weight"])
    return logits, mtp_forward(weights, config, tokens, h)
