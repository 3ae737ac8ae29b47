"""A tiny random DeepSeek-V3 checkpoint in the Hugging Face layout, and a reader that dequantises it.

The layout is the one of the ``deepseek-ai/DeepSeek-V3`` release (README_WEIGHTS.md, its config.json and
model.safetensors.index.json), which transformers' ``DeepseekV3ForCausalLM`` and DeepSeek's
``inference/convert.py`` read:

* ``config.json`` with the release's keys; ``quantization_config`` (fp8, e4m3, 128x128 blocks) when FP8.
* Shards named like the release's (``model-00001-of-000003.safetensors``; torch ``Linear`` layout
  ``[out, in]``) plus ``model.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor.
* FP8 tensors are ``float8_e4m3fn`` with a float32 ``<name>_scale_inv`` of shape
  ``[ceil(out / 128), ceil(in / 128)]``: the dequantised weight is ``fp8 * scale_inv`` block by block
  (a partial last block uses the same scale over its smaller extent).
* The MTP module is stored after the main blocks as ``model.layers.{num_hidden_layers + k}.*``: a full MoE
  block plus ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.{norm,head}``, where
  ``embed_tokens`` and ``shared_head.head`` are copies of the main embedding and ``lm_head``.

Which tensors the release stores in FP8 (``stored_as_fp8``): every projection inside a decoder block,
i.e. ``self_attn.{q_proj,q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj}`` and
``mlp[.experts.j|.shared_experts].{gate,up,down}_proj`` (``inference/model.py`` builds them all as its
``Linear``, which takes the FP8 dtype). BF16: embeddings, ``lm_head`` (built with the default dtype),
every norm, the router ``mlp.gate.weight`` (a bare ``Parameter``), and the MTP ``eh_proj`` (vLLM and
SGLang load it as an unquantised ``nn.Linear``). Float32: ``mlp.gate.e_score_correction_bias``
(DeepSeek's "fp32 gate bias" commit; transformers keeps it in fp32 too).

No code here comes from those projects; the random values are ours.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_INV_SUFFIX = "_scale_inv"

_FP8_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj")
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "F8_E4M3": ml_dtypes.float8_e4m3fn, "I64": np.int64, "I32": np.int32}


def tiny_hf_config(*, fp8: bool = True, **overrides) -> dict:
    """The release's config.json keys with tiny sizes that still exercise every feature.

    hidden_size 160 is not a multiple of 128, so FP8 blocks along it are partial. YaRN is active as in the
    release (max_position_embeddings 163840 > original_max_position_embeddings 4096). At rope dim 8 the YaRN
    correction range is (low, high) = (floor 1.31, ceil 2.81) = (1, 3): frequency pairs 0 and 1 keep the plain
    RoPE frequency, pair 2 is half interpolated, pair 3 is divided by the factor 40, so the ramp is non-trivial.
    ``overrides`` replace top-level keys (``rope_scaling`` as a whole dict); an unknown key is a ValueError.
    """
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "vocab_size": 96,
        "hidden_size": 160,
        "intermediate_size": 192,
        "moe_intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 64,
        "q_lora_rank": 96,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "qk_nope_head_dim": 16,
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 163840,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
    }
    unknown = sorted(set(overrides) - set(config) - {"quantization_config"})
    if unknown:
        raise ValueError(f"config_overrides: unknown DeepSeek-V3 config keys {unknown}")
    config.update(copy.deepcopy(overrides))
    if fp8 and "quantization_config" not in overrides:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    if config["n_routed_experts"] % config["n_group"]:
        raise ValueError(f"n_routed_experts ({config['n_routed_experts']}) must divide into n_group "
                         f"({config['n_group']}) groups")
    return config


def stored_as_fp8(name: str) -> bool:
    """Whether the release stores tensor ``name`` as float8_e4m3fn with a ``_scale_inv`` companion."""
    parts = name.split(".")
    return (parts[-1] == "weight" and len(parts) >= 3 and parts[-2] in _FP8_PROJECTIONS
            and (".self_attn." in name or ".mlp." in name))


def _block_weights(prefix: str, layer: int, config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one decoder block (attention + dense MLP or MoE)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    qk_head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    shapes = {f"{prefix}input_layernorm.weight": (hidden,), f"{prefix}post_attention_layernorm.weight": (hidden,)}
    attn = prefix + "self_attn."
    if config["q_lora_rank"] is None:
        shapes[attn + "q_proj.weight"] = (heads * qk_head, hidden)
    else:
        shapes[attn + "q_a_proj.weight"] = (config["q_lora_rank"], hidden)
        shapes[attn + "q_a_layernorm.weight"] = (config["q_lora_rank"],)
        shapes[attn + "q_b_proj.weight"] = (heads * qk_head, config["q_lora_rank"])
    shapes[attn + "kv_a_proj_with_mqa.weight"] = (config["kv_lora_rank"] + config["qk_rope_head_dim"], hidden)
    shapes[attn + "kv_a_layernorm.weight"] = (config["kv_lora_rank"],)
    shapes[attn + "kv_b_proj.weight"] = (heads * (config["qk_nope_head_dim"] + config["v_head_dim"]),
                                         config["kv_lora_rank"])
    shapes[attn + "o_proj.weight"] = (hidden, heads * config["v_head_dim"])

    def swiglu(mlp_prefix: str, inner: int):
        shapes[mlp_prefix + "gate_proj.weight"] = (inner, hidden)
        shapes[mlp_prefix + "up_proj.weight"] = (inner, hidden)
        shapes[mlp_prefix + "down_proj.weight"] = (hidden, inner)

    is_moe = layer >= config["first_k_dense_replace"] and layer % config["moe_layer_freq"] == 0
    if not is_moe:
        swiglu(prefix + "mlp.", config["intermediate_size"])
        return shapes
    shapes[prefix + "mlp.gate.weight"] = (config["n_routed_experts"], hidden)
    shapes[prefix + "mlp.gate.e_score_correction_bias"] = (config["n_routed_experts"],)
    for expert in range(config["n_routed_experts"]):
        swiglu(f"{prefix}mlp.experts.{expert}.", config["moe_intermediate_size"])
    swiglu(prefix + "mlp.shared_experts.", config["moe_intermediate_size"] * config["n_shared_experts"])
    return shapes


def hf_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint except the ``_scale_inv`` companions, in the release's order."""
    vocab, hidden, layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        shapes.update(_block_weights(f"model.layers.{layer}.", layer, config))
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    for depth in range(config["num_nextn_predict_layers"]):
        prefix = f"model.layers.{layers + depth}."
        shapes[prefix + "embed_tokens.weight"] = (vocab, hidden)
        shapes[prefix + "enorm.weight"] = (hidden,)
        shapes[prefix + "hnorm.weight"] = (hidden,)
        shapes[prefix + "eh_proj.weight"] = (hidden, 2 * hidden)
        shapes.update(_block_weights(prefix, layers + depth, config))
        shapes[prefix + "shared_head.norm.weight"] = (hidden,)
        shapes[prefix + "shared_head.head.weight"] = (vocab, hidden)
    return shapes


