"""The 3FS KV-cache store (``storage.kvcache``): packed rows (FP8 bytes bit for bit), the hash chain, LRU
eviction under a capacity bound, corrupt and foreign blocks, and ``jaxseek generate`` reusing a prefix from
the store, in a later process too."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseek import cli
from jaxseek.generate import Generator, SamplingConfig, cache_fingerprint, load_model
from jaxseek.kv_cache import RowFormat, empty_pages
from storage.kvcache import ThreeFSPrefixStore, chain_keys, encode_block
from storage.location import open_location

PROMPT = ("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n"
          "    parser.add_argument('--out', default=None)\n    args = parser.parse_args(argv)\n    return 0\n# end\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One embedded 3FS for the module's store tests (each test takes its own directory in it)."""
    location = open_location(f"3fs+embedded://{tmp_path_factory.mktemp('kv3fs')}", create=True)
    yield location
    location.close()


@pytest.fixture
def place(cluster, request):
    return cluster.child(request.node.name.replace("[", "_").replace("]", ""))


def random_tokens(rng, n):
    return tuple(int(t) for t in rng.integers(0, 256, n))


def test_fp8_and_bf16_pages_round_trip_through_the_store_bit_for_bit(place):
    rng = np.random.default_rng(0)
    assert RowFormat("fp8", 61, 576, 512).row_bytes == 656  # DeepSeek-V3: 512 e4m3 + 4 float32 + 64 bf16
    assert RowFormat("bfloat16", 61, 576, 576).row_bytes == 1152
    latent = jnp.asarray(rng.normal(size=(2, 3 * 64, 192)) * 4, jnp.float32)  # [layers, tokens, d]
    for fp8 in (True, False):
        pages = empty_pages(2, 4, 192, jnp.bfloat16, fp8_value_dim=128 if fp8 else None)
        pages = pages.with_rows(np.array([3, 1, 2]), latent)
        packed = pages.packed_rows(np.array([3, 1]))  # [2, 128, row_bytes]
        if fp8:  # the reference: FlashMLA's row (values | per-token scales | rope), assembled with numpy
            parts = jax.tree.map(lambda x: np.asarray(x[:, [3, 1]]), pages.data)
            expected = np.concatenate([
                parts.values[:, :, :, 0].view(np.uint8),
                parts.scales[:, :, 0].transpose(0, 1, 3, 2).astype("<f4").view(np.uint8),
                parts.rope[:, :, :, 0].view(np.uint8)], -1).reshape(2, 128, 260)
            assert pages.row_format.row_bytes == 260 == 128 + 4 + 2 * 64
        else:
            expected = np.asarray(pages.data[:, [3, 1]][:, :, :, 0]).view(np.uint8).reshape(2, 128, 384)
        np.testing.assert_array_equal(packed, expected)
        store = ThreeFSPrefixStore(place.child("fp8" if fp8 else "bf16"), capacity_bytes=1 << 20, fingerprint="m")
        tokens = random_tokens(rng, 150)
        store.store(tokens[:128], packed)
        n, rows = store.lookup(tokens)  # longer than what was stored: the stored whole blocks come back
        assert n == 128 and rows.dtype == np.uint8
        np.testing.assert_array_equal(rows, packed)
        assert store.lookup(tokens[:100])[0] == 64 and store.lookup(tokens[:63]) == (0, None)
        fresh = empty_pages(2, 4, 192, jnp.bfloat16, fp8_value_dim=128 if fp8 else None)
        restored = fresh.with_packed_rows(np.array([0, 2]), rows)
        for got, want in zip(jax.tree.leaves(restored.data), jax.tree.leaves(pages.data)):
            np.testing.assert_array_equal(np.asarray(got[:, [0, 2]]).view(np.uint8),
                                          np.asarray(want[:, [3, 1]]).view(np.uint8))
        with pytest.raises(ValueError, match="packed"):
            fresh.with_packed_rows(np.array([0]), rows)


