"""The Hugging Face DeepSeek-V3 layout: a golden forward pass against an independent NumPy reference,
round trips, errors that name the tensor, and `jaxseek convert` into a run that generates and trains."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_checkpoint import read_hf_tensors, write_tiny_hf_checkpoint
from hf_numpy_reference import numpy_forward

from jaxseek.cli import main
from jaxseek.convert import config_from_hf, load_hf, save_hf
from jaxseek.safetensors_io import read_file, write_file


@pytest.fixture(scope="module")
def hf_fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_fp8")
    return path, write_tiny_hf_checkpoint(path, seed=0, fp8=True)


@pytest.mark.parametrize("fp8", [True, False])
def test_golden_forward_against_the_numpy_reference(tmp_path, fp8):
    """Gate (group-limited top-k with bias), MLA with YaRN and adjacent-pair RoPE, MoE with shared experts
    and the MTP module, all from the released layout, against float64 NumPy written from DeepSeek's code."""
    config = write_tiny_hf_checkpoint(tmp_path, seed=1, fp8=fp8)
    model = load_hf(tmp_path, compute_dtype="float32")
    assert model.config.yarn and model.config.mla.rope_factor == 40 and model.config.mtp_depth == 1
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (2, 13))
    ref_logits, ref_mtp = numpy_forward(read_hf_tensors(tmp_path), config, tokens)
    out = model(jnp.asarray(tokens))  # 12 positions; the last column feeds the MTP look-ahead
    scale = np.abs(ref_logits).max()
    assert scale > 1  # a real signal, not near-zero logits
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits[:, :12], atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(out.mtp_logits), ref_mtp, atol=1e-4 * scale, rtol=0)


def test_round_trip_is_exact_in_float32_and_readable_by_safetensors(hf_fp8, tmp_path):
    from safetensors import safe_open
    path, _ = hf_fp8
    model = load_hf(path, compute_dtype="float32")
    save_hf(model, tmp_path / "out", dtype=jnp.float32, shard_bytes=200_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1  # sharded
    names = set()
    for file in files:
        with safe_open(str(tmp_path / "out" / file), framework="numpy") as handle:
            names |= set(handle.keys())
    assert names == set(index["weight_map"]) and "model.layers.3.eh_proj.weight" in names
    again = load_hf(tmp_path / "out", compute_dtype="float32")
    assert again.config == model.config
    for a, b in zip(jax_leaves(model), jax_leaves(again)):
        np.testing.assert_array_equal(a, b)


def jax_leaves(model):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _rewrite(path, change):
    """Applies ``change(tensors) -> tensors`` to the shard holding the embedding (and its index entry)."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    tensors = {k: np.array(v) for k, v in read_file(path / shard).items()}
    tensors = change(tensors)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({name: shard for name in tensors})
    (path / shard).unlink()
    write_file(path / shard, tensors)
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("change, tensor", [
    (lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}, "model.layers.0.mlp.extra"),
    (lambda t: {k: v for k, v in t.items() if k != "model.embed_tokens.weight"}, "model.embed_tokens.weight"),
    (lambda t: {**t, "model.embed_tokens.weight": t["model.embed_tokens.weight"][:, :-1]}, "model.embed_tokens"),
])
def test_bad_checkpoints_name_the_tensor(tmp_path, change, tensor):
    write_tiny_hf_checkpoint(tmp_path, seed=0, fp8=True)
    _rewrite(tmp_path, change)
    with pytest.raises(ValueError, match=tensor):
        load_hf(tmp_path)


def test_unsupported_config_keys_are_named():
    base = json.loads(json.dumps(write_config_only()))
    with pytest.raises(ValueError, match="scoring_func"):
        config_from_hf({**base, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf({**base, "rope_scaling": {**base["rope_scaling"], "type": "linear"}})
    with pytest.raises(ValueError, match="mscale"):
        config_from_hf({**base, "rope_scaling": {**base["rope_scaling"], "mscale": 0.707}})


def write_config_only():
    from hf_checkpoint import tiny_hf_config
    return tiny_hf_config()


@pytest.mark.slow
def test_convert_makes_a_run_that_generates_and_fine_tunes(tmp_path, capsys):
    write_tiny_hf_checkpoint(tmp_path / "hf", seed=2, fp8=True, vocab_size=256)  # byte-level, like our data
    run = tmp_path / "run"
    assert main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(run), "--compute-dtype", "float32"]) == 0
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def f():", "--max-new-tokens", "4"]) == 0
    assert main(["train", "--resume", "--out", str(run), "--steps", "2", "--batch-size", "8", "--seq-len", "16",
                 "--checkpoint-every", "2", "--eval-every", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "run config" in out
    assert main(["convert", "--run", str(run), "--hf-out", str(tmp_path / "back")]) == 0
    assert load_hf(tmp_path / "back").config.num_layers == 3
