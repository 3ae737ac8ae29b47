"""The FP8 GEMM kernels on the GPU against the XLA path: every op, the default config and each variant.

The GPU-only code (K-major B, layout casts, dynamic k-grouped pipelines: ``interpreter_differences.py``) is
checked numerically only here. Inputs are scaled per row and per 128-block by exp(2 randn), tile widths
straddle 128-column scale blocks, and each output element must match the XLA path to float32 rounding:
|kernel - xla| <= 1e-5 (|xla| + the same GEMM on |a|, |b|). A row per (op, config) with ``ok``;
``check()`` raises AssertionError naming the failures after printing every row.

    python benchmarks/fp8_correctness.py [--interpret]   # on a Hopper GPU (gpu_suite.py's fp8_correctness
                                                          # section); --interpret: the CPU interpreter (minutes)
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8_gemm import api, kernel_ops, reference
from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig
from pallas_kernels.quant import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8

RTOL = 1e-5


def variant_configs(num_sms: int) -> dict[str, KernelConfig | None]:
    """None: the heuristic's config through the public op. The others straddle scale blocks (48, 80, 112)."""
    def config(tile_n, **kw):
        return KernelConfig(tile_n=tile_n, max_concurrent_steps=4, num_sms=num_sms, **kw)
    return {"default": None, "per_column n48": config(48), "tile_scalar n48": config(48, promotion="tile_scalar"),
            "tile_scalar n112": config(112, promotion="tile_scalar"),
            "tile_scalar m64 n80": config(80, promotion="tile_scalar", tile_m=64),
            "per_column n192 s3": dataclasses.replace(config(192), max_concurrent_steps=3),
            "per_column n128 cluster2": config(128, cluster_n=2),
            "tile_scalar n80 cluster2": config(80, promotion="tile_scalar", cluster_n=2),
            "per_column n48 unpadded b": config(48, pad_b=False)}