def test_keys_chain_every_block_before_them(place):
    rng = np.random.default_rng(1)
    a, b, c = (random_tokens(rng, 64) for _ in range(3))
    rows = rng.integers(0, 256, (2, 128, 16), dtype=np.uint8)
    store = ThreeFSPrefixStore(place, capacity_bytes=1 << 20, fingerprint="model-1")
    store.store(a + b, rows)
    assert chain_keys("model-1", a + b)[1] != chain_keys("model-1", c + b)[1]
    assert store.lookup(c + b) == (0, None)  # b's tokens after another prefix: another key
    n, got = store.lookup(a + c)
    assert n == 64 and (got == rows[:, :64]).all()
    assert ThreeFSPrefixStore(place, capacity_bytes=1 << 20, fingerprint="model-2").lookup(a + b) == (0, None)
    # a block of another model placed at this model's key (a copied file) is foreign: a miss, left in place
    other = ThreeFSPrefixStore(place, capacity_bytes=1 << 20, fingerprint="model-2")
    key = chain_keys("model-2", a)[0]
    with place.client.open(other.block_path(key), "wb") as file:
        file.write(encode_block("model-1", key, 0, rows[:, :64]))
    assert other.lookup(a) == (0, None) and place.client.exists(other.block_path(key))
    with pytest.raises(ValueError, match="rows"):
        store.store(a + b, rows[:, :100])


def test_lru_eviction_keeps_the_capacity_and_drops_extensions_before_prefixes(place):
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, (2, 128, 16), dtype=np.uint8)
    a, b, c, d, e, f = (random_tokens(rng, 128) for _ in range(6))
    probe = ThreeFSPrefixStore(place.child("probe"), capacity_bytes=1 << 20, fingerprint="m")
    probe.store(a[:64], rows)
    block = probe.usage_bytes()
    store = ThreeFSPrefixStore(place, capacity_bytes=3 * block, fingerprint="m", low_water=1.0)
    hits = lambda tokens: store.lookup(tokens)[0]  # noqa: E731
    for tokens in (a, b, c):
        store.store(tokens[:64], rows)
    assert store.usage_bytes() == 3 * block
    assert hits(a) == 64  # a is used again: b is now the least recently used
    store.store(d[:64], rows)
    assert [hits(t) for t in (a, b, c, d)] == [64, 0, 64, 64] and store.usage_bytes() <= 3 * block
    assert hits(a) == 64 and hits(d) == 64  # recency now c < a < d
    store.store(e, rows)  # two blocks: c and a go
    assert [hits(t) for t in (a, c, d, e)] == [0, 0, 64, 128] and store.usage_bytes() <= 3 * block
    store.store(f, rows)  # two more go: d, then e's second block (older than its first: touched deepest first)
    assert hits(e) == 64 and hits(f) == 128 and hits(d) == 0
    assert store.usage_bytes() == 3 * block
    # a second process sharing the location evicts what the first stored: the first then reads a miss
    other = ThreeFSPrefixStore(place, capacity_bytes=3 * block, fingerprint="m", low_water=1.0)
    other.store(b, rows)
    other.store(c[:64], rows)
    assert hits(e) == 0 and hits(f) == 0 and hits(b) == 128
    with pytest.raises(ValueError, match="capacity_bytes"):
        ThreeFSPrefixStore(place, capacity_bytes=0, fingerprint="m")


