import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseek.model.loss import language_model_loss
from jaxseek.model.moe import MoE
from jaxseek.model.transformer import Block, Transformer, expert_statistics


def _tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256)


@pytest.fixture(scope="module")
def micro_model(micro_config):
    """One model of the micro config (building a stacked model compiles its initialiser); tests that change
    it work on ``nnx.clone``s."""
    return Transformer(micro_config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def deep_model(micro_config):
    """Two dense and three MoE layers: enough to cut the MoE stack into stages."""
    return Transformer(micro_config.replace(num_layers=5, first_k_dense=2), rngs=nnx.Rngs(0))


def test_output_shapes_and_expert_load(micro_config, micro_model):
    model = micro_model
    tokens = _tokens(1, (3, 10 + micro_config.mtp_depth))
    out = model(tokens)
    assert out.logits.shape == (3, 10, 256) and out.logits.dtype == jnp.float32
    assert out.mtp_logits.shape == (micro_config.mtp_depth, 3, 10, 256)
    moe_layers = micro_config.num_moe_layers + micro_config.mtp_depth  # the MTP block is a MoE block too
    assert out.expert_load.shape == (moe_layers, micro_config.moe.num_routed_experts)
    np.testing.assert_array_equal(np.asarray(out.expert_load.sum(-1)), 30 * micro_config.moe.num_experts_per_token)
    no_mtp = model(tokens[:, :10], with_mtp=False)
    np.testing.assert_array_equal(np.asarray(no_mtp.logits), np.asarray(out.logits))


def test_blocks_live_in_one_stack_per_kind(micro_config, deep_model):
    model = deep_model
    assert model.dense_blocks.num_layers == 2 and model.moe_blocks.num_layers == 3
    assert not model.dense_blocks.layer(1).is_moe and model.moe_blocks.layer(0).is_moe
    w_gate = model.moe_blocks.layers.ffn.w_gate
    assert w_gate.shape[0] == 3 and w_gate.get_metadata("logical_axes") == ("layers", "experts", "embed", "expert_mlp")
    all_moe = Transformer(micro_config.replace(first_k_dense=0), rngs=nnx.Rngs(0))
    assert all_moe.dense_blocks is None and all_moe(_tokens(0, (1, 5))).logits.shape == (1, 4, 256)


def _unrolled(model: Transformer, tokens):
    """The model's forward pass with a Python loop over every layer (no scan), MTP left out."""
    positions = model.positions(tokens.shape[0], tokens.shape[1])
    h, loads = model.embed(tokens), []
    for stack in (model.dense_blocks, model.moe_blocks):
        for i in range(stack.num_layers):
            h, stats = stack.layer(i)(h, positions)
            if stats is not None:
                loads.append(stats.tokens_per_expert)
    return model.logits(h), jnp.stack(loads)


def test_scanned_model_equals_the_unrolled_one(deep_model):
    model = deep_model
    tokens = _tokens(4, (2, 9))
    out = model(tokens, with_mtp=False)
    logits, load = _unrolled(model, tokens)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.expert_load), np.asarray(load))


