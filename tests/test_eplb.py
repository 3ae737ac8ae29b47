"""EPLB: the reference README example exactly, placement invariants, property tests over random loads,
previous-placement alignment, and the online rebalance inside a live model."""

import dataclasses

import jax
import numpy as np
import polars as pl
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxseek.cli import main
from jaxseek.config import EPLBConfig
from jaxseek.expert_placement import current_placements, rebalance
from jaxseek.train_state import init_train_state
from jaxseek.train_step import make_train_step
from sharding.eplb import no_replication_balancedness, rebalance_experts

README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_reproduces_the_reference_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    placement = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_allclose(placement.balancedness, [0.8277, 0.8050], atol=1e-4)
    # The global policy as the reference computes it (its two co-located replicas included) ...
    plain = rebalance_experts(README_WEIGHT, 16, 4, 1, 8, avoid_colocation=False)
    assert plain.phy2log.tolist() == [[10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1],
                                      [1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7]]
    # ... and without them: no GPU holds two replicas of an expert.
    spread = rebalance_experts(README_WEIGHT, 16, 4, 1, 8)
    assert all(len(set(gpu)) == 2 for gpu in spread.phy2log.reshape(2, 8, 2).tolist() for gpu in gpu)


def check_invariants(placement, num_logical, num_gpus):
    phy2log, log2phy, logcnt = placement
    layers, slots = phy2log.shape
    assert (logcnt >= 1).all() and (logcnt.sum(1) == slots).all()
    for layer in range(layers):
        np.testing.assert_array_equal(np.bincount(phy2log[layer], minlength=num_logical), logcnt[layer])
        for expert in range(num_logical):
            held = log2phy[layer, expert]
            assert sorted(held[held >= 0]) == sorted(np.flatnonzero(phy2log[layer] == expert))
    assert np.bincount(placement.gpu_of_slot(), minlength=num_gpus).tolist() == [slots // num_gpus] * num_gpus


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_invariants_and_never_less_balanced_than_no_replication(data):
    num_gpus = data.draw(st.sampled_from([1, 2, 4, 8]))
    num_logical = num_gpus * data.draw(st.integers(1, 4))
    num_replicas = num_logical + num_gpus * data.draw(st.integers(0, 3))
    layers = data.draw(st.integers(1, 3))
    weight = data.draw(hnp.arrays(np.int64, (layers, num_logical), elements=st.integers(0, 1000)))
    placement = rebalance_experts(weight, num_replicas, 1, 1, num_gpus)
    check_invariants(placement, num_logical, num_gpus)
    assert (placement.balancedness >= no_replication_balancedness(weight, num_gpus) - 1e-12).all()


@settings(max_examples=30, deadline=None)
@given(weight=hnp.arrays(np.int64, (2, 16), elements=st.integers(0, 500)))
def test_hierarchical_keeps_each_group_on_its_node(weight):
    num_groups, num_nodes, num_gpus, num_replicas = 4, 2, 4, 24
    placement = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    check_invariants(placement, 16, num_gpus)
    node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
    group_of_slot = placement.phy2log // (16 // num_groups)  # [layers, slots]
    for layer in range(2):
        for group in range(num_groups):
            assert len(set(node_of_slot[group_of_slot[layer] == group])) == 1


def test_previous_placement_is_kept_or_realigned():
    rng = np.random.default_rng(0)
    weight = rng.integers(1, 100, size=(3, 16)).astype(float)
    first = rebalance_experts(weight, 24, 1, 1, 4)
    same = rebalance_experts(weight, 24, 1, 1, 4, previous=first.phy2log)
    assert same.moved_slots == 0  # nothing to gain: nothing moves
    shifted = weight.copy()
    shifted[:, 0] *= 30  # expert 0 becomes hot
    fresh = rebalance_experts(shifted, 24, 1, 1, 4)
    aligned = rebalance_experts(shifted, 24, 1, 1, 4, previous=first.phy2log)
    np.testing.assert_allclose(np.sort(aligned.gpu_load, 1), np.sort(fresh.gpu_load, 1))  # as balanced
    assert aligned.moved_slots < int((fresh.phy2log != first.phy2log).sum())  # but fewer weights move
    check_invariants(aligned, 16, 4)


@pytest.mark.parametrize("args, argument", [
    (dict(num_replicas=18, num_gpus=4), "num_gpus"),  # replicas not divisible by GPUs
    (dict(num_groups=5), "num_groups"),  # groups not dividing experts
    (dict(num_nodes=3), "num_nodes"),  # nodes not dividing GPUs
    (dict(num_replicas=8), "num_replicas"),  # fewer slots than experts
])
def test_bad_inputs_name_them(args, argument):
    kwargs = dict(num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8) | args
    with pytest.raises(ValueError, match=argument):
        rebalance_experts(README_WEIGHT, **kwargs)
    with pytest.raises(ValueError, match="weight"):
        rebalance_experts(-README_WEIGHT, 16, 4, 2, 8)


def _eplb_config(micro_config):
    return micro_config.replace(moe=dataclasses.replace(micro_config.moe, num_physical_experts=12, eplb_gpus=4))


def test_outputs_are_identical_before_and_after_a_rebalance(micro_config):
    from jaxseek.config import TrainConfig
    mc = _eplb_config(micro_config)
    graphdef, state = init_train_state(mc, TrainConfig())
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, 256)
    before = nnx.merge(graphdef, state.params, state.model_state)(tokens)
    skewed = np.tile(np.array([500.0, 1, 1, 200, 3, 4, 5, 6]), (2, 1))
    new_state, report = rebalance(state, graphdef, mc, skewed, EPLBConfig(min_improvement=0.0))
    assert report.moved_slots > 0 and report.balancedness_after > report.balancedness_before
    assert not np.array_equal(current_placements(graphdef, new_state.params, new_state.model_state),
                              current_placements(graphdef, state.params, state.model_state))
    after = nnx.merge(graphdef, new_state.params, new_state.model_state)(tokens)
    np.testing.assert_allclose(np.asarray(after.logits), np.asarray(before.logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(after.expert_load), np.asarray(before.expert_load))


def test_replicas_stay_identical_through_training_steps(micro_config):
    from jaxseek.config import TrainConfig
    mc = _eplb_config(micro_config)
    tc = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1)
    graphdef, state = init_train_state(mc, tc)
    state, _ = rebalance(state, graphdef, mc, np.tile(np.arange(1.0, 9.0), (2, 1)) ** 3, EPLBConfig(min_improvement=0))
    step = make_train_step(graphdef, mc, tc)
    for i in range(3):
        state, _ = step(state, jax.random.randint(jax.random.key(i), (4, 18), 0, 256))
    model = nnx.merge(graphdef, state.params, state.model_state)
    for stack in model.moe_layers():
        for phy2log, weights in zip(np.asarray(stack.phy2log[...]), np.asarray(stack.w_gate[...])):  # per layer
            for expert in range(8):
                slots = np.flatnonzero(phy2log == expert)
                for slot in slots[1:]:
                    np.testing.assert_array_equal(weights[slot], weights[slots[0]])


