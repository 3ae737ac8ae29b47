import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseek.model.moe import MoE
from jaxseek.model.transformer import Block, Transformer


def test_output_shapes_and_expert_load(micro_config):
    model = Transformer(micro_config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 10 + micro_config.mtp_depth), 0, 256)
    out = model(tokens)
    assert out.logits.shape == (3, 10, 256) and out.logits.dtype == jnp.float32
    assert out.mtp_logits.shape == (micro_config.mtp_depth, 3, 10, 256)
    moe_layers = micro_config.num_moe_layers + micro_config.mtp_depth  # the MTP block is a MoE block too
    assert out.expert_load.shape == (moe_layers, micro_config.moe.num_routed_experts)
    np.testing.assert_array_equal(np.asarray(out.expert_load.sum(-1)), 30 * micro_config.moe.num_experts_per_token)
    assert len(model.moe_layers()) == moe_layers
    no_mtp = model(tokens[:, :10], with_mtp=False)
    np.testing.assert_array_equal(np.asarray(no_mtp.logits), np.asarray(out.logits))


def test_first_k_dense_layers_are_dense(micro_config):
    model = Transformer(micro_config.replace(num_layers=3, first_k_dense=2), rngs=nnx.Rngs(0))
    assert [b.is_moe for b in model.blocks] == [False, False, True]


def test_model_forms_agree(micro_config):
    model = Transformer(micro_config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 256)
    a = model(tokens, form="expanded").logits
    b = model(tokens, form="absorbed").logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_a_block_is_a_pure_function_of_its_parameters(micro_config):
    """What a pipeline stage needs: split a block, run it from (params, hidden, positions) alone."""
    model = Transformer(micro_config, rngs=nnx.Rngs(0))
    block = model.blocks[1]
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    @jax.jit
    def stage(params, rest, h, positions):
        return nnx.merge(graphdef, params, rest)(h, positions)

    h = jax.random.normal(jax.random.key(3), (2, 7, micro_config.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    out, stats = stage(params, rest, h, positions)
    direct, direct_stats = block(h, positions)
    np.testing.assert_allclose(np.asarray(out), np.asarray(direct), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert), np.asarray(direct_stats.tokens_per_expert))
    assert isinstance(block, Block) and isinstance(block.ffn, MoE)


def test_expert_bias_update_reaches_every_moe_layer(micro_config):
    model = Transformer(micro_config, rngs=nnx.Rngs(0))
    load = jnp.tile(jnp.arange(micro_config.moe.num_routed_experts), (len(model.moe_layers()), 1))
    model.update_expert_bias(load)
    for layer in model.moe_layers():
        bias = np.asarray(layer.expert_bias[...])
        assert bias[0] > 0 > bias[-1]
