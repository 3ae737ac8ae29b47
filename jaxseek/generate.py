"""Text generation from a trained checkpoint: paged KV cache, prefill, batched decode, sampling.

``Generator.generate`` prefills each request (its prompt in one causal pass over fresh pages, reusing a
stored prefix when the ``PrefixStore`` has one), then decodes all requests together, one token per
sequence per step, each sequence at its own length. Greedy when ``temperature == 0``, else temperature
and top-p (nucleus) sampling. ``cache_fingerprint`` names what a cached row depends on (the weights and
the cache's row format), so a store shared by several models or cache formats never mixes their rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxseek.checkpoint import Checkpointer, load_configs
from jaxseek.config import ModelConfig
from jaxseek.decode import paged_forward_jit
from jaxseek.kv_cache import InMemoryPrefixStore, KVPages, PageAllocator, PrefixStore, RowFormat, empty_pages
from jaxseek.model.experts import check_expert_parallel
from jaxseek.model.transformer import Transformer
from jaxseek.train_state import abstract_train_state, model_shardings, sharded_abstract_state
from sharding.mesh import make_mesh
from sharding.rules import get_rules
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE

PREFILL_BUCKET = BLOCK_SIZE  # prompts are padded to a multiple of this, so prefill compiles once per bucket


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """[batch, vocab] float32 -> [batch] int32 tokens."""
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), -1)
    keep_sorted = jnp.cumsum(sorted_probs, -1) - sorted_probs < top_p  # smallest set reaching top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jax.random.categorical(key, jnp.where(keep, logits, -jnp.inf)).astype(jnp.int32)


def load_model(run_dir: str | pathlib.Path) -> Transformer:
    """The model of a ``jaxseek train`` run directory, at its latest checkpoint."""
    mc, tc = load_configs(run_dir)
    checkpointer = Checkpointer.for_run(run_dir, save_every=tc.checkpoint_every)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ValueError(f"checkpoint: no checkpoint under {run_dir}")
        one_device = make_mesh(devices=jax.devices()[:1])
        state = checkpointer.restore(step, sharded_abstract_state(mc, tc, one_device))  # no initialisation needed
    finally:
        checkpointer.close()
    graphdef = abstract_train_state(mc, tc)[0]
    return nnx.merge(graphdef, state.params, state.model_state)


def cache_row_format(config: ModelConfig, kv_cache: str = "model") -> RowFormat:
    """The rows a ``Generator(model, kv_cache=...)`` caches: the model's compute dtype, or "fp8"."""
    if kv_cache not in ("model", "fp8"):
        raise ValueError(f"kv_cache: expected 'model' or 'fp8', got {kv_cache!r}")
    mla = config.mla
    if kv_cache == "fp8":
        if mla.kv_lora_rank % 128:
            raise ValueError(f"kv_cache: 'fp8' scales groups of 128 latent values; this model's kv_lora_rank is "
                             f"{mla.kv_lora_rank}")
        return RowFormat("fp8", config.num_layers, mla.latent_dim, mla.kv_lora_rank)
    dtype = "bfloat16" if config.compute_dtype == "bfloat16" else "float32"
    return RowFormat(dtype, config.num_layers, mla.latent_dim, mla.latent_dim)


