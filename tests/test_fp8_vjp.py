"""FP8 training: the custom VJPs against exact gradients, and the model trained with ``fp8``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console

from flax import nnx

from jaxseek.config import TrainConfig
from jaxseek.model.experts import get_grouped_matmul
from jaxseek.model.layers import Dense
from jaxseek.model.moe import MoE
from jaxseek.model.transformer import Transformer
from jaxseek.data import load_stdlib_corpus
from jaxseek.train import train
from pallas_kernels.fp8_gemm.vjp import FP8Recipe, fp8_grouped_linear, fp8_linear
from pallas_kernels.numerics import calc_diff


def _vjp_pair(fn, reference, primals, seed):
    """(fn outputs and cotangents, reference outputs and cotangents) for one random output cotangent."""
    out, pullback = jax.vjp(fn, *primals)
    ref_out, ref_pullback = jax.vjp(reference, *primals)
    cotangent = jax.random.normal(jax.random.key(seed), out.shape, out.dtype)
    return (out, *pullback(cotangent)), (ref_out, *ref_pullback(cotangent))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", ["xla", pytest.param("interpret", marks=pytest.mark.slow)])
def test_fp8_linear_forward_dgrad_wgrad(implementation):
    x = jax.random.normal(jax.random.key(0), (2, 70, 256))  # 140 tokens: wgrad pads them to 256
    w = jax.random.normal(jax.random.key(1), (96, 256)) * 0.05
    ours, exact = _vjp_pair(lambda x, w: fp8_linear(x, w, implementation), lambda x, w: x @ w.T, (x, w), 2)
    for name, a, b in zip(("y", "dx", "dw"), ours, exact):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert calc_diff(a, b) < 1e-3, name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", ["xla", pytest.param("interpret", marks=pytest.mark.slow)])
def test_fp8_grouped_linear_with_ragged_and_empty_groups(implementation):
    sizes = jnp.array([30, 0, 150, 15], jnp.int32)  # 195 of 200 rows; the last 5 belong to no group
    x = jax.random.normal(jax.random.key(3), (200, 128))
    w = jax.random.normal(jax.random.key(4), (4, 64, 128)) * 0.05
    group = jnp.repeat(jnp.arange(4), sizes, total_repeat_length=200)
    valid = (jnp.arange(200) < 195)[:, None]

    def exact(x, w):
        return jnp.einsum("mk,mnk->mn", x, w[group]) * valid

    ours, reference = _vjp_pair(lambda x, w: fp8_grouped_linear(x, w, sizes, implementation), exact, (x, w), 5)
    for name, a, b in zip(("y", "dx", "dw"), ours, reference):
        assert calc_diff(a, b) < 1e-3, name
    np.testing.assert_array_equal(np.asarray(ours[2][1]), 0.0)  # the empty expert gets no gradient


RECIPES = [FP8Recipe(True, False, False), FP8Recipe(False, True, False), FP8Recipe(False, False, True),
           FP8Recipe(True, True, False)]


def _check_recipe(recipe, ours, high_precision, exact):
    """Each of (y, dx, dw) is bit-equal to the high-precision GEMM unless the recipe quantises it, and then it
    differs from it yet tracks the exact product."""
    for name, in_fp8, a, hp, b in zip(("y", "dx", "dw"), (recipe.forward, recipe.dgrad, recipe.wgrad), ours,
                                      high_precision, exact):
        if in_fp8:
            assert not np.array_equal(np.asarray(a), np.asarray(hp)), name
            assert calc_diff(a, b) < 1e-3, name
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(hp), err_msg=name)


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_fp8_recipe_quantises_only_the_gemms_it_names(recipe):
    x = jax.random.normal(jax.random.key(6), (140, 256))
    w = jax.random.normal(jax.random.key(7), (96, 256)) * 0.05
    ours, exact = _vjp_pair(lambda x, w: fp8_linear(x, w, "xla", recipe), lambda x, w: x @ w.T, (x, w), 8)
    high_precision, _ = _vjp_pair(lambda x, w: fp8_linear(x, w, "xla", FP8Recipe(False, False, False)),
                                  lambda x, w: x @ w.T, (x, w), 8)
    _check_recipe(recipe, ours, high_precision, exact)

    sizes = jnp.array([60, 0, 70], jnp.int32)  # 130 of 140 rows
    wg = jax.random.normal(jax.random.key(9), (3, 96, 256)) * 0.05
    group = jnp.repeat(jnp.arange(3), sizes, total_repeat_length=140)
    valid = (jnp.arange(140) < 130)[:, None]
    grouped_exact = lambda x, w: jnp.einsum("mk,mnk->mn", x, w[group]) * valid  # noqa: E731
    moe_matmul = get_grouped_matmul("fp8", fp8_recipe=recipe)  # the MoE layer's way in: w [g, in, out]
    ours, exact = _vjp_pair(lambda x, w: moe_matmul(x, jnp.swapaxes(w, 1, 2), sizes), grouped_exact, (x, wg), 10)
    high_precision, _ = _vjp_pair(lambda x, w: fp8_grouped_linear(x, w, sizes, "xla", FP8Recipe(False, False, False)),
                                  grouped_exact, (x, wg), 10)
    _check_recipe(recipe, ours, high_precision, exact)


def test_fp8_gemms_config_is_validated_and_reaches_the_layers(micro_config):
    with pytest.raises(ValueError, match="fp8_gemms"):
        micro_config.replace(fp8_gemms="forward,fwd")
    with pytest.raises(ValueError, match="fp8_gemms"):
        micro_config.replace(fp8_gemms="")
    assert micro_config.fp8_recipe is None
    assert micro_config.with_fp8("forward,wgrad").fp8_recipe == FP8Recipe(True, False, True)
    assert micro_config.with_fp8().fp8_recipe == FP8Recipe(True, True, True)
    config = micro_config.with_fp8("forward,wgrad")
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    recipes = [module.fp8 for _, module in nnx.iter_graph(model) if isinstance(module, (Dense, MoE))]
    assert recipes.count(FP8Recipe(True, False, True)) > 10 and set(recipes) == {FP8Recipe(True, False, True), None}
    assert recipes.count(None) == 1  # the output head (MTP shares it) stays in the compute dtype


@pytest.mark.slow
def test_fp8_model_trains_and_tracks_the_fp32_model(micro_config, tmp_path):
    corpus = load_stdlib_corpus(max_bytes=1_000_000)
    tc = TrainConfig(steps=30, batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=3, eval_every=30,
                     checkpoint_every=30)
    runs = {name: train(config, tc, tmp_path / name, corpus=corpus, console=Console(quiet=True), show_progress=False)
            for name, config in (("fp32", micro_config), ("fp8", micro_config.with_fp8()))}
    fp8, fp32 = runs["fp8"].log.losses(), runs["fp32"].log.losses()
    assert np.isfinite(fp8).all() and fp8[-1] < fp8[0] - 1.0
    assert abs(fp8[-1] - fp32[-1]) / fp32[-1] < 0.05
    assert runs["fp8"].state.params["moe_blocks"]["layers"]["ffn"]["w_gate"][...].dtype == jnp.float32  # fp32 masters
