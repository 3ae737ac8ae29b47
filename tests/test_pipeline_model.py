"""jaxseek's model through the pipeline executor: the same loss, aux and gradients as the plain model, alone
and with expert parallelism, and a pipelined training run that stops, resumes and matches a plain run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseek.config import PipelineConfig, TrainConfig
from jaxseek.data import load_stdlib_corpus
from rich.console import Console
from jaxseek.model.loss import language_model_loss
from jaxseek.pipeline_model import pipeline_schedule, pipelined_loss_and_grads
from jaxseek.train import train
from jaxseek.train_state import init_train_state
from sharding.dualpipe import build_schedule
from sharding.mesh import make_mesh
from sharding.rules import activation_sharding, get_rules


@pytest.fixture(scope="module")
def config(micro_config):
    return micro_config.replace(num_layers=3)  # one dense block, two MoE blocks: one per stage at pp=2


def _relative(a, b):
    return float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12))


@pytest.mark.slow
def test_dualpipe_with_expert_parallelism_matches_the_plain_model(config):
    """pp 2 x ep 2 x dp 2, DualPipe (both directions, two copies of each stage, overlapped F&B): loss, every aux
    entry and every gradient match language_model_loss on the whole batch."""
    tc = TrainConfig(steps=2, batch_size=16, seq_len=8, warmup_steps=0)
    graphdef, state = init_train_state(config, tc)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (16, tc.seq_len + 1 + config.mtp_depth), 0, config.vocab_size)

    def plain(params):
        return language_model_loss(nnx.merge(graphdef, params, state.model_state, copy=True), tokens)
    (loss, aux), grads = jax.jit(jax.value_and_grad(plain, has_aux=True))(state.params)

    mesh = make_mesh(pp=2, ep=2, dp=2)
    rules = get_rules("dp")
    schedule = build_schedule("dualpipe", 2, 4)

    @jax.jit
    def pipelined(params, tokens):
        with activation_sharding(mesh, rules):
            return pipelined_loss_and_grads(graphdef, params, state.model_state, tokens, schedule=schedule,
                                            mesh=mesh, rules=rules)
    p_loss, p_aux, p_grads = pipelined(state.params, tokens)
    np.testing.assert_allclose(p_loss, loss, rtol=1e-5)
    for name in ("ce_loss", "mtp_loss", "balance_loss"):
        np.testing.assert_allclose(p_aux[name], aux[name], rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(p_aux["expert_load"], aux["expert_load"])
    np.testing.assert_array_equal(p_aux["dropped_tokens"], aux["dropped_tokens"])
    assert jax.tree.structure(p_grads) == jax.tree.structure(grads)
    worst = max(jax.tree.leaves(jax.tree.map(_relative, p_grads, grads)))
    assert worst < 1e-4, worst


def test_pipeline_settings_that_do_not_fit_name_the_setting(config):
    mesh = make_mesh(pp=2, dp=4)
    tc = TrainConfig(steps=2, batch_size=16, seq_len=8, warmup_steps=0)
    with pytest.raises(ValueError, match="num_layers"):
        pipeline_schedule(config.replace(num_layers=4), tc.replace(pipeline=PipelineConfig("dualpipev", 4)), mesh)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline_schedule(config, tc.replace(batch_size=8), mesh)
    with pytest.raises(ValueError, match="num_chunks"):
        pipeline_schedule(config, tc.replace(pipeline=PipelineConfig("dualpipe", 2)), mesh)
    with pytest.raises(ValueError, match="pipeline.schedule"):
        PipelineConfig("gpipe")


@pytest.mark.slow
def test_pipelined_training_resumes_and_matches_the_plain_run(config, tmp_path, compilation_cache):
    """1F1B over pp=2 (dp=4): stopped after one step and resumed, its losses equal an uninterrupted
    run on a mesh without pp; the run's config records the schedule."""
    quiet = dict(corpus=load_stdlib_corpus(max_bytes=1_000_000), console=Console(quiet=True), show_progress=False)
    tc = TrainConfig(steps=2, batch_size=16, seq_len=8, warmup_steps=0, checkpoint_every=1, eval_every=2,
                     eval_batches=1, pipeline=PipelineConfig("1f1b", 4))
    plain = train(config, tc, tmp_path / "plain", mesh=make_mesh(dp=8), **quiet)
    pp_mesh = make_mesh(pp=2, dp=4)
    train(config, tc, tmp_path / "pp", mesh=pp_mesh, stop_after=1, **quiet)
    resumed = train(config, tc, tmp_path / "pp", mesh=pp_mesh, resume=True, **quiet)
    losses = [row["loss"] for row in resumed.log.rows]
    np.testing.assert_allclose(losses, [row["loss"] for row in plain.log.rows], rtol=2e-5)
    assert '"schedule": "1f1b"' in (tmp_path / "pp" / "config.json").read_text()
    # each pp rank keeps its stages' slice of the MoE stack (parameters and moments); one dense block stays whole
    for tree in (resumed.state.params, resumed.state.opt_state):
        specs = {jax.tree_util.keystr(path): leaf.sharding.spec
                 for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if leaf.ndim}
        moe = [spec for path, spec in specs.items() if "moe_blocks" in path]
        dense = [spec for path, spec in specs.items() if "dense_blocks" in path]
        assert moe and all(spec[0] == "pp" for spec in moe), moe
        assert dense and all("pp" not in spec for spec in dense), dense
