"""DeepSeek-V3 checkpoints in the Hugging Face layout, in and out.

``load_hf(path)`` reads a directory holding ``config.json`` and safetensors (one file or shards with
``model.safetensors.index.json``) named as transformers' DeepseekV3 model and DeepSeek's
``inference/convert.py`` name them, dequantises FP8 weights (``weight_scale_inv``: one scale per
128x128 block), builds the matching ``ModelConfig`` and returns a ``Transformer`` holding the weights.
``save_hf(model, path)`` writes that layout back. The MTP modules are stored after the last block
(``model.layers.{num_hidden_layers + k}``) with copies of the embedding and head, as in the release.

Weights are torch ``Linear`` [out, in] there and ``Dense`` kernels [in, out] here; blocks of one kind are
stacked on a leading layer axis, experts on the next one. Unknown, missing or mis-shaped tensors raise a
``ValueError`` that names the tensor.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseek.checkpoint import CONFIG_FILE, Checkpointer
from jaxseek.config import MLAConfig, ModelConfig, MoEConfig, TrainConfig
from jaxseek.model.moe import placement_maps
from jaxseek.model.transformer import Transformer
from jaxseek.safetensors_io import read_file, write_file
from jaxseek.train_state import state_from_model

FP8_BLOCK = 128
INDEX_FILE = "model.safetensors.index.json"

ATTENTION = {"input_layernorm.weight": "attn_norm.scale", "post_attention_layernorm.weight": "ffn_norm.scale",
             "self_attn.q_proj.weight": "attn.wq.kernel", "self_attn.q_a_proj.weight": "attn.wq_a.kernel",
             "self_attn.q_a_layernorm.weight": "attn.q_norm.scale", "self_attn.q_b_proj.weight": "attn.wq_b.kernel",
             "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.kernel",
             "self_attn.kv_a_layernorm.weight": "attn.kv_norm.scale",
             "self_attn.kv_b_proj.weight": "attn.wkv_b.kernel", "self_attn.o_proj.weight": "attn.wo.kernel"}
SWIGLU = {f"{p}_proj.weight": f"{p}_proj.kernel" for p in ("gate", "up", "down")}
EXPERTS = {"gate_proj.weight": "w_gate", "up_proj.weight": "w_up", "down_proj.weight": "w_down"}
MTP_EXTRA = {"enorm.weight": "enorm.scale", "hnorm.weight": "hnorm.scale", "eh_proj.weight": "eh_proj.kernel",
             "shared_head.norm.weight": "norm.scale"}
MTP_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
SHELL = {"model.embed_tokens.weight": ("embed.embedding", False), "model.norm.weight": ("final_norm.scale", False),
         "lm_head.weight": ("head.kernel", True)}


# ---------------------------------------------------------------------------------------------- config

def config_from_hf(hf: dict, *, compute_dtype: str | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face DeepSeek-V3 ``config.json`` dict; features jaxseek's model does
    not have raise a ValueError naming the key."""
    def need(key, expected):
        if hf.get(key, expected) != expected:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (jaxseek's model needs {expected!r})")

    need("scoring_func", "sigmoid")
    need("topk_method", "noaux_tc")
    need("moe_layer_freq", 1)
    need("norm_topk_prob", True)
    need("hidden_act", "silu")
    need("tie_word_embeddings", False)
    scaling = hf.get("rope_scaling") or {}
    if scaling and scaling.get("type", scaling.get("rope_type")) != "yarn":
        raise ValueError(f"config.json: rope_scaling type {scaling.get('type')!r} is not supported (only 'yarn')")
    if scaling.get("mscale", 1.0) != scaling.get("mscale_all_dim", scaling.get("mscale", 1.0)):
        raise ValueError("config.json: rope_scaling.mscale must equal mscale_all_dim (as in DeepSeek-V3)")
    mla = MLAConfig(num_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank") or 0,
                    kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                    qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                    rope_theta=float(hf.get("rope_theta", 10000.0)), rope_factor=float(scaling.get("factor", 1.0)),
                    original_seq_len=int(scaling.get("original_max_position_embeddings", 4096)),
                    beta_fast=float(scaling.get("beta_fast", 32.0)), beta_slow=float(scaling.get("beta_slow", 1.0)),
                    mscale=float(scaling.get("mscale", 1.0)))
    moe = MoEConfig(num_routed_experts=hf["n_routed_experts"], num_shared_experts=hf.get("n_shared_experts") or 0,
                    num_experts_per_token=hf["num_experts_per_tok"], intermediate_size=hf["moe_intermediate_size"],
                    n_group=hf.get("n_group", 1), topk_group=hf.get("topk_group", 1),
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    dtype = compute_dtype or ("bfloat16" if hf.get("torch_dtype", "bfloat16") == "bfloat16" else "float32")
    return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                       intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                       first_k_dense=hf.get("first_k_dense_replace", 0), mla=mla, moe=moe,
                       mtp_depth=hf.get("num_nextn_predict_layers", 0), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                       max_seq_len=hf.get("max_position_embeddings", 4096), compute_dtype=dtype)


def config_to_hf(mc: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict of a ``ModelConfig`` (bf16 weights, no quantization)."""
    mla, moe = mc.mla, mc.moe
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": mc.vocab_size,
          "hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size,
          "moe_intermediate_size": moe.intermediate_size, "num_hidden_layers": mc.num_layers,
          "num_nextn_predict_layers": mc.mtp_depth, "num_attention_heads": mla.num_heads,
          "num_key_value_heads": mla.num_heads, "n_shared_experts": moe.num_shared_experts,
          "n_routed_experts": moe.num_routed_experts, "routed_scaling_factor": moe.routed_scaling_factor,
          "kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank or None,
          "qk_rope_head_dim": mla.qk_rope_head_dim, "v_head_dim": mla.v_head_dim,
          "qk_nope_head_dim": mla.qk_nope_head_dim, "topk_method": "noaux_tc", "n_group": moe.n_group,
          "topk_group": moe.topk_group, "num_experts_per_tok": moe.num_experts_per_token, "moe_layer_freq": 1,
          "first_k_dense_replace": mc.first_k_dense, "norm_topk_prob": True, "scoring_func": "sigmoid",
          "hidden_act": "silu", "rms_norm_eps": mc.rms_norm_eps, "rope_theta": mla.rope_theta,
          "max_position_embeddings": mc.max_seq_len, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    if mla.rope_factor > 1:
        hf["rope_scaling"] = {"type": "yarn", "factor": mla.rope_factor, "original_max_position_embeddings":
                              mla.original_seq_len, "beta_fast": mla.beta_fast, "beta_slow": mla.beta_slow,
                              "mscale": mla.mscale, "mscale_all_dim": mla.mscale}
    return hf


# ---------------------------------------------------------------------------------------------- names

def _block_names(mc: ModelConfig, moe: bool) -> Iterator[tuple[str, str, bool, int | None]]:
    """(HF suffix inside a layer, our path inside a block, transpose?, expert index or None) of one block."""
    queries = ({"self_attn.q_proj.weight"} if mc.mla.q_lora_rank == 0 else
               {"self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight"})
    for hf, ours in ATTENTION.items():
        if not hf.startswith("self_attn.q_") or hf in queries:
            yield hf, ours, ours.endswith("kernel"), None
    if not moe:
        for hf, ours in SWIGLU.items():
            yield f"mlp.{hf}", f"ffn.{ours}", True, None
        return
    yield "mlp.gate.weight", "ffn.router", False, None
    for j in range(mc.moe.num_routed_experts):
        for hf, ours in EXPERTS.items():
            yield f"mlp.experts.{j}.{hf}", f"ffn.{ours}", True, j
    if mc.moe.num_shared_experts:
        for hf, ours in SWIGLU.items():
            yield f"mlp.shared_experts.{hf}", f"ffn.shared.{ours}", True, None


def tensor_map(mc: ModelConfig) -> dict[str, tuple[str, int | None, int | None, bool]]:
    """HF tensor name -> (our flat state path, layer index in its stack or None, expert index or None,
    transpose?). The expert bias is a model-state path (``...ffn.expert_bias``)."""
    names = {hf: (ours, None, None, transpose) for hf, (ours, transpose) in SHELL.items()}
    stacks = [("dense_blocks.layers", i, i, False) for i in range(mc.first_k_dense)]
    stacks += [("moe_blocks.layers", i, i - mc.first_k_dense, True) for i in range(mc.first_k_dense, mc.num_layers)]
    stacks += [("mtp.block", mc.num_layers + d, d, mc.num_moe_layers > 0) for d in range(mc.mtp_depth)]
    for stack, hf_layer, index, moe in stacks:
        prefix = f"model.layers.{hf_layer}."
        for hf, ours, transpose, expert in _block_names(mc, moe):
            names[prefix + hf] = (f"{stack}.{ours}", index, expert, transpose)
        if moe:
            names[prefix + "mlp.gate.e_score_correction_bias"] = (f"{stack}.ffn.expert_bias", index, None, False)
    for d in range(mc.mtp_depth):
        for hf, ours in MTP_EXTRA.items():
            names[f"model.layers.{mc.num_layers + d}.{hf}"] = (f"mtp.{ours}", d, None, ours.endswith("kernel"))
    return names


# ---------------------------------------------------------------------------------------------- load

def _dequantize(weight: np.ndarray, scale_inv: np.ndarray, name: str) -> np.ndarray:
    """[out, in] e4m3 and [ceil(out/128), ceil(in/128)] f32 block scales -> [out, in] float32."""
    out, inner = weight.shape
    grid = (math.ceil(out / FP8_BLOCK), math.ceil(inner / FP8_BLOCK))
    if scale_inv.shape != grid:
        raise ValueError(f"{name}_scale_inv: expected shape {grid} for a {weight.shape} weight, got {scale_inv.shape}")
    scales = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)[:out, :inner]
    return weight.astype(np.float32) * scales


def read_hf_weights(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF checkpoint directory as float32 (FP8 weights dequantised, scales consumed)."""
    path = pathlib.Path(path)
    index = path / INDEX_FILE
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"path: no safetensors files in {path}")
    raw = {}
    for file in files:
        raw.update(read_file(path / file))
    weights = {}
    for name, tensor in raw.items():
        if name.endswith("_scale_inv"):
            if name.removesuffix("_scale_inv") not in raw:
                raise ValueError(f"{name}: a scale without its weight")
            continue
        if tensor.dtype == np.dtype("float8_e4m3fn"):
            if name + "_scale_inv" not in raw:
                raise ValueError(f"{name}: an FP8 weight without {name}_scale_inv")
            weights[name] = _dequantize(tensor, raw[name + "_scale_inv"], name)
        else:
            weights[name] = np.asarray(tensor, np.float32)
    return weights


def _get_path(tree: dict, path: str):
    for part in path.split("."):
        tree = tree[part]
    return tree


def load_hf(path: str | pathlib.Path, *, compute_dtype: str | None = None) -> Transformer:
    """A ``Transformer`` with the weights of a Hugging Face DeepSeek-V3 checkpoint directory.

    Args:
      path: a directory with ``config.json`` and safetensors (FP8 or not).
      compute_dtype: "float32" or "bfloat16" (default: bfloat16 when the checkpoint's torch_dtype is).
    """
    path = pathlib.Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"path: {path} has no config.json")
    mc = config_from_hf(json.loads((path / "config.json").read_text()), compute_dtype=compute_dtype)
    weights = read_hf_weights(path)
    for d in range(mc.mtp_depth):  # the release stores copies of the shared embedding and head
        for copy, original in MTP_COPIES.items():
            name = f"model.layers.{mc.num_layers + d}.{copy}"
            stored = weights.pop(name, None)
            if stored is not None and original in weights and not np.array_equal(stored, weights[original]):
                raise ValueError(f"{name}: differs from {original}; jaxseek's MTP modules share it")
    names = tensor_map(mc)
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ValueError(f"{missing[0]}: missing from the checkpoint ({len(missing)} missing in all)")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown tensor for this config ({len(unknown)} unknown in all)")
    abstract = nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    filled = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), pure)
    for name, (ours, layer, expert, transpose) in names.items():
        target = _get_path(filled, ours)
        value = weights[name].T if transpose else weights[name]
        slot = target[layer] if layer is not None else target
        slot = slot[expert] if expert is not None else slot
        if slot.shape != value.shape:
            raise ValueError(f"{name}: expected shape {tuple(reversed(slot.shape)) if transpose else slot.shape} "
                             f"for this config, got {weights[name].shape}")
        slot[...] = value
    for stack in ("moe_blocks.layers.ffn", "mtp.block.ffn") if mc.num_moe_layers else ():
        if stack.startswith("mtp") and not mc.mtp_depth:
            continue
        for name, value in placement_maps(mc.moe).items():  # EPLB's maps: the identity placement
            target = _get_path(filled, f"{stack}.{name}")
            target[...] = value
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, filled))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------- save

