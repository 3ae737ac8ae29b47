"""The train step's contract: the first step already moves, the balancing bias moves against the load,
MTP predicts token i+k+1, clipping counts each logical expert once, compile time stays out of tokens/s."""

import dataclasses

import jax
import numpy as np
from flax import nnx
from rich.console import Console

from jaxseek.config import TrainConfig
from jaxseek.data import load_stdlib_corpus
from jaxseek.model.loss import cross_entropy
from jaxseek.train import train
from jaxseek.train_state import init_train_state, learning_rate_schedule
from jaxseek.train_step import make_train_step

TC = TrainConfig(steps=10, batch_size=4, seq_len=16, warmup_steps=4, learning_rate=1e-2)


def _window(seed, mc, tc=TC):
    return jax.random.randint(jax.random.key(seed), (tc.batch_size, tc.seq_len + 1 + mc.mtp_depth), 0, 256)


def test_warmup_moves_the_first_step():
    schedule = learning_rate_schedule(TC)
    np.testing.assert_allclose([float(schedule(i)) for i in range(4)], [2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-6)
    np.testing.assert_allclose(float(schedule(TC.steps - 1)), TC.learning_rate * TC.final_lr_fraction, rtol=1e-6)


def test_one_step_moves_parameters_and_the_bias_against_the_load(micro_config):
    graphdef, state = init_train_state(micro_config, TC)
    before_params = jax.tree.map(np.asarray, state.params)
    model = nnx.merge(graphdef, state.params, state.model_state)
    bias_before = np.concatenate([np.asarray(layer.expert_bias[...]) for layer in model.moe_layers()])
    state, metrics = make_train_step(graphdef, micro_config, TC)(state, _window(0, micro_config))
    assert float(metrics["learning_rate"]) > 0
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before_params),
                                                                    jax.tree.leaves(state.params))]
    assert all(moved)
    model = nnx.merge(graphdef, state.params, state.model_state)
    bias_after = np.concatenate([np.asarray(layer.expert_bias[...]) for layer in model.moe_layers()])
    load = np.asarray(metrics["expert_load"], np.float64)  # [moe_layers, experts]
    direction = np.sign(load.mean(-1, keepdims=True) - load)
    assert (direction != 0).any()
    np.testing.assert_allclose(bias_after - bias_before, micro_config.moe.bias_update_rate * direction, atol=1e-7)


def test_mtp_loss_targets_token_i_plus_k_plus_1(micro_config):
    graphdef, state = init_train_state(micro_config, TC)
    tokens = _window(1, micro_config)
    model = nnx.merge(graphdef, state.params, state.model_state)
    seq = TC.seq_len
    mtp_logits = model(tokens[:, :seq + 1]).mtp_logits[0]  # depth 1 at position i embeds token i+1
    _, metrics = make_train_step(graphdef, micro_config, TC)(state, tokens)
    expected = float(cross_entropy(mtp_logits, tokens[:, 2:seq + 2]))
    np.testing.assert_allclose(float(metrics["mtp_loss"]), expected, rtol=1e-5)
    assert abs(float(cross_entropy(mtp_logits, tokens[:, 1:seq + 1])) - expected) > 1e-3  # the plain next token


def test_gradient_norm_counts_each_logical_expert_once(micro_config):
    """Replicas hold one expert's weights, so a model with EPLB replicas computes the same function and must
    report the same loss and the same (clipped) gradient norm as the model without them."""
    replicated = micro_config.replace(moe=dataclasses.replace(micro_config.moe, num_physical_experts=12,
                                                              eplb_gpus=4))
    tc = TC.replace(clip_norm=1e-3)  # clipping active: the norm decides the update
    results = []
    for mc in (micro_config, replicated):
        graphdef, state = init_train_state(mc, tc)
        _, metrics = make_train_step(graphdef, mc, tc)(state, _window(2, mc))
        results.append(metrics)
    np.testing.assert_allclose(float(results[1]["loss"]), float(results[0]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(results[1]["grad_norm"]), float(results[0]["grad_norm"]), rtol=1e-5)


def test_logged_tokens_per_second_excludes_compilation(micro_config, tmp_path):
    tc = TrainConfig(steps=2, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=2, eval_every=2)
    result = train(micro_config, tc, tmp_path / "run", corpus=load_stdlib_corpus(max_bytes=1_000_000),
                   console=Console(quiet=True), show_progress=False)
    assert result.compile_s > 0
    assert result.log.rows[0]["step_time_s"] < 0.5 * result.compile_s
