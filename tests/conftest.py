"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The Mosaic GPU interpreter runs each warpgroup on an XLA:CPU intra-op thread; XLA sizes that pool from
# NPROC (else the core count), and a 2-core machine has fewer threads than a 3-warpgroup kernel needs.
os.environ.setdefault("NPROC", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxseek.config import MLAConfig, ModelConfig, MoEConfig, TrainConfig  # noqa: E402


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (``item.rep_call``), for fixtures that clean up after
    a failure (the Mosaic GPU interpreter must be reset after a kernel fails inside it)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def micro_config() -> ModelConfig:
    """A model small enough that a jit-compiled train step runs in milliseconds."""
    return ModelConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, first_k_dense=1,
        mla=MLAConfig(num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8),
        moe=MoEConfig(num_routed_experts=8, num_shared_experts=1, num_experts_per_token=2, intermediate_size=16,
                      n_group=4, topk_group=2, bias_update_rate=1e-2, seq_aux_loss_weight=1e-3),
        mtp_depth=1, max_seq_len=256)


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "conftest must run before jax is imported"
    return jax.devices()


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent compilation cache for one test: a resumed run loads the step an earlier run of the test
    compiled, instead of compiling it again."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(tmp_path / "xla_cache"), 0.0, 0)):
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session")
def trained_run(micro_config, tmp_path_factory):
    """A ``jaxseek train`` run directory of ``micro_config`` after 60 steps on stdlib code (~1 min to build:
    shared by the generation and KV-store tests)."""
    from rich.console import Console

    from jaxseek.data import load_stdlib_corpus
    from jaxseek.train import train
    out = tmp_path_factory.mktemp("run")
    tc = TrainConfig(steps=60, batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=5, checkpoint_every=60,
                     eval_every=60)
    train(micro_config, tc, out, corpus=load_stdlib_corpus(max_bytes=1_000_000), console=Console(quiet=True),
          show_progress=False)
    return out
