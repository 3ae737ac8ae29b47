"""A paged MLA KV cache: device pages plus the host-side allocator that hands them to sequences.

Each layer caches one ``kv_lora_rank + qk_rope_head_dim`` row per token (576 for DeepSeek-V3), in pages
of 64 tokens (FlashMLA's block size) shared by all layers: ``pages[layer, page, slot, 0, :]``; or, with
``fp8_value_dim``, FlashMLA's FP8 format (an ``FP8KVCache`` with a leading layer axis, 656 bytes a token
for DeepSeek-V3 instead of 1152 in bf16), which rows are quantised into as they are written. The
allocator keeps a free list and one block table per sequence; ``PrefixStore`` is the hook a prefix
cache (``storage.kvcache.ThreeFSPrefixStore`` on 3FS, or ``InMemoryPrefixStore``) plugs into, so a new
request whose prompt starts with a stored prefix skips recomputing it. Stores keep *packed rows*
(``KVPages.packed_rows``): each token's row as the bytes the pages hold it in (``RowFormat``), so FP8
pages travel as their 656-byte FlashMLA rows, never dequantised and requantised.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mla_decode.fp8_cache import (FP8KVCache, dequantize_kv_cache, fp8_row_bytes, pack_flashmla,
                                                  quantize_kv_cache, quantize_rows, unpack_flashmla)
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE
from pallas_kernels.quant import FP8_DTYPE, GROUP


class RowFormat(NamedTuple):
    """How one token's cached row is laid out as bytes in packed rows (``KVPages.packed_rows``).

    dtype: "float32" or "bfloat16" (the latent row in that dtype), or "fp8" (FlashMLA's row: ``value_dim``
    e4m3 values | ``value_dim / 128`` float32 scales | ``latent_dim - value_dim`` bf16 RoPE values).
    """

    dtype: str
    num_layers: int
    latent_dim: int  # kv_lora_rank + qk_rope_head_dim (576 for DeepSeek-V3)
    value_dim: int  # the e4m3 part of an "fp8" row (kv_lora_rank); latent_dim otherwise

    @property
    def row_bytes(self) -> int:
        """Bytes per token per layer: 656 for DeepSeek-V3 in "fp8", 1152 in "bfloat16"."""
        if self.dtype == "fp8":
            return fp8_row_bytes(self.latent_dim, self.value_dim)
        return self.latent_dim * np.dtype(jnp.dtype(self.dtype)).itemsize

    def describe(self) -> str:
        return f"{self.dtype} layers={self.num_layers} d={self.latent_dim} dv={self.value_dim} row={self.row_bytes}B"


class KVPages(NamedTuple):
    """The device side of the cache."""

    data: jax.Array | FP8KVCache  # [num_layers, num_blocks, 64, 1, latent_dim], or FP8KVCache parts with a layer axis

    @property
    def query_dtype(self):
        """The dtype queries attend in: the pages' own, bf16 over FP8 pages (the kernel's FP8 path)."""
        return jnp.bfloat16 if isinstance(self.data, FP8KVCache) else self.data.dtype

    def layer(self, index: int) -> jax.Array | FP8KVCache:
        """One layer's pages: [num_blocks, 64, 1, latent_dim] or an FP8KVCache."""
        return jax.tree.map(lambda x: x[index], self.data)

    @staticmethod
    def stack(layers: list) -> "KVPages":
        return KVPages(jax.tree.map(lambda *xs: jnp.stack(xs), *layers))

    def rows(self, pages: np.ndarray) -> np.ndarray:
        """[num_layers, len(pages) * 64, latent_dim] rows of the given pages, in order, in the pages' dtype
        (bf16 for FP8 pages: an e4m3 value times a power-of-two scale is exact in bf16)."""
        selected = jax.tree.map(lambda x: x[:, pages], self.data)
        if isinstance(selected, FP8KVCache):
            selected = jax.vmap(lambda c: dequantize_kv_cache(c, jnp.bfloat16))(selected)
        rows = np.asarray(selected[:, :, :, 0])  # [layers, pages, 64, latent]
        return rows.reshape(rows.shape[0], -1, rows.shape[-1])

    @property
    def row_format(self) -> RowFormat:
        if isinstance(self.data, FP8KVCache):
            return RowFormat("fp8", self.data.values.shape[0], self.data.head_dim, self.data.head_dim_v)
        return RowFormat(jnp.dtype(self.data.dtype).name, self.data.shape[0], self.data.shape[-1], self.data.shape[-1])

    def packed_rows(self, pages: np.ndarray) -> np.ndarray:
        """[num_layers, len(pages) * 64, row_format.row_bytes] uint8: the pages' rows as the bytes they hold
        (FlashMLA's packed rows for FP8 pages: values | scales | RoPE; the raw dtype bytes otherwise)."""
        selected = jax.tree.map(lambda x: x[:, pages], self.data)
        if isinstance(selected, FP8KVCache):
            packed = jax.vmap(pack_flashmla)(selected)[:, :, :, 0]  # [layers, pages, 64, row_bytes]
        else:
            packed = jax.lax.bitcast_convert_type(selected[:, :, :, 0], jnp.uint8)  # [layers, pages, 64, d, size]
        packed = np.asarray(packed)
        return packed.reshape(packed.shape[0], len(pages) * BLOCK_SIZE, -1)

    def with_packed_rows(self, pages: np.ndarray, packed: np.ndarray) -> "KVPages":
        """Writes [num_layers, len(pages) * 64, row_bytes] uint8 packed rows (``packed_rows``'s) into the given
        pages, bit for bit. Raises ValueError if they are not rows of this cache's ``row_format``."""
        fmt = self.row_format
        expected = (fmt.num_layers, len(pages) * BLOCK_SIZE, fmt.row_bytes)
        if packed.dtype != np.uint8 or packed.shape != expected:
            raise ValueError(f"packed: expected uint8 {expected} rows of {fmt.describe()}, got {packed.dtype} "
                             f"{packed.shape}")
        packed = jnp.asarray(packed).reshape(fmt.num_layers, len(pages), BLOCK_SIZE, 1, fmt.row_bytes)
        if isinstance(self.data, FP8KVCache):
            rows = jax.vmap(lambda p: unpack_flashmla(p, fmt.latent_dim, fmt.value_dim))(packed)
        else:
            itemsize = np.dtype(self.data.dtype).itemsize
            rows = jax.lax.bitcast_convert_type(packed.reshape(packed.shape[:-1] + (fmt.latent_dim, itemsize)),
                                                self.data.dtype)
        return KVPages(jax.tree.map(lambda x, r: x.at[:, pages].set(r), self.data, rows))

    def with_rows(self, pages: np.ndarray, rows: np.ndarray) -> "KVPages":
        """Writes [num_layers, len(pages) * 64, latent_dim] rows into the given pages."""
        rows = jnp.asarray(rows).reshape(rows.shape[0], len(pages), BLOCK_SIZE, 1, rows.shape[-1])
        if isinstance(self.data, FP8KVCache):
            dv = self.data.values.shape[-1]
            rows = jax.vmap(lambda r: quantize_kv_cache(r, dv))(rows)
        return KVPages(jax.tree.map(lambda x, r: x.at[:, pages].set(r.astype(x.dtype)), self.data, rows))