def _scaled(key, shape, row_axis, block_axes):
    """Normal values times exp(2 randn) per row (``row_axis``) and per 128-block along ``block_axes``."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, shape)
    rows = [1] * len(shape)
    rows[row_axis] = shape[row_axis]
    x = x * jnp.exp(2 * jax.random.normal(k2, rows))
    blocks = [-(-shape[a] // 128) if a in block_axes else 1 for a in range(len(shape))]
    b = jnp.exp(2 * jax.random.normal(k3, blocks))
    for a in block_axes:
        b = jnp.repeat(b, 128, axis=a)
    return x * b[tuple(slice(0, s) for s in shape)]


def _abs(x):
    return jnp.abs(x.astype(jnp.float32)).astype(x.dtype)


def cases(implementation: str = "mosaic_gpu"):
    """name -> (kernel(config) -> [rows, n] f32 valid rows, xla(abs: bool) -> the same rows, k_grouped).
    ``implementation``: "mosaic_gpu", or "interpret" to try this script on a CPU (slow)."""
    interpret = implementation == "interpret"
    key = jax.random.split(jax.random.key(0), 6)
    x, w = _scaled(key[0], (300, 520), 0, (1,)), _scaled(key[1], (3, 330, 520), 1, (1, 2))
    (a, sa), (b, sb) = per_token_cast_to_fp8(x), jax.vmap(per_block_cast_to_fp8)(w)
    starts, ends = jnp.array([0, 100, 100], jnp.int32), jnp.array([70, 100, 300], jnp.int32)
    row_groups = jnp.array([0] * 70 + [-1] * 30 + [2] * 200, jnp.int32)
    valid = np.asarray(row_groups) >= 0
    xm = _scaled(key[2], (3, 150, 520), 1, (2,))
    am, sam = jax.vmap(per_token_cast_to_fp8)(xm)
    masked_m = jnp.array([1, 0, 150], jnp.int32)
    dy, act = _scaled(key[3], (640, 96), 1, (0,)), _scaled(key[4], (640, 136), 1, (0,))
    qa, qb = per_channel_cast_to_fp8(dy), per_channel_cast_to_fp8(act)
    ka, ksa, kb, ksb = qa.data.T, qa.scale.T, qb.data.T, qb.scale.T
    group_ks = jnp.array([256, 0, 384], jnp.int32)
    f32 = jnp.float32

    def pick(absolute, *xs):
        return tuple(_abs(v) if absolute and v.dtype == jnp.float8_e4m3fn else v for v in xs)

    return {
        "fp8_gemm_nt 300x330x520": (
            lambda c: (api.fp8_gemm_nt((a, sa), (b[0], sb[0]), out_dtype=f32, implementation=implementation) if c is None
                       else kernel_ops.fp8_gemm_nt(a, sa, b[0], sb[0], out_dtype=f32, interpret=interpret, config=c)),
            lambda ab: reference.fp8_gemm_nt(*pick(ab, a, sa, b[0], sb[0]), f32), False),
        "contiguous 70/skip30/0/200": (
            lambda c: (api.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), row_groups, out_dtype=f32,
                                                            implementation=implementation) if c is None
                       else kernel_ops.m_grouped_contiguous(a, sa, b, sb, starts, ends, out_dtype=f32, interpret=interpret,
                                                            config=c))[valid],
            lambda ab: reference.m_grouped_fp8_gemm_nt_contiguous(*pick(ab, a, sa, b, sb), row_groups, f32)[valid],
            False),
        "masked 1/0/150 (group 2)": (
            lambda c: (api.m_grouped_fp8_gemm_nt_masked((am, sam), (b, sb), masked_m, 64, out_dtype=f32,
                                                        implementation=implementation) if c is None
                       else kernel_ops.m_grouped_masked(am, sam, b, sb, masked_m, 64, out_dtype=f32, interpret=interpret,
                                                        config=c))[2],
            lambda ab: reference.m_grouped_fp8_gemm_nt_masked(*pick(ab, am, sam, b, sb), masked_m, f32)[2], False),
        "k_grouped 256/0/384": (
            lambda c: (api.k_grouped_fp8_gemm_nt_contiguous((ka, ksa), (kb, ksb), group_ks, implementation=implementation)
                       if c is None else kernel_ops.k_grouped_contiguous(ka, ksa, kb, ksb, group_ks, interpret=interpret,
                                                                         config=c)),
            lambda ab: reference.k_grouped_fp8_gemm_nt_contiguous(*pick(ab, ka, ksa, kb, ksb), group_ks), True),
    }


def compare(kernel, xla, magnitude) -> dict:
    kernel, xla, magnitude = (np.asarray(v, np.float64) for v in (kernel, xla, magnitude))
    bad = ~(np.abs(kernel - xla) <= RTOL * (np.abs(xla) + magnitude))  # NaN counts as bad
    return {"ok": not bad.any(), "bad_elements": int(bad.sum()), "elements": int(bad.size),
            "max_rel_err": float(np.nanmax(np.abs(kernel - xla) / (np.abs(xla) + magnitude + 1e-30)))}


def run(implementation: str = "mosaic_gpu") -> list[dict]:
    from pallas_kernels.dispatch import num_sms_of_device
    from pallas_kernels.interpret import INTERPRET_SMS
    num_sms = INTERPRET_SMS if implementation == "interpret" else num_sms_of_device()
    rows = []
    for name, (kernel, xla, k_grouped) in cases(implementation).items():
        expected, magnitude = xla(False), xla(True)
        for label, config in variant_configs(num_sms).items():
            if k_grouped and config is not None and config.promotion == "tile_scalar":
                continue  # the weight-gradient GEMM's B scales are per column
            if implementation == "interpret" and config is not None and config.cluster_n > 1:
                continue  # clusters are GPU-only (interpreter_differences.check_interpretable)
            row = {"case": name, "config": label}
            try:
                row.update(compare(kernel(config), expected, magnitude))
            except Exception as error:
                row.update(ok=False, error=f"{type(error).__name__}: {error}"[:400])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def check(rows: list[dict]) -> None:
    failed = [f"{r['case']} [{r['config']}]" for r in rows if not r.get("ok")]
    if failed:
        raise AssertionError(f"FP8 kernel != XLA path for {len(failed)} of {len(rows)}: {', '.join(failed)}")


if __name__ == "__main__":
    check(run("interpret" if "--interpret" in sys.argv else "mosaic_gpu"))