def cache_fingerprint(model: Transformer, kv_cache: str = "model", samples_per_leaf: int = 4096) -> str:
    """A sha256 hex digest of what cached rows depend on: the model's config, every state leaf's path, shape
    and dtype with up to ``samples_per_leaf`` of its values (an even grid over each axis: a checkpoint of
    another step or run differs there), and the cache's ``RowFormat``. Two models with the same fingerprint
    compute the same rows for the same tokens (up to a collision in the sampled values)."""
    digest = hashlib.sha256(repr((model.config, cache_row_format(model.config, kv_cache))).encode())
    state = nnx.state(model)
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(state), key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = jnp.asarray(leaf)
        per_axis = max(1, round(samples_per_leaf ** (1 / max(leaf.ndim, 1))))
        grid = leaf[tuple(slice(None, None, max(1, -(-size // per_axis))) for size in leaf.shape)]
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(jax.device_get(grid)).tobytes())
    return digest.hexdigest()


class Generator:
    """Serves generation requests from one model and one paged cache.

    ``prefill_tokens_computed`` / ``prefill_tokens_reused`` count the prompt tokens run through the model
    and those whose rows came from the prefix store, over this generator's life.
    """

    def __init__(self, model: Transformer, *, num_blocks: int = 256, max_blocks_per_seq: int = 32,
                 prefix_store: PrefixStore | None = None, implementation: str | None = None,
                 kv_cache: str = "model", mesh: jax.sharding.Mesh | None = None):
        """``kv_cache``: "model" keeps rows in the model's compute dtype, "fp8" in FlashMLA's FP8 format
        (e4m3 latent with a power-of-two scale per 128 values, bf16 RoPE; needs kv_lora_rank % 128 == 0).
        ``mesh``: with an ``ep`` axis > 1 the experts are split over it (``sharding.rules`` "ep") and the MoE
        layers dispatch expert-parallel: DeepEP's normal mode in prefill, its low-latency mode in decode."""
        self.config: ModelConfig = model.config
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh if mesh is not None and mesh.shape["ep"] > 1 else None
        if self.mesh is not None:
            check_expert_parallel(self.config.moe, self.mesh)
            self.state = jax.device_put(self.state, model_shardings(self.state, self.mesh, get_rules("ep")))
        fmt = cache_row_format(self.config, kv_cache)
        dtype = jnp.float32 if fmt.dtype == "fp8" else jnp.dtype(fmt.dtype)
        self.pages: KVPages = empty_pages(fmt.num_layers, num_blocks, fmt.latent_dim, dtype,
                                          fp8_value_dim=fmt.value_dim if fmt.dtype == "fp8" else None)
        self.allocator = PageAllocator(num_blocks, max_blocks_per_seq)
        self.prefix_store = prefix_store if prefix_store is not None else InMemoryPrefixStore()
        expected = getattr(self.prefix_store, "fingerprint", None)
        if expected is not None and expected != cache_fingerprint(model, kv_cache):
            raise ValueError(f"prefix_store: its fingerprint {expected[:16]}... is not this model's with "
                             f"kv_cache={kv_cache!r} (make it with cache_fingerprint(model, {kv_cache!r}))")
        self.implementation = implementation
        self.prefill_tokens_computed = self.prefill_tokens_reused = 0

    def _forward(self, seq_ids, tokens, start, new_tokens):
        table = jnp.asarray(self.allocator.block_table(seq_ids))
        logits, self.pages = paged_forward_jit(self.graphdef, self.state, jnp.asarray(tokens, jnp.int32),
                                               jnp.asarray(start, jnp.int32), jnp.asarray(new_tokens, jnp.int32),
                                               self.pages, table, implementation=self.implementation,
                                               mesh=self.mesh)
        return logits

    def _packed_rows(self, seq_id: int, length: int) -> np.ndarray:
        """[num_layers, length, row_bytes] uint8 packed rows of a sequence's first ``length`` tokens (a
        multiple of 64), for the prefix store."""
        table = self.allocator.block_table([seq_id])[0][: length // BLOCK_SIZE]
        return self.pages.packed_rows(table)

    def prefill(self, seq_id: int, prompt: list[int]) -> jax.Array:
        """Caches the prompt; returns the [vocab] logits after its last token."""
        reused, rows = self.prefix_store.lookup(tuple(prompt[:-1]))  # the last token is always computed
        self.allocator.reserve(seq_id, len(prompt))
        if reused:
            table = self.allocator.block_table([seq_id])[0]
            self.pages = self.pages.with_packed_rows(table[: reused // BLOCK_SIZE], rows)
        rest = prompt[reused:]
        self.prefill_tokens_reused += reused
        self.prefill_tokens_computed += len(rest)
        width = -(-len(rest) // PREFILL_BUCKET) * PREFILL_BUCKET
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(rest)] = rest
        logits = self._forward([seq_id], tokens, [reused], [len(rest)])
        whole = len(prompt) // BLOCK_SIZE * BLOCK_SIZE  # the store keeps whole pages only
        if whole > reused:  # pages it has not seen yet
            self.prefix_store.store(tuple(prompt[:whole]), self._packed_rows(seq_id, whole))
        return logits[0, len(rest) - 1]

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig = SamplingConfig(),
                 on_tokens: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
        """Completes every prompt (lists of token ids; lengths may differ).

        Args:
          on_tokens: called with the [len(prompts)] int32 tokens of each step, for streaming.
        Returns:
          the new tokens of each request.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: need at least one non-empty prompt")
        seq_ids = list(range(len(prompts)))
        key = jax.random.key(sampling.seed)
        try:
            logits = jnp.stack([self.prefill(i, list(p)) for i, p in zip(seq_ids, prompts)])
            lengths = np.array([len(p) for p in prompts], np.int32)
            outputs = [[] for _ in prompts]
            for step in range(sampling.max_new_tokens):
                key, step_key = jax.random.split(key)
                tokens = np.asarray(sample(logits, step_key, sampling.temperature, sampling.top_p))
                for out, token in zip(outputs, tokens):
                    out.append(int(token))
                if on_tokens is not None:
                    on_tokens(tokens)
                if step == sampling.max_new_tokens - 1:
                    break
                for seq_id, length in zip(seq_ids, lengths):
                    self.allocator.reserve(seq_id, int(length) + 1)
                logits = self._forward(seq_ids, tokens[:, None], lengths, np.ones_like(lengths))[:, 0]
                lengths = lengths + 1
            return outputs
        finally:
            for seq_id in seq_ids:
                self.allocator.release(seq_id)