def test_a_corrupt_block_is_a_miss_and_removed(place):
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (2, 192, 16), dtype=np.uint8)
    tokens = random_tokens(rng, 192)
    store = ThreeFSPrefixStore(place, capacity_bytes=1 << 20, fingerprint="m")
    store.store(tokens, rows)
    first, second, third = (store.block_path(key) for key in chain_keys("m", tokens))
    size = place.client.stat(second).size
    with place.client.open(second, "r+b") as file:  # one payload byte flipped
        byte = file.pread(1, size - 100)
        file.pwrite(bytes([byte[0] ^ 1]), size - 100)
    n, got = store.lookup(tokens)
    assert n == 64 and (got == rows[:, :64]).all()
    assert not place.client.exists(second) and place.client.exists(third)  # removed; the rest unreachable
    with place.client.open(first, "r+b") as file:  # a torn write / a block cut short by its removal
        file.truncate(size // 2)
    assert store.lookup(tokens) == (0, None) and not place.client.exists(first)
    store.store(tokens, rows)  # stored again: whole
    np.testing.assert_array_equal(store.lookup(tokens)[1], rows)


def test_bad_urls_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="ftp"):
        ThreeFSPrefixStore("ftp://host/kv", capacity_bytes=1 << 20, fingerprint="m")
    with pytest.raises(ValueError, match="no 3FS cluster"):
        ThreeFSPrefixStore(f"3fs+tcp://{tmp_path}/none", capacity_bytes=1 << 20, fingerprint="m")
    with pytest.raises(ValueError, match="fingerprint"):
        ThreeFSPrefixStore(str(tmp_path), capacity_bytes=1 << 20, fingerprint="")


def test_a_hit_gives_the_tokens_of_no_cache_with_fewer_prefill_tokens(trained_run, tmp_path):
    from flax import nnx
    model = load_model(trained_run)
    prompt = list(PROMPT.encode())[:100]  # the shapes of test_generate's prompts: compiled once in a session
    sampling = SamplingConfig(max_new_tokens=4)
    reference = Generator(model, num_blocks=16, max_blocks_per_seq=4).generate([prompt], sampling)
    fingerprint = cache_fingerprint(model)
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.01 if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
    assert fingerprint != cache_fingerprint(other)  # other weights (another step, another run)
    url = f"3fs+embedded://{tmp_path}/kv"
    for expected_reused in (0, 64):  # a second store on the same URL: as a later process would
        with ThreeFSPrefixStore(url, capacity_bytes=1 << 20, fingerprint=fingerprint) as store:
            generator = Generator(model, num_blocks=16, max_blocks_per_seq=4, prefix_store=store)
            assert generator.generate([prompt], sampling) == reference
            assert (generator.prefill_tokens_reused, generator.prefill_tokens_computed) == (
                expected_reused, 100 - expected_reused)
    with ThreeFSPrefixStore(url, capacity_bytes=1 << 20, fingerprint="another model") as store:
        with pytest.raises(ValueError, match="fingerprint"):
            Generator(model, prefix_store=store)


@pytest.mark.slow
def test_generate_in_a_second_process_reuses_the_prefix_the_first_stored(trained_run, tmp_path, capsys):
    """``jaxseek generate`` in this process stores the prompt's pages at the run's storage; a second
    ``python -m jaxseek generate`` on the run prints the same text, computing only the tokens after them."""
    command = ["generate", "--checkpoint", str(trained_run), "--prompt", PROMPT, "--max-new-tokens", "3"]
    assert cli.main(command) == 0  # the default store: the run's storage, kvcache/
    first = capsys.readouterr().out
    assert "prefill: 198 tokens computed, 0 reused" in first, first
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "jaxseek", *command], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prefill: 6 tokens computed, 192 reused" in result.stdout, result.stdout
    assert result.stdout.split("\n3 tokens")[0] == first.split("\n3 tokens")[0]  # the same text
    assert cli.main([*command, "--no-kv-store"]) == 0
    assert "prefill: 198 tokens computed, 0 reused in memory" in capsys.readouterr().out
    assert cli.main([*command, "--kv-store", f"3fs+embedded://{tmp_path}/kv"]) == 0
    assert "198 tokens computed, 0 reused from the KV store at 3fs+embedded://" in capsys.readouterr().out
    assert cli.main([*command, "--kv-store", "ftp://nowhere/kv"]) == 2
    assert "unknown scheme 'ftp'" in capsys.readouterr().out