def save_hf(model: Transformer, path: str | pathlib.Path, *, dtype=jnp.bfloat16, shard_bytes: int = 5 << 30) -> None:
    """Writes ``model`` in the Hugging Face DeepSeek-V3 layout: config.json, safetensors shards of about
    ``shard_bytes`` and the index. Weights are stored in ``dtype`` (bf16 as released; float32 round-trips
    exactly); EPLB replicas are not a HF concept and are refused."""
    mc = model.config
    if mc.moe.num_physical_experts:
        raise ValueError("model: save_hf writes one weight per logical expert; this model holds EPLB replicas")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(nnx.state(model))
    tensors = {}
    for name, (ours, layer, expert, transpose) in tensor_map(mc).items():
        value = np.asarray(_get_path(pure, ours))
        value = value[layer] if layer is not None else value
        value = value[expert] if expert is not None else value
        value = value.T if transpose else value
        tensors[name] = value.astype(np.float32 if name.endswith("e_score_correction_bias") else dtype)
    for d in range(mc.mtp_depth):
        for copy, original in MTP_COPIES.items():
            tensors[f"model.layers.{mc.num_layers + d}.{copy}"] = tensors[original]
    shards, current, size = [], {}, 0
    for name in sorted(tensors, key=_layer_order):
        if current and size + tensors[name].nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):06d}.safetensors"
        write_file(path / file, shard, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config_to_hf(mc), indent=2))


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if parts[:2] == ["model", "layers"] else -1, name)


def save_run(model: Transformer, run_dir: str | pathlib.Path, tc: TrainConfig | None = None, *,
             storage: str | None = None) -> None:
    """Makes a jaxseek run directory (configs + a checkpoint at step 0 with a fresh optimizer state, on the
    run's storage: ``storage`` or an embedded 3FS in it, ``jaxseek.run_storage``) holding ``model``:
    ``jaxseek generate`` reads it and ``jaxseek train --resume`` fine-tunes from it."""
    tc = tc or TrainConfig()
    if (pathlib.Path(run_dir) / CONFIG_FILE).exists():
        raise ValueError(f"out: {run_dir} already holds a run; choose another directory")
    checkpointer = Checkpointer.for_run(run_dir, save_every=tc.checkpoint_every, storage=storage, record=True)
    try:
        state = state_from_model(model, tc)
        checkpointer.write_configs(model.config, tc)
        checkpointer.save(0, state, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
