"""Self-tests of the tiny Hugging Face DeepSeek-V3 checkpoint and of the NumPy reference forward pass."""

import json
import math

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from hf_checkpoint import (FP8_BLOCK, dequantize_fp8_blocks, hf_weight_shapes, read_hf_tensors, read_safetensors,
                           stored_as_fp8, write_tiny_hf_checkpoint)
from hf_numpy_reference import (apply_rope, numpy_forward, rope_inv_freq, route, softmax_scale,
                                yarn_correction_range)

RELEASE_KEYS = [
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_nextn_predict_layers", "num_attention_heads", "num_key_value_heads",
    "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank",
    "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "topk_method", "n_group", "topk_group",
    "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace", "norm_topk_prob", "scoring_func",
    "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "tie_word_embeddings", "torch_dtype", "quantization_config"]


def calc_diff(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_fp8")
    return directory, write_tiny_hf_checkpoint(directory, seed=0)


@pytest.fixture(scope="module")
def model(fp8_dir):
    directory, config = fp8_dir
    return read_hf_tensors(directory), config


def stored_headers(directory):
    """name -> (shape, dtype string, shard file), read with the official safetensors library."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    headers = {}
    for file_name in sorted(set(index.values())):
        with safe_open(str(directory / file_name), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                view = f.get_slice(name)
                headers[name] = (tuple(view.get_shape()), view.get_dtype(), file_name)
    return index, headers


# ---------------------------------------------------------------- the fixture

def test_config_json_has_the_release_keys(fp8_dir):
    directory, config = fp8_dir
    on_disk = json.loads((directory / "config.json").read_text())
    assert on_disk == config and set(RELEASE_KEYS) <= set(config)
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["topk_method"], config["scoring_func"], config["tie_word_embeddings"]) == ("noaux_tc", "sigmoid",
                                                                                            False)
    assert config["rope_scaling"] == {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert config["hidden_size"] % FP8_BLOCK != 0


def test_names_shapes_dtypes_and_shards(fp8_dir):
    directory, config = fp8_dir
    index, headers = stored_headers(directory)
    assert {name: file for name, (_, _, file) in headers.items()} == index
    assert len(set(index.values())) >= 2
    expected = {  # hand-computed from the tiny config
        "model.embed_tokens.weight": ((96, 160), "BF16"),
        "model.layers.0.input_layernorm.weight": ((160,), "BF16"),
        "model.layers.0.self_attn.q_a_proj.weight": ((96, 160), "F8_E4M3"),
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": ((1, 2), "F32"),
        "model.layers.0.self_attn.q_a_layernorm.weight": ((96,), "BF16"),
        "model.layers.0.self_attn.q_b_proj.weight": ((4 * 24, 96), "F8_E4M3"),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": ((64 + 8, 160), "F8_E4M3"),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv": ((1, 2), "F32"),
        "model.layers.0.self_attn.kv_a_layernorm.weight": ((64,), "BF16"),
        "model.layers.0.self_attn.kv_b_proj.weight": ((4 * 32, 64), "F8_E4M3"),
        "model.layers.0.self_attn.o_proj.weight": ((160, 64), "F8_E4M3"),
        "model.layers.0.self_attn.o_proj.weight_scale_inv": ((2, 1), "F32"),
        "model.layers.0.mlp.gate_proj.weight": ((192, 160), "F8_E4M3"),
        "model.layers.0.mlp.down_proj.weight_scale_inv": ((2, 2), "F32"),
        "model.layers.1.mlp.gate.weight": ((8, 160), "BF16"),
        "model.layers.1.mlp.gate.e_score_correction_bias": ((8,), "F32"),
        "model.layers.2.mlp.experts.7.down_proj.weight": ((160, 48), "F8_E4M3"),
        "model.layers.2.mlp.experts.7.down_proj.weight_scale_inv": ((2, 1), "F32"),
        "model.layers.1.mlp.shared_experts.up_proj.weight": ((48, 160), "F8_E4M3"),
        "model.norm.weight": ((160,), "BF16"),
        "lm_head.weight": ((96, 160), "BF16"),
        "model.layers.3.embed_tokens.weight": ((96, 160), "BF16"),
        "model.layers.3.enorm.weight": ((160,), "BF16"),
        "model.layers.3.hnorm.weight": ((160,), "BF16"),
        "model.layers.3.eh_proj.weight": ((160, 320), "BF16"),
        "model.layers.3.shared_head.norm.weight": ((160,), "BF16"),
        "model.layers.3.shared_head.head.weight": ((96, 160), "BF16"),
        "model.layers.3.mlp.experts.0.gate_proj.weight": ((48, 160), "F8_E4M3"),
        "model.layers.3.self_attn.kv_b_proj.weight_scale_inv": ((1, 1), "F32"),
    }
    for name, (shape, dtype) in expected.items():
        assert headers[name][:2] == (shape, dtype), name
    for absent in ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate_proj.weight",
                   "model.layers.0.self_attn.q_proj.weight", "model.layers.3.eh_proj.weight_scale_inv",
                   "model.layers.4.input_layernorm.weight"]:
        assert absent not in headers
    # Every weight plus one scale per FP8 weight: 3 blocks (1 dense, 2 MoE) + the MTP block.
    shapes = hf_weight_shapes(config)
    assert set(headers) == set(shapes) | {n + "_scale_inv" for n in shapes if stored_as_fp8(n)}
    moe_block = 2 + 7 + 2 + 3 * 8 + 3
    assert len(shapes) == 1 + (2 + 7 + 3) + 2 * moe_block + 2 + (moe_block + 6)


def test_fp8_tensors_are_exactly_the_release_set_with_block_grids(fp8_dir):
    directory, _ = fp8_dir
    _, headers = stored_headers(directory)
    for name, (shape, dtype, _) in headers.items():
        if name.endswith("_scale_inv"):
            continue
        assert (dtype == "F8_E4M3") == stored_as_fp8(name), name
        if dtype == "F8_E4M3":
            grid = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
            assert headers[name + "_scale_inv"][:2] == (grid, "F32"), name
    for name in ["model.layers.1.mlp.gate.weight", "model.layers.3.eh_proj.weight", "lm_head.weight",
                 "model.embed_tokens.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]:
        assert not stored_as_fp8(name)


def test_dequantisation_is_per_128x128_block(fp8_dir, model):
    directory, _ = fp8_dir
    weights, _ = model
    name = "model.layers.0.mlp.down_proj.weight"  # [160, 192]: a 2x2 grid with partial last blocks
    raw = {}
    for file_name in sorted({p.name for p in directory.glob("*.safetensors")}):
        raw.update(read_safetensors(directory / file_name))
    payload, scale_inv = raw[name], raw[name + "_scale_inv"]
    assert payload.dtype == ml_dtypes.float8_e4m3fn and scale_inv.shape == (2, 2)
    assert scale_inv.max() / scale_inv.min() > 4  # scales vary strongly between blocks
    by_hand = np.empty(payload.shape)
    for bo, rows in enumerate([slice(0, 128), slice(128, 160)]):
        for bi, cols in enumerate([slice(0, 128), slice(128, 192)]):
            by_hand[rows, cols] = payload[rows, cols].astype(np.float64) * float(scale_inv[bo, bi])
    np.testing.assert_array_equal(weights[name], by_hand)
    np.testing.assert_array_equal(dequantize_fp8_blocks(payload, scale_inv), by_hand)
    # Right per-block scales give a homogeneous weight; one scale for the whole tensor does not.
    blocks = [(slice(0, 128), slice(0, 128)), (slice(0, 128), slice(128, 192)),
              (slice(128, 160), slice(0, 128)), (slice(128, 160), slice(128, 192))]
    block_rms = [np.sqrt(np.mean(by_hand[b] ** 2)) for b in blocks]
    assert max(block_rms) / min(block_rms) < 1.5
    single = payload.astype(np.float64) * float(scale_inv[0, 0])
    assert calc_diff(single, by_hand) > 0.1
    with pytest.raises(ValueError, match="scale_inv has shape"):
        dequantize_fp8_blocks(payload, scale_inv.T[:1])


def test_fp8_checkpoint_is_the_bf16_one_up_to_rounding(tmp_path, model):
    weights, _ = model
    config = write_tiny_hf_checkpoint(tmp_path, seed=0, fp8=False)
    assert "quantization_config" not in config
    assert not any(p.endswith("_scale_inv") for p in json.loads(
        (tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    bf16 = read_hf_tensors(tmp_path)
    assert set(bf16) == set(weights)
    for name, value in bf16.items():
        if stored_as_fp8(name):
            assert calc_diff(weights[name], value) < 1e-3, name
        else:
            np.testing.assert_array_equal(weights[name], value, err_msg=name)
    np.testing.assert_array_equal(weights["model.layers.3.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(weights["model.layers.3.shared_head.head.weight"], weights["lm_head.weight"])


def test_reader_agrees_with_the_safetensors_library(fp8_dir):
    directory, _ = fp8_dir
    path = directory / "model-00001-of-000003.safetensors"
    mine = read_safetensors(path)
    with safe_open(str(path), framework="numpy") as f:  # the library reads BF16 / F32 (not F8) into numpy
        for name in f.keys():
            if mine[name].dtype != ml_dtypes.float8_e4m3fn:
                official = f.get_tensor(name)
                assert official.dtype == mine[name].dtype
                np.testing.assert_array_equal(official.view(np.uint8), mine[name].view(np.uint8))


def test_overrides_q_proj_without_lora_and_bad_keys(tmp_path):
    config = write_tiny_hf_checkpoint(tmp_path, seed=1, q_lora_rank=None, num_hidden_layers=2)
    weights = read_hf_tensors(tmp_path)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 24, 160)
    assert "model.layers.0.self_attn.q_a_proj.weight" not in weights
    assert "model.layers.2.eh_proj.weight" in weights
    logits, mtp = numpy_forward(weights, config, np.arange(10)[None] % 96)
    assert np.isfinite(logits).all() and mtp.shape == (1, 1, 9, 96)
    with pytest.raises(ValueError, match="hidden_sise"):
        write_tiny_hf_checkpoint(tmp_path / "bad", hidden_sise=8)


# ---------------------------------------------------------------- the reference forward

TOKENS = np.random.default_rng(7).integers(0, 96, (2, 12))


@pytest.fixture(scope="module")
def outputs(model):
    weights, config = model
    return numpy_forward(weights, config, TOKENS)


def test_forward_shapes_and_scale(outputs):
    logits, mtp = outputs
    assert logits.shape == (2, 12, 96) and logits.dtype == np.float64
    assert mtp.shape == (1, 2, 11, 96) and mtp.dtype == np.float64
    assert np.isfinite(logits).all() and np.isfinite(mtp).all()
    assert 0.3 < logits.std() < 5 and 0.3 < mtp.std() < 5  # O(1), not saturated
    with pytest.raises(ValueError, match="tokens"):
        numpy_forward({}, {"vocab_size": 96}, TOKENS[0])


def test_forward_is_causal(model, outputs):
    weights, config = model
    j = 7
    changed = TOKENS.copy()
    changed[:, j] = (changed[:, j] + 1) % 96
    logits, mtp = numpy_forward(weights, config, changed)
    np.testing.assert_allclose(logits[:, :j], outputs[0][:, :j], rtol=1e-12, atol=1e-12)
    assert (np.abs(logits[:, j:] - outputs[0][:, j:]).max(axis=-1) > 1e-6).all()  # every later position moves
    # MTP at position i sees tokens up to i + 1.
    np.testing.assert_allclose(mtp[:, :, :j - 1], outputs[1][:, :, :j - 1], rtol=1e-12, atol=1e-12)


def test_mtp_depends_on_token_i_plus_1(model, outputs):
    weights, config = model
    i = 4
    changed = TOKENS.copy()
    changed[:, i + 1] = (changed[:, i + 1] + 5) % 96
    logits, mtp = numpy_forward(weights, config, changed)
    np.testing.assert_allclose(logits[:, :i + 1], outputs[0][:, :i + 1], rtol=1e-12, atol=1e-12)
    assert np.abs(mtp[0, :, i] - outputs[1][0, :, i]).max(axis=-1).min() > 1e-3


def test_router_bias_changes_selection(model):
    weights, config = model
    x = np.random.default_rng(3).standard_normal((64, 160))
    prefix = "model.layers.1.mlp."
    gate_weights, ids = route(weights, prefix, x, config)
    assert np.bincount(ids.ravel(), minlength=8).min() > 0  # routing is not degenerate
    np.testing.assert_allclose(gate_weights.sum(-1), config["routed_scaling_factor"])
    # Each token's experts lie in at most topk_group of the 4 groups of 2.
    assert max(len(set(row // 2)) for row in ids) <= config["topk_group"]
    unbiased = dict(weights)
    unbiased[prefix + "gate.e_score_correction_bias"] = np.zeros(8)
    _, ids_unbiased = route(unbiased, prefix, x, config)
    assert (np.sort(ids, 1) != np.sort(ids_unbiased, 1)).any()


def test_rope_rotates_adjacent_pairs_and_depends_on_relative_position(model):
    _, config = model
    inv_freq = rope_inv_freq(config)
    unit = np.zeros((1, 1, 1, 8))
    unit[..., 2] = 1.0  # real part of pair 1
    rotated = apply_rope(unit, np.array([3]), inv_freq)[0, 0, 0]
    angle = 3 * inv_freq[1]
    np.testing.assert_allclose(rotated, [0, 0, math.cos(angle), math.sin(angle), 0, 0, 0, 0], atol=1e-15)

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 1, 8))

    def score(m, n):
        return float((apply_rope(q, np.array([m]), inv_freq) * apply_rope(k, np.array([n]), inv_freq)).sum())

    assert score(9, 2) == pytest.approx(score(7, 0), rel=1e-12) == pytest.approx(score(1000, 993), rel=1e-9)
    by_offset = np.array([score(d, 0) for d in range(16)])
    assert by_offset[0] == pytest.approx(float((q * k).sum()), rel=1e-12)
    assert np.abs(by_offset - by_offset[0]).max() > 0.1  # fails if RoPE were the identity


def test_yarn_is_active_with_a_partial_ramp(model):
    _, config = model
    assert yarn_correction_range(config) == (1, 3)
    plain = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    yarn = rope_inv_freq(config)
    np.testing.assert_array_equal(yarn[:2], plain[:2])  # high frequencies kept
    np.testing.assert_allclose(yarn[2], plain[2] * 0.5 + plain[2] / 40 * 0.5)  # half way on the ramp
    np.testing.assert_allclose(yarn[3], plain[3] / 40)  # low frequency interpolated
    mscale = 0.1 * math.log(40) + 1
    assert softmax_scale(config) == pytest.approx(24 ** -0.5 * mscale ** 2)
    short = dict(config, max_position_embeddings=4096)
    np.testing.assert_array_equal(rope_inv_freq(short), plain)
    assert softmax_scale(short) == pytest.approx(24 ** -0.5)