def test_stages_compose_to_the_model_and_a_stage_is_a_slice_of_a_stack(deep_model):
    """What a pipeline needs: pre-stage, any cut of the MoE stack, post-stage (with the loss)."""
    model = deep_model
    mc = model.config
    tokens = _tokens(6, (2, 12 + 1 + mc.mtp_depth))
    seq = 12
    positions = model.positions(2, seq)
    h = model.pre_stage(tokens[:, :seq], positions)
    first, second = model.moe_blocks.slice(0, 1), model.moe_blocks.slice(1, 3)
    assert first.num_layers == 1 and second.num_layers == 2
    graphdef, state = nnx.split(second)

    @jax.jit
    def stage(state, h):  # a stage is a pure function of its parameters and activations
        return nnx.merge(graphdef, state)(h, positions)

    h, stats_a = first(h, positions)
    h, stats_b = stage(state, h)
    head = model.post_stage(h, tokens[:, :seq + mc.mtp_depth], positions)
    full = model(tokens[:, :seq + mc.mtp_depth])
    np.testing.assert_allclose(np.asarray(head.logits), np.asarray(full.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(head.mtp_logits), np.asarray(full.mtp_logits), rtol=1e-5, atol=1e-5)
    load, _ = expert_statistics([stats_a, stats_b, head.mtp_stats], mc.moe.num_routed_experts)
    np.testing.assert_array_equal(np.asarray(load), np.asarray(full.expert_load))
    with pytest.raises(ValueError, match="start, stop"):
        model.moe_blocks.slice(2, 9)


@pytest.mark.parametrize("remat", ["block", "attention"])
def test_remat_changes_memory_not_results(micro_config, remat):
    tokens = _tokens(7, (2, 10 + 1 + micro_config.mtp_depth))

    def loss_and_grads(mc):
        graphdef, params, rest = nnx.split(Transformer(mc, rngs=nnx.Rngs(0)), nnx.Param, ...)
        return jax.jit(jax.value_and_grad(
            lambda p: language_model_loss(nnx.merge(graphdef, p, rest, copy=True), tokens)[0]))(params)

    plain_loss, plain_grads = loss_and_grads(micro_config)
    loss, grads = loss_and_grads(micro_config.replace(remat=remat))
    np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_model_forms_agree(micro_model):
    model = micro_model
    tokens = _tokens(2, (2, 9))
    a = model(tokens, form="expanded").logits
    b = model(tokens, form="absorbed").logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_a_block_is_a_pure_function_of_its_parameters(micro_config, micro_model):
    model = micro_model
    block = model.moe_blocks.layer(0)
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


def test_expert_bias_update_reaches_every_moe_layer(micro_config, micro_model):
    model = nnx.clone(micro_model)
    layers = micro_config.num_moe_layers + micro_config.mtp_depth
    model.update_expert_bias(jnp.tile(jnp.arange(micro_config.moe.num_routed_experts), (layers, 1)))
    for stack in model.moe_layers():
        for bias in np.asarray(stack.expert_bias[...]):
            assert bias[0] > 0 > bias[-1]


def test_max_seq_len_is_honoured(micro_config):
    model = Transformer(micro_config.replace(max_seq_len=8), rngs=nnx.Rngs(0))
    model(_tokens(0, (1, 8)), with_mtp=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(0, (1, 9)), with_mtp=False)


def test_embedding_is_initialised_with_init_std(micro_config):
    model = Transformer(micro_config.replace(vocab_size=4096, init_std=0.02), rngs=nnx.Rngs(0))
    assert abs(float(np.std(np.asarray(model.embed.embedding[...]))) / 0.02 - 1) < 0.05


def test_mtp_module_k_reads_token_i_plus_k_in_the_released_layout(micro_model):
    """h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]), one block, the module's own norm, the shared head."""
    model = nnx.clone(micro_model)
    for name in ("enorm", "hnorm", "norm"):  # distinct norms, so swapping or sharing one shows
        norm = getattr(model.mtp, name)
        norm.scale[...] = jax.random.uniform(jax.random.key(hash(name) % 97), norm.scale.shape, minval=0.5, maxval=2)
    tokens = _tokens(8, (2, 11))
    out = model(tokens)  # seq 10, one MTP depth
    positions = model.positions(2, 10)
    h, _ = model.moe_stage(model.pre_stage(tokens[:, :10], positions), positions)
    module = nnx.merge(*(lambda g, s: (g, jax.tree.map(lambda x: x[0], s)))(*nnx.split(model.mtp)))
    mixed = module.eh_proj(jnp.concatenate([module.enorm(model.embed(tokens[:, 1:11])), module.hnorm(h)], -1))
    expected = model.head(module.norm(module.block(mixed, positions)[0]))
    np.testing.assert_allclose(np.asarray(out.mtp_logits[0]), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # position i sees tokens up to i+1 only
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % 256)
    moved = model(changed).mtp_logits[0]
    np.testing.assert_array_equal(np.asarray(moved[:, :5]), np.asarray(out.mtp_logits[0][:, :5]))
    assert not np.allclose(np.asarray(moved[:, 5]), np.asarray(out.mtp_logits[0][:, 5]))
