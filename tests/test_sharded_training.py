"""The train state laid out by the sharding rules on 8 fake devices: what each device holds, and losses
equal to the replicated run."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from rich.console import Console

from jaxseek.cli import main
from jaxseek.config import TrainConfig
from jaxseek.data import load_stdlib_corpus
from jaxseek.train import train
from jaxseek.train_state import abstract_train_state, bytes_per_device, init_train_state
from sharding.mesh import make_mesh
from sharding.rules import get_rules, partition_spec

TC = TrainConfig(steps=3, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=3, eval_every=3)


def _shard_fraction(array: jax.Array) -> float:
    """The share of ``array`` that one device holds."""
    return array.addressable_shards[0].data.size / array.size


def test_rules_split_only_what_divides_and_use_each_mesh_axis_once():
    mesh = {"pp": 1, "dp": 2, "ep": 4}
    ep = get_rules("ep+zero1")
    assert partition_spec(("layers", "experts", "embed", "expert_mlp"), (3, 8, 32, 16), ep.params, mesh) == \
        PartitionSpec(None, "ep", None, None)
    assert partition_spec(("layers", "experts", "embed", "expert_mlp"), (3, 8, 32, 16), ep.moments, mesh) == \
        PartitionSpec(None, "ep", "dp", None)
    assert partition_spec(("layers", "experts", "embed", "expert_mlp"), (3, 6, 32, 16), ep.params, mesh) == \
        PartitionSpec(None, None, None, None)  # 6 experts do not split 4 ways: replicated, not an error
    assert partition_spec(("batch", "length", "embed"), (8, 5, 32), ep.activations, mesh) == \
        PartitionSpec(("dp", "ep"), None, None)
    pipelined = {**mesh, "pp": 2}  # stacked layers split over pipeline ranks where pp divides their count
    assert partition_spec(("layers", "experts", "embed", "expert_mlp"), (4, 8, 32, 16), ep.params, pipelined) == \
        PartitionSpec("pp", "ep", None, None)
    assert partition_spec(("layers", "embed", "mlp"), (3, 32, 16), get_rules("dp").params, pipelined) == \
        PartitionSpec(None, None, None)
    with pytest.raises(ValueError, match="logical_axes"):
        partition_spec(("embed",), (3, 4), ep.params, mesh)
    with pytest.raises(ValueError, match="rules"):
        get_rules("fsdp")


@pytest.mark.parametrize("rules, expert_share, moment_share, dense_moment_share", [
    ("ep", 1 / 4, 1 / 4, 1.0), ("zero1", 1.0, 1 / 2, 1 / 2), ("ep+zero1", 1 / 4, 1 / 8, 1 / 2)])
def test_each_device_holds_its_share_from_creation(micro_config, devices, rules, expert_share, moment_share,
                                                   dense_moment_share):
    mesh = make_mesh(dp=2, ep=4, devices=devices)
    _, state = init_train_state(micro_config, TC, mesh, rules)
    w_gate = state.params["moe_blocks"]["layers"]["ffn"]["w_gate"][...]
    mu = state.opt_state[0].mu["moe_blocks"]["layers"]["ffn"]["w_gate"][...]
    dense_mu = state.opt_state[0].mu["dense_blocks"]["layers"]["ffn"]["gate_proj"]["kernel"][...]
    assert _shard_fraction(w_gate) == expert_share
    assert _shard_fraction(mu) == moment_share
    assert _shard_fraction(dense_mu) == dense_moment_share
    assert state.params["embed"]["embedding"][...].sharding.is_fully_replicated
    held = bytes_per_device(abstract_train_state(micro_config, TC)[1], get_rules(rules), dict(mesh.shape))
    measured = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.opt_state))
    assert held.optimizer == measured


@pytest.mark.slow
def test_sharded_runs_give_the_replicated_losses_and_resume_sharded(micro_config, devices, tmp_path,
                                                                   compilation_cache):
    corpus = load_stdlib_corpus(max_bytes=1_000_000)
    quiet = dict(corpus=corpus, console=Console(quiet=True), show_progress=False)
    one = train(micro_config, TC, tmp_path / "one", mesh=make_mesh(devices=devices[:1]), **quiet)
    mesh = make_mesh(dp=2, ep=4, devices=devices)
    sharded = train(micro_config, TC, tmp_path / "ep", mesh=mesh, rules="ep+zero1", stop_after=2, **quiet)
    assert _shard_fraction(sharded.state.opt_state[0].nu["moe_blocks"]["layers"]["ffn"]["w_up"][...]) == 1 / 8
    resumed = train(micro_config, TC, tmp_path / "ep", mesh=mesh, rules="ep+zero1", resume=True, **quiet)
    np.testing.assert_allclose(resumed.log.losses(), one.log.losses(), rtol=2e-5)  # restored in its layout
    assert _shard_fraction(resumed.state.params["moe_blocks"]["layers"]["ffn"]["w_gate"][...]) == 1 / 4


def test_info_prints_bytes_per_device(capsys):
    assert main(["info", "--preset", "tiny", "--ep", "4", "--dp", "2", "--rules", "ep+zero1"]) == 0
    out = capsys.readouterr().out
    assert "parameter bytes per device (dp=2, ep=4, rules ep+zero1)" in out and "optimizer bytes" in out


def test_named_activations_follow_the_rules_inside_the_block_only(devices):
    from sharding.rules import activation_sharding, constrain
    mesh = make_mesh(dp=2, ep=4, devices=devices)
    x = jax.numpy.ones((8, 4, 16))
    assert constrain(x, ("batch", "length", "embed")) is x  # outside: nothing happens

    @jax.jit
    def named(x):
        with activation_sharding(mesh, get_rules("ep")):
            return constrain(x * 2, ("batch", "length", "embed"))

    assert named(x).sharding.spec[0] == ("dp", "ep") and not any(named(x).sharding.spec[1:])


def test_sharded_creation_never_builds_a_whole_expert_tensor(micro_config, devices):
    """The compiled initialiser holds expert weights only as shards ([layers, experts / ep, ...])."""
    import re
    from jaxseek.train_state import state_initializer
    hlo = state_initializer(micro_config, TC, make_mesh(dp=2, ep=4, devices=devices), "ep").lower().compile().as_text()
    moe, f = micro_config.moe, micro_config.moe.intermediate_size
    whole = f"[{micro_config.num_moe_layers},{moe.num_routed_experts},{micro_config.hidden_size},{f}]"
    shard = f"[{micro_config.num_moe_layers},{moe.num_routed_experts // 4},{micro_config.hidden_size},{f}]"
    assert shard in hlo and not re.search(re.escape(whole), hlo)


def test_the_train_step_pins_named_activations_to_the_mesh(micro_config, devices):
    from jaxseek.train_step import make_train_step
    mesh = make_mesh(dp=2, ep=4, devices=devices)
    graphdef, state = init_train_state(micro_config, TC, mesh, "ep")
    tokens = jax.numpy.zeros((TC.batch_size, TC.seq_len + 1 + micro_config.mtp_depth), jax.numpy.int32)
    pinned = make_train_step(graphdef, micro_config, TC, mesh=mesh, rules="ep").lower(state, tokens).as_text()
    free = make_train_step(graphdef, micro_config, TC).lower(state, tokens).as_text()  # no mesh: no named layout
    # each block pins at least its residual stream (forward and backward)
    assert pinned.count("sdy.sharding_constraint") >= free.count("sdy.sharding_constraint") + 2 * micro_config.num_layers
