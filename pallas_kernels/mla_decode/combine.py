"""Merging split-KV partial results (flash-decoding): each split computed a softmax over its share of
a sequence's keys; the exact result weights split s by exp(lse_s - logsumexp_s lse_s)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mla_decode.metadata import MLAMetadata


def combine_splits(partial_out: jax.Array, partial_lse: jax.Array, metadata: MLAMetadata, batch: int
                   ) -> tuple[jax.Array, jax.Array]:
    """[slots, rows, dv] f32 partial outputs and [slots, rows] f32 partial lse, indexed by the work items'
    slots -> ([batch, rows, dv] f32, [batch, rows] f32). Rows of a sequence with no keys give out 0, lse +inf."""
    work = metadata.work
    item_owner = jnp.where(work[:, 1] < work[:, 2], work[:, 0], batch)  # empty items dropped
    owner = jnp.full((work.shape[0],), batch, jnp.int32).at[work[:, 3]].set(item_owner)  # [slots], by slot
    lse_max = jax.ops.segment_max(partial_lse, owner, num_segments=batch)  # [batch, rows]
    safe_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(partial_lse - safe_max[jnp.minimum(owner, batch - 1)])  # [slots, rows]
    weights = jnp.where((owner < batch)[:, None], weights, 0.0)
    total = jax.ops.segment_sum(weights, owner, num_segments=batch)  # [batch, rows]
    out = jax.ops.segment_sum(weights[..., None] * partial_out, owner, num_segments=batch)
    has_keys = total > 0
    out = jnp.where(has_keys[..., None], out / jnp.where(has_keys, total, 1.0)[..., None], 0.0)
    lse = jnp.where(has_keys, safe_max + jnp.log(jnp.where(has_keys, total, 1.0)), jnp.inf)
    return out, lse