def test_eplb_command_writes_placement_and_heat_map(tmp_path, capsys):
    rows = [{"layer": layer, "expert": expert, "load": float((expert + 1) ** 2 * (layer + 1))}
            for layer in range(3) for expert in range(16)]
    pl.DataFrame(rows).write_parquet(tmp_path / "loads.parquet")
    assert main(["eplb", "--loads", str(tmp_path / "loads.parquet"), "--replicas", "24", "--groups", "4",
                 "--nodes", "2", "--gpus", "4", "--out", str(tmp_path / "out")]) == 0
    assert "->" in capsys.readouterr().out
    placement = pl.read_parquet(tmp_path / "out" / "placement.parquet")
    assert placement.height == 3 * 24 and set(placement["gpu"].to_list()) == {0, 1, 2, 3}
    assert (tmp_path / "out" / "gpu_load.png").stat().st_size > 5_000


def test_training_rebalances_on_schedule_and_logs_balancedness(micro_config, tmp_path):
    from rich.console import Console

    from jaxseek.config import TrainConfig
    from jaxseek.data import load_stdlib_corpus
    from jaxseek.train import train
    tc = TrainConfig(steps=6, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=6, eval_every=6,
                     eplb=EPLBConfig(every=3, min_improvement=0.0))
    result = train(_eplb_config(micro_config), tc, tmp_path / "run", corpus=load_stdlib_corpus(max_bytes=1_000_000),
                   console=Console(quiet=True), show_progress=False)
    rebalanced = [r["step"] for r in result.log.rows if r["eplb_moved_slots"] is not None]
    assert rebalanced == [3]  # every 3 steps, not after the last one
    row = result.log.rows[2]
    assert row["eplb_balancedness_after"] >= row["eplb_balancedness_before"]
    assert all(0 < r["eplb_balancedness"] <= 1 for r in result.log.rows)
    frame = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert frame["eplb_moved_slots"].drop_nulls().to_list() == [row["eplb_moved_slots"]]
