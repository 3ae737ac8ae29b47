"""How the decoding kernel reads a page of the cache: bf16/fp16 rows as they are, or FP8 values that the
compute warpgroups dequantise into a shared bf16 tile.

A page format gives the kernel its global operands, their TMA block specs, its scratch buffers, and,
inside a pipeline step, the K operands of ``S = Q K^T`` (query columns, K^T ref) and the V ref of this
warpgroup's value columns, with value rows past the valid tokens zeroed (0 * NaN would poison ``P V``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_decode.fp8_cache import FP8KVCache
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE
from pallas_kernels.mla_decode.variant import KernelVariant
from pallas_kernels.quant import GROUP

CHUNK = BLOCK_SIZE  # KV tokens per pipeline step: one page (bf16 wgmma needs K in multiples of 64)
TILED_16BIT = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 columns = one 128 B swizzle
TILED_8BIT = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))  # 128 columns = one 128 B swizzle


def _transposed(index_map: Callable) -> Callable:
    return lambda j: tuple(reversed(index_map(j)))


def _token_rows(ref, rows, token_axis: int = 0):
    """The tokens ``rows`` (a ``pl.ds``, or None for the whole page) of a page ref whose tokens lie on
    ``token_axis``."""
    if ref is None or rows is None:
        return ref
    return ref.at[rows] if token_axis == 0 else ref.at[:, rows]


def _k_transposed(ctx, k_ref, pretransposed_ref):
    """K^T [columns, tokens] of the tokens this warpgroup scores (``ctx.score_rows``)."""
    return ctx.variant.transposed(_token_rows(k_ref, ctx.score_rows),
                                  _token_rows(pretransposed_ref, ctx.score_rows, token_axis=1))


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a page format sees of a pipeline step."""

    token0: Any  # first token of the page
    valid: Any  # tokens at or past this index are not in the cache (or not in the item)
    wg: Any  # compute warpgroup index
    dv_per_wg: int  # value columns of each compute warpgroup
    page_barrier: Any  # a barrier both compute warpgroups arrive at, for per-page handshakes only
    variant: KernelVariant
    score_rows: Any = None  # the page's tokens this warpgroup scores (a pl.ds); None: all of them


@dataclasses.dataclass(frozen=True)
class DensePages:
    """bf16/fp16 rows [num_blocks * 64, d]; V is the page's first dv columns."""

    d: int

    def gmem_operands(self, k_cache: jax.Array, variant: KernelVariant) -> tuple[jax.Array, ...]:
        rows = k_cache.reshape(-1, self.d)  # page p holds rows 64 p .. 64 p + 63
        return (rows, rows.T) if variant.for_interpreter else (rows,)  # see KernelVariant.transposed

    def in_specs(self, index_map: Callable, variant: KernelVariant) -> list:
        specs = [plgpu.BlockSpec((CHUNK, self.d), index_map, transforms=TILED_16BIT)]
        if variant.for_interpreter:
            specs.append(plgpu.BlockSpec((self.d, CHUNK), _transposed(index_map)))
        return specs

    def scratch(self, variant: KernelVariant) -> dict:
        return {}

    def score_operands(self, page_refs, scratch, ctx: StepContext):
        k_smem, *kt_smem = page_refs
        return [(None, _k_transposed(ctx, k_smem, kt_smem[0] if kt_smem else None))]

    def value_ref(self, page_refs, scratch, ctx: StepContext):
        v_smem = page_refs[0].at[:, pl.ds(ctx.wg * ctx.dv_per_wg, ctx.dv_per_wg)]

        @pl.when(ctx.token0 + CHUNK > ctx.valid)
        def _zero_unwritten_rows():  # only its own columns: the other warpgroup may still read them (for S or P V)
            v = v_smem[...]
            tokens = ctx.token0 + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v_smem[...] = jnp.where(tokens < ctx.valid, v, jnp.zeros_like(v))
            plgpu.commit_smem()

        return v_smem


@dataclasses.dataclass(frozen=True)
class FP8Pages:
    """An FP8KVCache: e4m3 values [num_blocks * 64, dv], bf16 RoPE [num_blocks * 64, d - dv], float32 scales
    [num_blocks * dv / 128, 64]. Each compute warpgroup dequantises its own value columns (values x the
    token's scale of their group, exact in bf16 for power-of-two scales) into a shared [64, dv] bf16 tile;
    S reads the whole tile, so the warpgroups meet at a barrier before writing it and after."""

    d: int
    dv: int
    dtype: Any = jnp.bfloat16

    @property
    def groups(self) -> int:
        return self.dv // GROUP

    def gmem_operands(self, cache: FP8KVCache, variant: KernelVariant) -> tuple[jax.Array, ...]:
        values = cache.values.reshape(-1, self.dv)
        rope = cache.rope.reshape(-1, self.d - self.dv)
        scales = cache.scales.reshape(-1, BLOCK_SIZE)
        return (values, rope, scales) + ((rope.T,) if variant.for_interpreter else ())  # KernelVariant.transposed

    def in_specs(self, index_map: Callable, variant: KernelVariant) -> list:
        specs = [plgpu.BlockSpec((CHUNK, self.dv), index_map, transforms=TILED_8BIT),
                 plgpu.BlockSpec((CHUNK, self.d - self.dv), index_map, transforms=TILED_16BIT),
                 plgpu.BlockSpec((self.groups, CHUNK), index_map)]
        if variant.for_interpreter:
            specs.append(plgpu.BlockSpec((self.d - self.dv, CHUNK), _transposed(index_map)))
        return specs

    def scratch(self, variant: KernelVariant) -> dict:
        tile = {"tile": plgpu.SMEM((CHUNK, self.dv), self.dtype, transforms=TILED_16BIT)}
        if variant.for_interpreter:  # [dv, 64]: KernelVariant.transposed
            tile["tile_t"] = plgpu.SMEM((self.dv, CHUNK), self.dtype)
        return tile

    def score_operands(self, page_refs, scratch, ctx: StepContext):
        values_smem, rope_smem, scales_smem, *rope_t = page_refs
        tile = scratch["tile"]
        plgpu.barrier_arrive(ctx.page_barrier)  # both warpgroups have read the last page's tile for S
        plgpu.barrier_wait(ctx.page_barrier)
        groups_per_wg = ctx.dv_per_wg // GROUP
        for i in range(groups_per_wg):
            group = ctx.wg * groups_per_wg + i
            columns = pl.ds(group * GROUP, GROUP)
            x = values_smem[:, columns].astype(jnp.float32)  # [64, 128]
            x = x * lax.broadcast_in_dim(scales_smem[group], x.shape, [0])
            tokens = ctx.token0 + lax.broadcasted_iota(jnp.int32, x.shape, 0)
            x = jnp.where(tokens < ctx.valid, x, 0.0).astype(self.dtype)
            tile[:, columns] = x
            if ctx.variant.for_interpreter:
                scratch["tile_t"][columns, :] = x.T
        plgpu.commit_smem()
        plgpu.barrier_arrive(ctx.page_barrier)  # both halves of the tile are written
        plgpu.barrier_wait(ctx.page_barrier)
        return [(pl.ds(0, self.dv), _k_transposed(ctx, tile, scratch.get("tile_t"))),
                (pl.ds(self.dv, self.d - self.dv), _k_transposed(ctx, rope_smem, rope_t[0] if rope_t else None))]

    def value_ref(self, page_refs, scratch, ctx: StepContext):
        return scratch["tile"].at[:, pl.ds(ctx.wg * ctx.dv_per_wg, ctx.dv_per_wg)]  # rows zeroed when written
