"""A paged MLA KV cache: device pages plus the host-side allocator that hands them to sequences.

Each layer caches one ``kv_lora_rank + qk_rope_head_dim`` row per token (576 for DeepSeek-V3), in pages
of 64 tokens (FlashMLA's block size) shared by all layers: ``pages[layer, page, slot, 0, :]``. The
allocator keeps a free list and one block table per sequence; ``PrefixStore`` is the hook a prefix
cache (the storage package's 3FS-backed one, or ``InMemoryPrefixStore``) plugs into, so a new request
whose prompt starts with a stored prefix skips recomputing it.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mla_decode.metadata import BLOCK_SIZE


class KVPages(NamedTuple):
    """The device side of the cache."""

    data: jax.Array  # [num_layers, num_blocks, 64, 1, latent_dim]


def empty_pages(num_layers: int, num_blocks: int, latent_dim: int, dtype=jnp.float32) -> KVPages:
    return KVPages(jnp.zeros((num_layers, num_blocks, BLOCK_SIZE, 1, latent_dim), dtype))


def write_rows(layer_pages: jax.Array, rows: jax.Array, block_table: jax.Array, positions: jax.Array,
               valid: jax.Array) -> jax.Array:
    """Stores new latent rows into their pages.

    Args:
      layer_pages: [num_blocks, 64, 1, latent_dim] one layer's pages.
      rows: [batch, s, latent_dim] rows of tokens at ``positions`` [batch, s] int32.
      block_table: [batch, max_blocks] int32.
      valid: [batch, s] bool; other rows are not written.
    Returns:
      the updated pages.
    """
    page = jnp.take_along_axis(block_table, positions // BLOCK_SIZE, axis=1)  # [batch, s]
    page = jnp.where(valid, page, layer_pages.shape[0])  # out of range: dropped
    return layer_pages.at[page, positions % BLOCK_SIZE, 0].set(rows.astype(layer_pages.dtype), mode="drop")


class PrefixStore(Protocol):
    """Where finished prompts' KV rows are kept for reuse, keyed by the tokens they encode. Prefixes are
    whole pages (multiples of 64 tokens): the generator offers only prompts of at least one page."""

    def lookup(self, tokens: tuple[int, ...]) -> tuple[int, np.ndarray | None]:
        """(n, rows [num_layers, n, latent_dim]) for the longest stored prefix of ``tokens`` (n may be 0)."""

    def store(self, tokens: tuple[int, ...], rows: np.ndarray) -> None:
        """Keeps rows [num_layers, len(tokens), latent_dim] for the prefix ``tokens``."""


def prefix_key(tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()


class InMemoryPrefixStore:
    """A ``PrefixStore`` in a dict, at whole-page granularity (prefixes of 64, 128, ... tokens)."""

    def __init__(self):
        self._rows: dict[str, np.ndarray] = {}

    def lookup(self, tokens):
        for n in range(len(tokens) // BLOCK_SIZE * BLOCK_SIZE, 0, -BLOCK_SIZE):
            rows = self._rows.get(prefix_key(tuple(tokens[:n])))
            if rows is not None:
                return n, rows
        return 0, None

    def store(self, tokens, rows):
        for n in range(BLOCK_SIZE, len(tokens) + 1, BLOCK_SIZE):
            self._rows[prefix_key(tuple(tokens[:n]))] = rows[:, :n]


class PageAllocator:
    """Host-side bookkeeping: which pages each sequence owns."""

    def __init__(self, num_blocks: int, max_blocks_per_seq: int):
        self.num_blocks, self.max_blocks_per_seq = num_blocks, max_blocks_per_seq
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def reserve(self, seq_id: int, length: int) -> None:
        """Makes sure sequence ``seq_id`` owns pages for ``length`` tokens."""
        table = self._tables.setdefault(seq_id, [])
        needed = -(-length // BLOCK_SIZE)
        if needed > self.max_blocks_per_seq:
            raise ValueError(f"length: {length} tokens need {needed} pages, more than max_blocks_per_seq="
                             f"{self.max_blocks_per_seq}")
        if needed - len(table) > len(self._free):
            raise ValueError(f"length: the cache is full ({len(self._free)} free pages, {needed - len(table)} needed)")
        while len(table) < needed:
            table.append(self._free.pop())
        self.lengths[seq_id] = max(self.lengths.get(seq_id, 0), length)

    def release(self, seq_id: int) -> None:
        self._free.extend(reversed(self._tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def block_table(self, seq_ids: list[int]) -> np.ndarray:
        """[len(seq_ids), max_blocks_per_seq] int32; unused entries point at page 0 (never read)."""
        table = np.zeros((len(seq_ids), self.max_blocks_per_seq), np.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self._tables.get(seq_id, [])
            table[row, :len(pages)] = pages
        return table