def _random_master_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """[shape] float64 values scaled so activations stay O(1): unit-variance embeddings, norms around 1,
    projections with variance 1/fan_in, a small router bias (big enough to change some selections)."""
    if name.endswith("e_score_correction_bias"):
        return 0.1 * rng.standard_normal(shape)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith("embed_tokens.weight"):
        return rng.standard_normal(shape)
    return rng.standard_normal(shape) / math.sqrt(shape[1])


def quantize_fp8_blocks(weight: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Block FP8 cast with deliberately uneven scales.

    Args:
      weight: [out, in] float64, the weight to store.
      rng: draws each block's scale inflation ``exp(min(2|z|, 4))`` (1x to 55x above amax / 448), so the
        stored scales differ strongly between blocks while every dequantised block stays close to ``weight``.
    Returns:
      ([out, in] float8_e4m3fn payload, [ceil(out/128), ceil(in/128)] float32 scale_inv).
    """
    rows, cols = weight.shape
    grid = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    scale_inv = np.empty(grid, np.float32)
    payload = np.empty(weight.shape, ml_dtypes.float8_e4m3fn)
    for bo in range(grid[0]):
        for bi in range(grid[1]):
            block = (slice(bo * FP8_BLOCK, (bo + 1) * FP8_BLOCK), slice(bi * FP8_BLOCK, (bi + 1) * FP8_BLOCK))
            amax = float(np.abs(weight[block]).max()) or 1.0
            scale = np.float32(amax / FP8_MAX * math.exp(min(2.0 * abs(rng.standard_normal()), 4.0)))
            scale_inv[bo, bi] = scale
            payload[block] = np.clip(weight[block] / float(scale), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return payload, scale_inv


def dequantize_fp8_blocks(payload: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """[out, in] float8_e4m3fn times its [ceil(out/128), ceil(in/128)] float32 block scales -> float64."""
    rows, cols = payload.shape
    expected = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if scale_inv.shape != expected:
        raise ValueError(f"scale_inv has shape {scale_inv.shape}, expected {expected} for a {payload.shape} weight")
    scales = np.repeat(np.repeat(scale_inv.astype(np.float64), FP8_BLOCK, 0), FP8_BLOCK, 1)[:rows, :cols]
    return payload.astype(np.float64) * scales


def _shard_of(name: str, config: dict) -> int:
    """Shard 0: embedding and the first half of the blocks; 1: the rest, final norm, lm_head; 2: MTP.
    Router biases go to the last shard, away from their gate weights, so a loader must follow the index."""
    layers = config["num_hidden_layers"]
    if name.endswith("e_score_correction_bias"):
        return 2
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return 0 if layer < layers // 2 else (1 if layer < layers else 2)
    return 0 if name == "model.embed_tokens.weight" else 1


def write_tiny_hf_checkpoint(directory, *, seed: int = 0, fp8: bool = True, **config_overrides) -> dict:
    """Writes config.json, safetensors shards and model.safetensors.index.json of a random tiny DeepSeek-V3.

    The float64 master weights depend only on ``seed`` and the config, so ``fp8=True`` and ``fp8=False``
    checkpoints of one seed hold the same model up to the FP8 / BF16 rounding. Returns the config dict.
    """
    config = tiny_hf_config(fp8=fp8, **config_overrides)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale_rng = np.random.default_rng([seed, 1])
    shards: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for name, shape in hf_weight_shapes(config).items():
        shard = shards[_shard_of(name, config)]
        if name.endswith("embed_tokens.weight") and name != "model.embed_tokens.weight":
            shard[name] = shards[0]["model.embed_tokens.weight"].copy()
            continue
        if name.endswith("shared_head.head.weight"):
            shard[name] = shards[1]["lm_head.weight"].copy()
            continue
        master = _random_master_weight(name, shape, rng)
        if name.endswith("e_score_correction_bias"):
            shard[name] = master.astype(np.float32)
        elif fp8 and stored_as_fp8(name):
            shard[name], shard[name + SCALE_INV_SUFFIX] = quantize_fp8_blocks(master, scale_rng)
        else:
            shard[name] = master.astype(ml_dtypes.bfloat16)
    shards = [shard for shard in shards if shard]
    weight_map, total_size = {}, 0
    for index, shard in enumerate(shards):
        # The release numbers its 163 shards "model-00001-of-000163": five digits, then six.
        file_name = f"model-{index + 1:05d}-of-{len(shards):06d}.safetensors"
        save_file({name: np.ascontiguousarray(value) for name, value in shard.items()}, str(directory / file_name),
                  metadata={"format": "pt"})
        for name, value in shard.items():
            weight_map[name] = file_name
            total_size += value.nbytes
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return config


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, in its stored dtype (bfloat16 and float8_e4m3fn via ml_dtypes).

    Parses the format directly (8-byte little-endian header length, JSON header, raw little-endian data):
    safetensors 0.8's numpy and flax readers cannot return F8_E4M3 tensors.
    """
    data = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    body = memoryview(data)[8 + header_len:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(entry["shape"]).copy()
    return tensors


def read_hf_tensors(directory) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as float64, FP8 ones dequantised, ``_scale_inv`` entries dropped.

    Follows model.safetensors.index.json and checks that each tensor is in the shard the index names.
    """
    directory = Path(directory)
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    stored: dict[str, np.ndarray] = {}
    for file_name in sorted(set(weight_map.values())):
        for name, value in read_safetensors(directory / file_name).items():
            if weight_map.get(name) != file_name:
                raise ValueError(f"{file_name} holds {name!r} but the index maps it to {weight_map.get(name)!r}")
            stored[name] = value
    missing = sorted(set(weight_map) - set(stored))
    if missing:
        raise ValueError(f"tensors in the index but in no shard: {missing[:5]}")
    tensors = {}
    for name, value in stored.items():
        if name.endswith(SCALE_INV_SUFFIX):
            continue
        scale_inv = stored.get(name + SCALE_INV_SUFFIX)
        if value.dtype == ml_dtypes.float8_e4m3fn:
            if scale_inv is None:
                raise ValueError(f"FP8 tensor {name!r} has no {name + SCALE_INV_SUFFIX!r}")
            tensors[name] = dequantize_fp8_blocks(value, scale_inv)
        else:
            tensors[name] = value.astype(np.float64)
    return tensors
