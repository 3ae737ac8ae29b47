import json

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest
from rich.console import Console

from jaxseek.config import TrainConfig
from jaxseek.data import load_stdlib_corpus
from jaxseek.train import METRICS_FILE, PLOT_FILE, train
from sharding.mesh import make_mesh
from storage.location import open_location


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_corpus(max_bytes=1_500_000)


def _train(config, tc, out, corpus, **kwargs):
    return train(config, tc, out, corpus=corpus, console=Console(quiet=True), show_progress=False, **kwargs)


@pytest.mark.slow
def test_loss_falls_below_the_unigram_entropy(micro_config, corpus, tmp_path, devices):
    tc = TrainConfig(steps=120, batch_size=16, seq_len=64, learning_rate=1e-2, warmup_steps=10, eval_every=60,
                     checkpoint_every=120, eval_batches=2)
    result = _train(micro_config, tc, tmp_path / "run", corpus)
    assert np.log(256) - 0.3 < result.log.rows[0]["ce_loss"] < np.log(256) + 0.3  # starts near uniform over bytes
    assert np.mean([r["ce_loss"] for r in result.log.rows[-5:]]) < result.unigram_entropy - 0.2
    assert result.valid_loss < result.unigram_entropy - 0.2
    frame = pl.read_parquet(tmp_path / "run" / METRICS_FILE)
    assert frame.height == 120 and {"loss", "grad_norm", "tokens_per_s", "expert_balance", "expert_load",
                                   "valid_loss"} <= set(frame.columns)
    assert frame["valid_loss"].drop_nulls().len() == 2
    assert (tmp_path / "run" / PLOT_FILE).stat().st_size > 10_000
    assert json.loads((tmp_path / "run" / "storage.json").read_text())["url"] == f"3fs+embedded://{tmp_path / 'run' / '3fs'}"
    with open_location(f"3fs+embedded://{tmp_path / 'run' / '3fs'}/checkpoints") as steps:
        assert "120" in steps.client.listdir(steps.path)  # on the embedded 3FS, the default storage
    assert result.state.params["moe_blocks"]["layers"]["attn"]["wo"]["kernel"][...].sharding.is_fully_replicated


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(micro_config, corpus, tmp_path):
    tc = TrainConfig(steps=8, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=2, eval_every=4,
                     checkpoint_every=2)
    straight = _train(micro_config, tc, tmp_path / "straight", corpus)
    _train(micro_config, tc, tmp_path / "resumed", corpus, stop_after=5)  # preempted after step 5
    resumed = _train(micro_config, tc, tmp_path / "resumed", corpus, resume=True)
    assert straight.log.losses() == resumed.log.losses()  # bitwise, every step
    assert [r["step"] for r in resumed.log.rows] == list(range(1, 9))
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_existing_run_is_never_overwritten(micro_config, corpus, tmp_path):
    tc = TrainConfig(steps=2, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=1, eval_every=2)
    _train(micro_config, tc, tmp_path / "run", corpus)
    with pytest.raises(ValueError, match="out"):
        _train(micro_config, tc, tmp_path / "run", corpus)
    with pytest.raises(ValueError, match="resume"):
        _train(micro_config.replace(hidden_size=64), tc, tmp_path / "run", corpus, resume=True)
    with pytest.raises(ValueError, match=r"training config .*steps"):
        _train(micro_config, tc.replace(steps=3), tmp_path / "run", corpus, resume=True)
    with pytest.raises(ValueError, match="resume"):
        _train(micro_config, tc, tmp_path / "empty", corpus, resume=True)


def test_bf16_compute_keeps_fp32_master_params(micro_config, corpus, tmp_path):
    tc = TrainConfig(steps=3, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=3, eval_every=3)
    result = _train(micro_config.replace(compute_dtype="bfloat16"), tc, tmp_path / "run", corpus)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(result.state.params))
    assert np.isfinite(result.log.losses()).all()


def test_batch_must_split_over_the_data_shards(micro_config, corpus, tmp_path):
    tc = TrainConfig(steps=2, batch_size=12, seq_len=16, warmup_steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        _train(micro_config, tc, tmp_path / "run", corpus, mesh=make_mesh())


def test_single_device_and_eight_device_runs_agree(micro_config, corpus, tmp_path, devices):
    tc = TrainConfig(steps=3, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=3, eval_every=3)
    one = _train(micro_config, tc, tmp_path / "one", corpus, mesh=make_mesh(devices=devices[:1]))
    eight = _train(micro_config, tc, tmp_path / "eight", corpus, mesh=make_mesh(devices=devices))
    np.testing.assert_allclose(one.log.losses(), eight.log.losses(), rtol=2e-5)
