"""Public FP8 GEMMs with fine-grained scaling (DeepGEMM's API, JAX style: they return the output).

Operands are ``(data, scale)`` pairs (``quant.FP8Array`` or any 2-tuple). "NT": both operands are
K-major, A is [m, k] and B is [n, k], the product is A @ B^T. Scales: A 1x128 per token
([m, ceil(k / 128)] float32), B 128x128 per block ([ceil(n / 128), ceil(k / 128)] float32), except the
weight-gradient GEMM, which scales both sides 1x128 along K.

``implementation``: None picks ``mosaic_gpu`` on a Hopper GPU and ``xla`` elsewhere (falling back to
``xla`` if the kernel cannot take the inputs); ``"xla"``, ``"mosaic_gpu"`` and ``"interpret"`` (the
Mosaic GPU kernel run by the CPU interpreter) force one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dispatch import dispatch, known_value
from pallas_kernels.fp8_gemm import kernel_ops, reference
from pallas_kernels.fp8_gemm.mosaic_gpu import BLOCK_K
from pallas_kernels.quant import FP8_DTYPE, ceil_div

OUT_DTYPES = (jnp.bfloat16, jnp.float32)


def _unpack(pair, name: str, ndim: int) -> tuple[jax.Array, jax.Array]:
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise ValueError(f"{name}: expected a (fp8 data, float32 scales) pair, got {type(pair).__name__}")
    data, scale = pair
    if data.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: data must be float8_e4m3fn, got {data.dtype}")
    if data.ndim != ndim:
        raise ValueError(f"{name}: data must be {ndim}-D, got shape {data.shape}")
    if scale.dtype != jnp.float32:
        raise ValueError(f"{name}: scales must be float32, got {scale.dtype}")
    return data, scale


def _expect_shape(x: jax.Array, shape: tuple[int, ...], name: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def _check_out_dtype(out_dtype) -> None:
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise ValueError(f"out_dtype: expected bfloat16 or float32, got {jnp.dtype(out_dtype)}")


def fp8_gemm_nt(lhs, rhs, *, out_dtype=jnp.bfloat16, implementation: str | None = None) -> jax.Array:
    """D = A @ B^T with 1x128 activation and 128x128 weight scales.

    Args:
      lhs: (a [m, k] e4m3, sa [m, ceil(k / 128)] float32).
      rhs: (b [n, k] e4m3, sb [ceil(n / 128), ceil(k / 128)] float32).
    Returns:
      [m, n] out_dtype (bfloat16 or float32).
    """
    a, sa = _unpack(lhs, "lhs", 2)
    b, sb = _unpack(rhs, "rhs", 2)
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"rhs: K mismatch, lhs has k={k}, rhs has shape {b.shape}")
    _expect_shape(sa, (m, ceil_div(k, BLOCK_K)), "lhs scales")
    _expect_shape(sb, (ceil_div(n, BLOCK_K), ceil_div(k, BLOCK_K)), "rhs scales")
    _check_out_dtype(out_dtype)

    return dispatch(implementation, lambda: reference.fp8_gemm_nt(a, sa, b, sb, out_dtype),
                     lambda interpret: kernel_ops.fp8_gemm_nt(a, sa, b, sb, out_dtype=out_dtype, interpret=interpret))


def _group_ranges(m_indices, group_offsets, m: int, num_groups: int):
    """(starts [g], ends [g], row_valid [m] bool) from either contiguous-layout description."""
    rows = jnp.arange(m, dtype=jnp.int32)
    if group_offsets is not None:
        offsets = group_offsets.astype(jnp.int32)
        return offsets[:-1], offsets[1:], rows < offsets[-1]
    idx = jnp.where(m_indices >= 0, m_indices, num_groups)  # -1 rows fall off the end (dropped)
    starts = jnp.full((num_groups,), m, jnp.int32).at[idx].min(rows, mode="drop")
    ends = jnp.zeros((num_groups,), jnp.int32).at[idx].max(rows + 1, mode="drop")
    return starts, jnp.maximum(ends, starts), m_indices >= 0


def m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, m_indices=None, *, group_offsets=None, out_dtype=jnp.bfloat16,
                                     implementation: str | None = None) -> jax.Array:
    """MoE expert GEMM over rows sorted by expert: row r uses expert ``m_indices[r]``'s weights.

    Unlike DeepGEMM, groups need no padding to 128 rows: any group sizes, including 0, are accepted
    (ragged groups share a boundary tile inside the kernel).

    Args:
      lhs: (a [m, k] e4m3, sa [m, ceil(k / 128)] float32).
      rhs: (b [g, n, k] e4m3, sb [g, ceil(n / 128), ceil(k / 128)] float32).
      m_indices: [m] int32, the group of each row, -1 for rows to skip (their output is 0). Each group's
        rows must be contiguous.
      group_offsets: [g + 1] int32 instead of m_indices: group i owns rows [offsets[i], offsets[i + 1]);
        rows from offsets[g] on are skipped.
    Returns:
      [m, n] out_dtype.
    """
    a, sa = _unpack(lhs, "lhs", 2)
    b, sb = _unpack(rhs, "rhs", 3)
    (m, k), (num_groups, n) = a.shape, b.shape[:2]
    if b.shape[2] != k:
        raise ValueError(f"rhs: K mismatch, lhs has k={k}, rhs has shape {b.shape}")
    _expect_shape(sa, (m, ceil_div(k, BLOCK_K)), "lhs scales")
    _expect_shape(sb, (num_groups, ceil_div(n, BLOCK_K), ceil_div(k, BLOCK_K)), "rhs scales")
    _check_out_dtype(out_dtype)
    if (m_indices is None) == (group_offsets is None):
        raise ValueError("m_indices: pass exactly one of m_indices and group_offsets")
    if m_indices is not None:
        if m_indices.dtype != jnp.int32 or m_indices.shape != (m,):
            raise ValueError(f"m_indices: expected int32 [{m}], got {m_indices.dtype} {m_indices.shape}")
        values = known_value(m_indices)
        if values is not None and values.size and (values.min() < -1 or values.max() >= num_groups):
            raise ValueError(f"m_indices: values must be in [-1, {num_groups}), got [{values.min()}, {values.max()}]")
    else:
        if group_offsets.shape != (num_groups + 1,):
            raise ValueError(f"group_offsets: expected shape ({num_groups + 1},), got {group_offsets.shape}")
        values = known_value(group_offsets)
        if values is not None and (values[0] != 0 or np.any(np.diff(values) < 0) or values[-1] > m):
            raise ValueError(f"group_offsets: must start at 0, be non-decreasing and end <= {m}, got {values}")
    starts, ends, row_valid = _group_ranges(m_indices, group_offsets, m, num_groups)

    def kernel(interpret):
        out = kernel_ops.m_grouped_contiguous(a, sa, b, sb, starts, ends, out_dtype=out_dtype, interpret=interpret)
        return jnp.where(row_valid[:, None], out, 0).astype(out_dtype)

    def xla():
        if m_indices is not None:
            row_groups = m_indices
        else:
            rows = jnp.arange(m, dtype=jnp.int32)
            row_groups = jnp.where(row_valid, jnp.searchsorted(group_offsets[1:], rows, side="right"), -1)
        return reference.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, row_groups.astype(jnp.int32), out_dtype)

    return dispatch(implementation, xla, kernel)


def m_grouped_fp8_gemm_nt_masked(lhs, rhs, masked_m, expected_m: int, *, out_dtype=jnp.bfloat16,
                                 implementation: str | None = None) -> jax.Array:
    """Batched expert GEMM for decode (the layout low-latency EP dispatch produces).

    Args:
      lhs: (a [g, m_max, k] e4m3, sa [g, m_max, ceil(k / 128)] float32).
      rhs: (b [g, n, k] e4m3, sb [g, ceil(n / 128), ceil(k / 128)] float32).
      masked_m: [g] int32, valid rows per group.
      expected_m: a static hint of the typical masked_m, used to choose tiles.
    Returns:
      [g, m_max, n] out_dtype. Rows at or past masked_m[g] are unspecified (the kernel skips them).
    """
    a, sa = _unpack(lhs, "lhs", 3)
    b, sb = _unpack(rhs, "rhs", 3)
    (num_groups, m_max, k), n = a.shape, b.shape[1]
    if b.shape[0] != num_groups or b.shape[2] != k:
        raise ValueError(f"rhs: expected [{num_groups}, n, {k}], got shape {b.shape}")
    _expect_shape(sa, (num_groups, m_max, ceil_div(k, BLOCK_K)), "lhs scales")
    _expect_shape(sb, (num_groups, ceil_div(n, BLOCK_K), ceil_div(k, BLOCK_K)), "rhs scales")
    _check_out_dtype(out_dtype)
    if masked_m.shape != (num_groups,) or not jnp.issubdtype(masked_m.dtype, jnp.integer):
        raise ValueError(f"masked_m: expected int32 [{num_groups}], got {masked_m.dtype} {masked_m.shape}")
    if not isinstance(expected_m, (int, np.integer)) or expected_m < 0:
        raise ValueError(f"expected_m: expected a non-negative Python int, got {expected_m!r}")

    return dispatch(implementation,
                     lambda: reference.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, out_dtype),
                     lambda interpret: kernel_ops.m_grouped_masked(a, sa, b, sb, masked_m, int(expected_m),
                                                                   out_dtype=out_dtype, interpret=interpret))


def k_grouped_fp8_gemm_nt_contiguous(lhs, rhs, group_ks, *, c=None, implementation: str | None = None) -> jax.Array:
    """MoE weight gradients: groups split K (tokens); out[g] = A[:, K_g] @ B[:, K_g]^T (+ c[g]).

    Both operands are scaled 1x128 along K (DeepSeek-V3's wgrad recipe).

    Args:
      lhs: (a [m, k] e4m3, sa [m, k / 128] float32), e.g. output gradients transposed.
      rhs: (b [n, k] e4m3, sb [n, k / 128] float32), e.g. activations transposed.
      group_ks: [g] int32 tokens per group, each a multiple of 128, summing to at most k.
      c: optional [g, m, n] float32 to accumulate into.
    Returns:
      [g, m, n] float32.
    """
    a, sa = _unpack(lhs, "lhs", 2)
    b, sb = _unpack(rhs, "rhs", 2)
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"rhs: K mismatch, lhs has k={k}, rhs has shape {b.shape}")
    if k % BLOCK_K:
        raise ValueError(f"lhs: k={k} must be a multiple of {BLOCK_K} (groups are whole 128-token blocks)")
    _expect_shape(sa, (m, k // BLOCK_K), "lhs scales")
    _expect_shape(sb, (n, k // BLOCK_K), "rhs scales")
    num_groups = group_ks.shape[0] if group_ks.ndim == 1 else -1
    if num_groups < 1 or not jnp.issubdtype(group_ks.dtype, jnp.integer):
        raise ValueError(f"group_ks: expected int32 [g], got {group_ks.dtype} {group_ks.shape}")
    values = known_value(group_ks)
    if values is not None and (np.any(values % BLOCK_K) or np.any(values < 0) or values.sum() > k):
        raise ValueError(f"group_ks: must be non-negative multiples of {BLOCK_K} summing to <= {k}, got {values}")
    if c is not None:
        if c.dtype != jnp.float32:
            raise ValueError(f"c: expected float32, got {c.dtype}")
        _expect_shape(c, (num_groups, m, n), "c")

    out = dispatch(implementation, lambda: reference.k_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, group_ks),
                    lambda interpret: kernel_ops.k_grouped_contiguous(a, sa, b, sb, group_ks, interpret=interpret))
    return out if c is None else out + c
