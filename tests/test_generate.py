"""Generation over the paged cache against a non-paged reference decode, the page allocator, prefix reuse,
sampling, and the ``jaxseek generate`` command in a real process."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxseek.decode import paged_forward
from jaxseek.generate import Generator, SamplingConfig, load_model, sample
from jaxseek.kv_cache import InMemoryPrefixStore, PageAllocator, empty_pages
from jaxseek.model.transformer import Transformer
from sharding.mesh import make_mesh

PROMPTS = [list(b"import os\ndef main(argv):\n    "), list(b"class"),
           list(b"    def __init__(self, name, value=None):\n        self.name = name\n        self.value = v")]


def reference_greedy(model, prompt, steps, width=128):
    """Recomputes the whole sequence each step, no cache (padded to ``width``: causal, so the padding
    after the last real token changes nothing before it)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, with_mtp=False, form="absorbed").logits)
    sequence, generated = list(prompt), []
    for _ in range(steps):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(sequence)] = sequence
        generated.append(int(jnp.argmax(forward(state, jnp.asarray(tokens))[0, len(sequence) - 1])))
        sequence.append(generated[-1])
    return generated


def test_paged_prefill_logits_equal_the_model(trained_run):
    model = load_model(trained_run)
    tokens = jnp.asarray([PROMPTS[2][:70]], jnp.int32)
    allocator = PageAllocator(8, 4)
    allocator.reserve(0, 70)
    pages = empty_pages(model.config.num_layers, 8, model.config.mla.latent_dim)
    logits, _ = paged_forward(model, tokens, jnp.array([0]), jnp.array([70]), pages,
                              jnp.asarray(allocator.block_table([0])))
    expected = model(tokens, with_mtp=False).logits
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_a_non_paged_reference(trained_run):
    model = load_model(trained_run)
    outputs = Generator(model, num_blocks=16, max_blocks_per_seq=4).generate(PROMPTS, SamplingConfig(max_new_tokens=12))
    for prompt, output in zip(PROMPTS, outputs):
        assert output == reference_greedy(model, prompt, 12)


def test_a_batch_equals_each_request_alone_and_prefixes_are_reused(trained_run):
    model = load_model(trained_run)
    store = InMemoryPrefixStore()
    generator = Generator(model, num_blocks=16, max_blocks_per_seq=4, prefix_store=store)
    together = generator.generate(PROMPTS, SamplingConfig(max_new_tokens=6))
    assert generator.allocator.free_blocks == 16  # every page returned
    long_prompt = PROMPTS[2]
    assert store.lookup(tuple(long_prompt))[0] == 64  # its first page was stored
    alone = [generator.generate([p], SamplingConfig(max_new_tokens=6))[0] for p in PROMPTS]  # reuses the prefix
    assert together == alone


def test_page_allocator():
    allocator = PageAllocator(num_blocks=4, max_blocks_per_seq=3)
    allocator.reserve(7, 65)
    allocator.reserve(8, 64)
    assert allocator.free_blocks == 1
    table = allocator.block_table([7, 8])
    assert table.shape == (2, 3) and len({*table[0, :2], table[1, 0]}) == 3
    with pytest.raises(ValueError, match="full"):
        allocator.reserve(9, 129)
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        allocator.reserve(7, 64 * 3 + 1)
    allocator.release(7)
    assert allocator.free_blocks == 3


def test_sampling():
    logits = jnp.array([[0.0, 5.0, 4.9, -2.0], [3.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(0), 0.0, 1.0)), [1, 0])
    nucleus = [np.asarray(sample(logits, jax.random.key(i), 1.0, 0.3)) for i in range(20)]
    assert all((n == [1, 0]).all() for n in nucleus)  # top-p 0.3 keeps only the most likely token
    draws = np.stack([np.asarray(sample(logits, jax.random.key(i), 1.0, 1.0)) for i in range(200)])
    assert {1, 2} <= set(draws[:, 0])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_expert_parallel_generation_equals_one_device(trained_run, devices):
    """Experts over ep: DeepEP's normal mode in prefill, its low-latency mode in the one-token decode steps
    (three requests: the decode batch is padded to the 8 token shards with rows that select no expert)."""
    model = load_model(trained_run)
    sampling = SamplingConfig(max_new_tokens=8)
    one = Generator(model, num_blocks=16, max_blocks_per_seq=4).generate(PROMPTS, sampling)
    ep = Generator(model, num_blocks=16, max_blocks_per_seq=4, mesh=make_mesh(dp=1, ep=8, devices=devices))
    assert ep.state["moe_blocks"]["layers"]["ffn"]["w_up"][...].addressable_shards[0].data.shape[1] == 1  # 1 of 8
    assert ep.generate(PROMPTS, sampling) == one


