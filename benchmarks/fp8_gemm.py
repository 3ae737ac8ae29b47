"""FP8 GEMM speed over DeepGEMM's published shapes, beside bf16 and XLA's per-tensor FP8 in the same run.

Normal GEMMs: M in {64, 128, 4096} x DeepGEMM's (N, K) list; m-grouped contiguous and masked lists.
Time is the GPU time of everything the jitted op launches (operand layout included), by CUPTI, L2
flushed before each call. TFLOPS = 2mnk / t; GB/s = (m k + n k + 2 m n) / t for FP8 inputs and bf16
output (DeepGEMM's formula; grouped: all groups' weights); % of the H200's 1979 dense FP8 TFLOPS.
Every row is checked against a bf16 product (calc_diff < 1e-3, DeepGEMM's criterion).

    python benchmarks/fp8_gemm.py [--quick]     # on a Hopper GPU; writes benchmarks/results/fp8_gemm.json
    python benchmarks/fp8_gemm.py --sweep [--quick] [--dry-run | --registers]   # the kernel variants (fp8_sweep.py)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import gpu_kernel_ms  # noqa: E402

from pallas_kernels.fp8_gemm import api  # noqa: E402
from pallas_kernels.numerics import calc_diff  # noqa: E402
from pallas_kernels.quant import per_block_cast_to_fp8, per_token_cast_to_fp8  # noqa: E402

FP8_PEAK_TFLOPS = 1979.0  # H100/H200/H800 dense FP8 tensor-core peak
NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
NORMAL = [(m, n, k) for m in (64, 128, 4096) for n, k in NK]
CONTIGUOUS = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]
MASKED = [(g, m, n, k) for g, m in ((1, 1024), (2, 512), (4, 256)) for n, k in ((4096, 7168), (7168, 2048))]


def _row(kind, shape, flops, bytes_moved, ms, diff, peers):
    tflops = flops / ms / 1e9
    row = {"kind": kind, "shape": shape, "us": ms * 1e3, "tflops": tflops, "gbps": bytes_moved / ms / 1e6,
           "fp8_peak_pct": 100 * tflops / FP8_PEAK_TFLOPS, "calc_diff": diff}
    row.update({f"{name}_tflops": flops / peer_ms / 1e9 for name, peer_ms in peers.items()})
    return row


def bench_normal(m, n, k):
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16)
    lhs, rhs = jax.jit(per_token_cast_to_fp8)(x), jax.jit(per_block_cast_to_fp8)(w)
    ours = jax.jit(lambda l, r: api.fp8_gemm_nt(l, r, implementation="mosaic_gpu"))
    diff = calc_diff(ours(lhs, rhs), jnp.dot(x, w.T, preferred_element_type=jnp.float32))
    bf16 = jax.jit(lambda a, b: a @ b.T)
    per_tensor = jax.jit(lambda a, b, s: jnp.dot(a, b.T, preferred_element_type=jnp.bfloat16) * s)
    a8, b8 = x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn)
    peers = {"bf16_dot": gpu_kernel_ms(bf16, x, w),
             "xla_fp8_per_tensor": gpu_kernel_ms(per_tensor, a8, b8, jnp.bfloat16(1.0))}
    return _row("normal", f"{m}x{n}x{k}", 2 * m * n * k, m * k + n * k + 2 * m * n, gpu_kernel_ms(ours, lhs, rhs),
                diff, peers)


def bench_contiguous(g, m_per_group, n, k):
    m = g * m_per_group
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (g, n, k), jnp.bfloat16)
    lhs, rhs = jax.jit(per_token_cast_to_fp8)(x), jax.jit(jax.vmap(per_block_cast_to_fp8))(w)
    m_indices = jnp.repeat(jnp.arange(g, dtype=jnp.int32), m_per_group)
    ours = jax.jit(lambda l, r, i: api.m_grouped_fp8_gemm_nt_contiguous(l, r, i, implementation="mosaic_gpu"))
    sizes = jnp.full((g,), m_per_group, jnp.int32)
    ragged = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), s))
    diff = calc_diff(ours(lhs, rhs, m_indices), ragged(x, w, sizes))
    peers = {"bf16_dot": gpu_kernel_ms(ragged, x, w, sizes)}
    return _row("contiguous", f"{g}x{m_per_group}x{n}x{k}", 2 * m * n * k, m * k + g * n * k + 2 * m * n,
                gpu_kernel_ms(ours, lhs, rhs, m_indices), diff, peers)


def bench_masked(g, m, n, k):
    x = jax.random.normal(jax.random.key(0), (g, m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (g, n, k), jnp.bfloat16)
    lhs, rhs = jax.jit(jax.vmap(per_token_cast_to_fp8))(x), jax.jit(jax.vmap(per_block_cast_to_fp8))(w)
    masked_m = jnp.full((g,), m, jnp.int32)
    ours = jax.jit(lambda l, r, mm: api.m_grouped_fp8_gemm_nt_masked(l, r, mm, m, implementation="mosaic_gpu"))
    batched = jax.jit(lambda a, b: jnp.einsum("gmk,gnk->gmn", a, b))
    diff = calc_diff(ours(lhs, rhs, masked_m), batched(x, w).astype(jnp.float32))
    peers = {"bf16_dot": gpu_kernel_ms(batched, x, w)}
    return _row("masked", f"{g}x{m}x{n}x{k}", 2 * g * m * n * k, g * (m * k + n * k + 2 * m * n),
                gpu_kernel_ms(ours, lhs, rhs, masked_m), diff, peers)


def run(quick: bool = False) -> list[dict]:
    cases = ([("normal", s) for s in NORMAL] + [("contiguous", s) for s in CONTIGUOUS]
             + [("masked", s) for s in MASKED])
    if quick:
        cases = [("normal", (4096, 7168, 16384)), ("normal", (128, 7168, 16384)), ("contiguous", CONTIGUOUS[0]),
                 ("masked", MASKED[0])]
    bench = {"normal": bench_normal, "contiguous": bench_contiguous, "masked": bench_masked}
    rows = []
    for kind, shape in cases:
        try:
            rows.append(bench[kind](*shape))
        except Exception as error:  # one failing shape must not hide the others
            rows.append({"kind": kind, "shape": "x".join(map(str, shape)), "error": f"{type(error).__name__}: {error}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| kind | shape | us | TFLOPS | GB/s | % FP8 peak | bf16 TFLOPS | XLA FP8 per-tensor TFLOPS | calc_diff |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['shape']} | failed: {r['error'][:80]} |||||||")
            continue
        per_tensor = f"{r['xla_fp8_per_tensor_tflops']:.0f}" if "xla_fp8_per_tensor_tflops" in r else "-"
        lines.append(f"| {r['kind']} | {r['shape']} | {r['us']:.0f} | {r['tflops']:.0f} | {r['gbps']:.0f} | "
                     f"{r['fp8_peak_pct']:.1f} | {r['bf16_dot_tflops']:.0f} | {per_tensor} | {r['calc_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time every kernel variant (fp8_sweep.py)")
    parser.add_argument("--dry-run", action="store_true", help="with --sweep: only export each variant for CUDA")
    parser.add_argument("--registers", action="store_true", help="with --sweep: ptxas registers/spills per variant")
    args = parser.parse_args()
    if args.sweep and args.registers:
        import fp8_sweep
        fp8_sweep.registers()
        return
    if args.sweep:
        import fp8_sweep
        rows = fp8_sweep.dry_run(args.quick) if args.dry_run else fp8_sweep.run(args.quick)
        print(fp8_sweep.format_table(rows) if not args.dry_run else
              f"{sum(r['ok'] for r in rows)} of {len(rows)} swept configs export for CUDA")
        if not all(r["ok"] for r in rows):
            raise SystemExit(1)
        if not args.dry_run:
            out = pathlib.Path(__file__).resolve().parent / "results" / "fp8_sweep.json"
            out.write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows},
                                      indent=2))
        return
    rows = run(args.quick)
    print(format_table(rows))
    out = pathlib.Path(__file__).resolve().parent / "results" / "fp8_gemm.json"
    out.write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