def empty_pages(num_layers: int, num_blocks: int, latent_dim: int, dtype=jnp.float32, *,
                fp8_value_dim: int | None = None) -> KVPages:
    """Zeroed pages; with ``fp8_value_dim`` (the latent's kv_lora_rank, a multiple of 128) in FP8."""
    lead = (num_layers, num_blocks, BLOCK_SIZE, 1)
    if fp8_value_dim is None:
        return KVPages(jnp.zeros(lead + (latent_dim,), dtype))
    if fp8_value_dim % GROUP or not 0 < fp8_value_dim < latent_dim:
        raise ValueError(f"fp8_value_dim: the FP8 cache scales groups of {GROUP} latent values and keeps the "
                         f"RoPE part in bf16: need a multiple of {GROUP} below {latent_dim}, got {fp8_value_dim}")
    return KVPages(FP8KVCache(jnp.zeros(lead + (fp8_value_dim,), FP8_DTYPE),
                              jnp.zeros(lead + (latent_dim - fp8_value_dim,), jnp.bfloat16),
                              jnp.ones((num_layers, num_blocks, 1, fp8_value_dim // GROUP, BLOCK_SIZE), jnp.float32)))


def write_rows(layer_pages: jax.Array | FP8KVCache, rows: jax.Array, block_table: jax.Array, positions: jax.Array,
               valid: jax.Array) -> jax.Array | FP8KVCache:
    """Stores new latent rows into their pages (quantised first when the pages are FP8).

    Args:
      layer_pages: [num_blocks, 64, 1, latent_dim] one layer's pages, or its FP8KVCache.
      rows: [batch, s, latent_dim] rows of tokens at ``positions`` [batch, s] int32.
      block_table: [batch, max_blocks] int32.
      valid: [batch, s] bool; other rows are not written.
    Returns:
      the updated pages.
    """
    page = jnp.take_along_axis(block_table, positions // BLOCK_SIZE, axis=1)  # [batch, s]
    page = jnp.where(valid, page, layer_pages.shape[0])  # out of range: dropped
    slot = positions % BLOCK_SIZE
    if isinstance(layer_pages, FP8KVCache):
        values, scales, rope = quantize_rows(rows, layer_pages.head_dim_v)
        return FP8KVCache(layer_pages.values.at[page, slot, 0].set(values, mode="drop"),
                          layer_pages.rope.at[page, slot, 0].set(rope, mode="drop"),
                          layer_pages.scales.at[page, 0, :, slot].set(scales, mode="drop"))
    return layer_pages.at[page, slot, 0].set(rows.astype(layer_pages.dtype), mode="drop")


class PrefixStore(Protocol):
    """Where finished prompts' KV rows are kept for reuse, keyed by the tokens they encode. Prefixes are
    whole pages (multiples of 64 tokens): the generator offers only prompts of at least one page. Rows are
    the generator's packed rows, ``[num_layers, n, row_bytes] uint8`` (``KVPages.packed_rows``); a store
    returns them bit for bit. A store shared by several models must keep their rows apart (the 3FS store
    takes the generator's ``cache_fingerprint``)."""

    def lookup(self, tokens: tuple[int, ...]) -> tuple[int, np.ndarray | None]:
        """(n, rows [num_layers, n, row_bytes]) for the longest stored prefix of ``tokens`` (n may be 0)."""

    def store(self, tokens: tuple[int, ...], rows: np.ndarray) -> None:
        """Keeps rows [num_layers, len(tokens), row_bytes] for the prefix ``tokens``."""


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