def test_generate_command_streams_text(trained_run):
    """Through the command line, expert-parallel over 8 devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-m", "jaxseek", "generate", "--checkpoint", str(trained_run),
                             "--prompt", "def f(x):", "--max-new-tokens", "8", "--ep", "8"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("def f(x):") and "8 tokens in" in result.stdout


def latent128_model(compute_dtype: str):
    """One layer with a 128-wide latent and a 64-wide RoPE key (d = 192, dv = 128): the smallest MLA shape
    the kernel (d % 64 == 0, dv % 128 == 0) and the FP8 cache (dv % 128 == 0) take."""
    from jaxseek.config import MLAConfig, ModelConfig, MoEConfig
    from jaxseek.model.transformer import Transformer
    config = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1, first_k_dense=1,
                         mla=MLAConfig(num_heads=2, q_lora_rank=16, kv_lora_rank=128, qk_nope_head_dim=8,
                                       qk_rope_head_dim=64, v_head_dim=8),
                         moe=MoEConfig(num_routed_experts=4, num_shared_experts=1, num_experts_per_token=2,
                                       intermediate_size=16, n_group=2, topk_group=1),
                         mtp_depth=0, max_seq_len=256, compute_dtype=compute_dtype)
    return Transformer(config, rngs=nnx.Rngs(0))


def test_fp8_cache_stores_quantised_rows_and_generates(micro_config):
    """``kv_cache="fp8"``: the pages hold exactly the quantised rows of the model-dtype cache, decoding over
    them stays close to it, and prefixes stored from FP8 pages are reused bit for bit."""
    from pallas_kernels.mla_decode.fp8_cache import FP8KVCache, dequantize_kv_cache, quantize_kv_cache
    model = latent128_model("float32")
    prompt = list(b"def main():\n    return 0\n" * 3)  # 78 tokens: one whole page is stored as a prefix
    logits, rows = {}, {}
    for kv_cache in ("model", "fp8"):
        generator = Generator(model, num_blocks=8, max_blocks_per_seq=3, kv_cache=kv_cache)
        generator.allocator.reserve(0, len(prompt))
        logits[kv_cache] = np.asarray(generator.prefill(0, prompt))
        rows[kv_cache] = generator.pages.rows(generator.allocator.block_table([0])[0][:2])[0]  # [128, 192]
    assert isinstance(generator.pages.data, FP8KVCache)
    written = jnp.asarray(rows["model"][:len(prompt)].reshape(-1, 1, 192))
    expected = dequantize_kv_cache(quantize_kv_cache(jnp.pad(written, ((0, 128 - len(prompt)), (0, 0), (0, 0)))
                                                     .reshape(2, 64, 1, 192), 128), jnp.float32)
    np.testing.assert_array_equal(np.asarray(rows["fp8"][:len(prompt)], np.float32),
                                  np.asarray(expected).reshape(128, 192)[:len(prompt)])
    gap = np.abs(logits["fp8"] - logits["model"]).max()
    # measured: 2.5e-3 against a std of 0.11 (e4m3 keeps 3 mantissa bits; with the embedding drawn at init_std,
    # attention is a real share of the residual stream, so its cache error reaches the logits)
    assert 0 < gap < 0.05 * logits["model"].std(), gap
    store = InMemoryPrefixStore()
    generator = Generator(model, num_blocks=8, max_blocks_per_seq=3, prefix_store=store, kv_cache="fp8")
    assert len(generator.generate([prompt], SamplingConfig(max_new_tokens=5))[0]) == 5  # decode steps over FP8
    assert store.lookup(tuple(prompt))[0] == 64
    reuse = Generator(model, num_blocks=8, max_blocks_per_seq=3, prefix_store=store, kv_cache="fp8")
    reuse.allocator.reserve(9, 64)  # another sequence holds page 0: the prompt's first page is a fresh one
    reused_logits = np.asarray(reuse.prefill(0, prompt))  # its first 64 rows come from the store
    table = reuse.allocator.block_table([0])[0][:2]
    assert table[0] != 0
    np.testing.assert_array_equal(np.asarray(reuse.pages.rows(table)[0][:64], np.float32),
                                  np.asarray(rows["fp8"][:64], np.float32))
    np.testing.assert_allclose(reused_logits, logits["fp8"], rtol=0, atol=1e-5)  # measured: 0.0
    with pytest.raises(ValueError, match="kv_cache"):
        Generator(Transformer(micro_config, rngs=nnx.Rngs(0)), kv_cache="fp8")  # kv_lora_rank 16


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_decode_through_the_interpreted_kernel_matches_the_xla_path():
    """The model's paged prefill and a decode step with the split-KV Mosaic GPU kernel (interpreted) give the
    logits of the XLA path, on the smallest MLA shape the kernel takes (``latent128_model``)."""
    from jaxseek.kv_cache import write_rows
    from pallas_kernels.mla_decode.api import flash_mla_with_kvcache
    from pallas_kernels.mla_decode.metadata import get_mla_metadata
    model = latent128_model("bfloat16")
    config = model.config
    allocator = PageAllocator(8, 2)
    prompts = [list(b"def main():\n    return 0\n" * 3), list(b"x")]
    for seq, prompt in enumerate(prompts):
        allocator.reserve(seq, len(prompt) + 1)
    table = jnp.asarray(allocator.block_table([0, 1]))
    width = max(len(p) for p in prompts)
    tokens = np.zeros((2, width), np.int32)
    for seq, prompt in enumerate(prompts):
        tokens[seq, :len(prompt)] = prompt
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    results = {}
    for implementation in ("xla", "interpret"):
        pages = empty_pages(1, 8, config.mla.latent_dim, jnp.bfloat16)
        prefill, pages = paged_forward(model, jnp.asarray(tokens), jnp.zeros(2, jnp.int32), lengths, pages, table,
                                       implementation=implementation)
        step, _ = paged_forward(model, jnp.asarray([[7], [9]], jnp.int32), lengths, jnp.ones(2, jnp.int32), pages,
                                table, implementation=implementation)
        results[implementation] = (np.asarray(prefill, np.float32), np.asarray(step, np.float32))
        if implementation == "xla":  # the decode step's attention itself, on the model's own cache rows
            first_block = (model.dense_blocks or model.moe_blocks).layer(0)
            attn, new = first_block.attn, jnp.asarray([[7], [9]], jnp.int32)
            x = first_block.attn_norm(model.embed(new))
            positions = lengths[:, None]
            q = attn.absorb_queries(*attn.project_queries(x, positions))
            cache = write_rows(pages.data[0], attn.project_latent(x, positions), table, positions,
                               jnp.ones((2, 1), bool))
            metadata = get_mla_metadata(lengths + 1, config.mla.num_heads, 1)
            outs = [np.asarray(flash_mla_with_kvcache(q.astype(cache.dtype), cache, table, lengths + 1, 128, metadata,
                                                      attn.softmax_scale, implementation=name)[0], np.float32)
                    for name in ("xla", "interpret")]
            assert np.abs(outs[0]).max() > 0.1
            np.testing.assert_allclose(outs[1], outs[0], atol=1e-2, rtol=1e-2)
    for seq, prompt in enumerate(prompts):
        np.testing.assert_allclose(results["interpret"][0][seq, :len(prompt)], results["xla"][0][seq, :len(prompt)],
                                   atol=4e-3, rtol=0)
    np.testing.assert_allclose(results["interpret"][1], results["xla"][1], atol=4e-3, rtol=0)
