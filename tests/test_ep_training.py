"""Expert-parallel training (MoE strategy "ep") on 8 fake devices: the single-device losses for the same
parameters and batches, with EPLB off and on; replica gradients summed over ep; drops never silent."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console

from jaxseek.config import EPLBConfig, TrainConfig
from jaxseek.data import load_stdlib_corpus
from jaxseek.expert_placement import _replica_sums, _replica_sums_over_ep
from jaxseek.model.experts import check_expert_parallel
from jaxseek.train import check_drops, train
from sharding.mesh import make_mesh

TC = TrainConfig(steps=3, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=3, eval_every=3)


def _with_replicas(mc, slots: int, gpus: int):
    return mc.replace(moe=dataclasses.replace(mc.moe, num_physical_experts=slots, eplb_gpus=gpus))


@pytest.fixture(scope="module")
def quiet():
    return dict(corpus=load_stdlib_corpus(max_bytes=1_000_000), console=Console(quiet=True), show_progress=False)


@pytest.mark.slow
def test_ep8_training_with_eplb_gives_the_single_device_losses(micro_config, devices, tmp_path, quiet):
    """--ep 8 with 16 slots (2 per rank) rebalanced every step: the MoE layers run dispatch -> local experts
    -> combine, replica gradients are summed over ep, a rebalance moves weights and Adam moments between
    ranks, and the losses equal one device's. (EPLB off, dp=2 x ep=4: tests/test_sharded_training.py.)"""
    mc = _with_replicas(micro_config, 16, 8)
    tc = TC.replace(eplb=EPLBConfig(every=1, min_improvement=0.0))
    one = train(mc, tc, tmp_path / "one", mesh=make_mesh(devices=devices[:1]), **quiet)
    ep = train(mc, tc, tmp_path / "ep", mesh=make_mesh(dp=1, ep=8, devices=devices), rules="ep", **quiet)
    np.testing.assert_allclose(ep.log.losses(), one.log.losses(), rtol=2e-5)
    assert all(row["dropped_tokens"] == 0 for row in ep.log.rows)
    assert sum(row["eplb_moved_slots"] or 0 for row in ep.log.rows) > 0  # weights and moments really moved
    w_gate = ep.state.params["moe_blocks"]["layers"]["ffn"]["w_gate"][...]
    assert w_gate.addressable_shards[0].data.shape[1] == 2  # slot s on rank s // 2


def test_replica_gradients_are_summed_over_ep_by_exchanging_only_the_redundant_rows(devices):
    rng = np.random.default_rng(0)
    experts, slots, layers = 6, 8, 2  # 2 redundant slots on 4 ranks of 2 slots
    phy2log = np.array([[0, 1, 2, 3, 4, 5, 0, 3], [5, 4, 3, 2, 1, 0, 1, 1]], np.int32)
    logcnt = np.stack([np.bincount(p, minlength=experts) for p in phy2log]).astype(np.int32)
    grad = jnp.asarray(rng.normal(size=(layers, slots, 3, 5)), jnp.float32)
    mesh = make_mesh(dp=2, ep=4, devices=devices)
    sharded = jax.device_put(grad, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "ep")))
    summed = jax.jit(lambda g: _replica_sums_over_ep(g, phy2log, logcnt, mesh))(sharded)
    np.testing.assert_allclose(np.asarray(summed), np.asarray(_replica_sums(grad, phy2log, logcnt)), rtol=1e-6)
    assert np.allclose(np.asarray(summed)[1, 6], np.asarray(grad)[1, [4, 6, 7]].sum(0), rtol=1e-6)  # 3 replicas
    jaxpr = jax.make_jaxpr(lambda g: _replica_sums_over_ep(g, phy2log, logcnt, mesh))(grad)
    psums = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "psum"]
    assert [tuple(v.aval.shape) for e in psums for v in e.invars] == [(layers, slots - experts, 3, 5)]


def test_expert_slots_must_fit_the_ep_ranks(micro_config, devices):
    mesh = make_mesh(dp=2, ep=4, devices=devices)
    with pytest.raises(ValueError, match="moe.eplb_gpus"):
        check_expert_parallel(_with_replicas(micro_config, 12, 2).moe, mesh)
    with pytest.raises(ValueError, match="moe.num_physical_experts"):
        check_expert_parallel(_with_replicas(micro_config, 10, 2).moe, mesh)
    with pytest.raises(ValueError, match="moe.num_routed_experts"):
        check_expert_parallel(micro_config.moe, make_mesh(dp=1, ep=6, devices=devices[:6]))  # 8 experts, 6 ranks
    check_expert_parallel(_with_replicas(micro_config, 12, 4).moe, mesh)


@pytest.mark.slow
def test_drops_are_counted_in_the_metrics_under_the_drop_policy(micro_config, devices, tmp_path, quiet):
    tight = dataclasses.replace(micro_config.moe, capacity_factor=0.2, drop_policy="drop")
    counted = train(micro_config.replace(moe=tight), TC.replace(steps=2), tmp_path / "drop",
                    mesh=make_mesh(dp=1, ep=8, devices=devices), rules="ep", **quiet)
    assert all(row["dropped_tokens"] > 0 for row in counted.log.rows)
    import polars as pl
    assert (pl.read_parquet(tmp_path / "drop" / "metrics.parquet")["dropped_tokens"] > 0).all()


def test_the_raise_policy_stops_on_the_first_drop(micro_config):
    check_drops(micro_config, 3, 0, 2)  # nothing dropped: nothing to do
    with pytest.raises(RuntimeError, match="step 3: .*dropped 5 .*moe.capacity_factor=0.0.*up to step 2"):
        check_drops(micro_config, 3, 5, 2)
    check_drops(micro_config.replace(moe=dataclasses.replace(micro_config.moe, drop_policy="drop")), 3, 5, 2)
