"""MLA decoding: FlashMLA's benchmark sweep (GPU), its CUDA-export dry run (any machine), and ``jaxseek
generate`` throughput (any machine).

Sweep (FlashMLA's test, widened as issue 19 asks): b in {64, 128}, mean s_k in {1024, 2048, 4096, 8192, 16384}
with varlen lengths (~ N(s_k, s_k / 2), at least s_q), h_q in {16, 32, 64, 128}, s_q in {1, 2}, h_kv = 1,
d = 576, dv = 512, causal, over the bf16 cache and the FP8 cache (656 bytes a token, dequantised in the
kernel). FlashMLA's formulas: FLOPs = s_q * total_seqlens * h_q * (d + dv) * 2; bytes = total_seqlens *
row_bytes + b * s_q * h_q * (d + dv) * 2 (row_bytes 1152 bf16, 656 FP8). Each case runs the XLA path and,
on Hopper, each kernel variant (``KERNEL_VARIANTS``: as is, and with approximate exp2/log2), and ASSERTS
kernel == XLA path (out within FlashMLA's tolerance of the XLA output,
lse within 1e-3): a mismatching case is reported as an error row, and the sweep exits non-zero. The copy
bandwidth is measured in the same run; each row gives its GB/s as a fraction of it.

    python benchmarks/mla_decode.py --sweep [--quick] [--batch 128 --s-k 4096,16384 --h-q 128 --cache fp8]
    python benchmarks/mla_decode.py --dry-run [--quick]   # exports each swept kernel config for CUDA (CPU)
    python benchmarks/mla_decode.py --generate DIR        # tokens/s of `jaxseek generate` from a trained run
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this checkout's packages, not an installed copy
from timing import copy_bandwidth_gbps, gpu_kernel_ms  # noqa: E402

from pallas_kernels.dispatch import on_hopper  # noqa: E402
from pallas_kernels.mla_decode.api import flash_mla_with_kvcache  # noqa: E402
from pallas_kernels.mla_decode.fp8_cache import FP8KVCache, fp8_row_bytes, quantize_kv_cache  # noqa: E402
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE, get_mla_metadata  # noqa: E402

D, DV = 576, 512
SCALE = D ** -0.5
KERNEL_VARIANTS = {"mosaic_gpu": {}, "mosaic_gpu_approx_math": {"approx_math": True}}  # name -> DecodeConfig fields


class SweepCase(NamedTuple):
    batch: int
    mean_sk: int
    h_q: int
    s_q: int
    fp8: bool


def sweep_cases(quick: bool = False, batches=None, s_ks=None, h_qs=None, caches=None) -> list[SweepCase]:
    """FlashMLA's grid (varlen); ``quick``: b 128, s_k 4096/16384, h_q 16/128 (16 cases, the gpu_suite
    section); the other arguments filter it."""
    grid = dict(batch=(128,), mean_sk=(4096, 16384), h_q=(16, 128)) if quick else dict(
        batch=(64, 128), mean_sk=(1024, 2048, 4096, 8192, 16384), h_q=(16, 32, 64, 128))
    return [SweepCase(b, sk, h, s, c == "fp8")
            for b in batches or grid["batch"] for sk in s_ks or grid["mean_sk"] for h in h_qs or grid["h_q"]
            for s in (1, 2) for c in caches or ("bf16", "fp8")]


def case_lengths(case: SweepCase) -> np.ndarray:
    """[batch] int32 varlen cache lengths, the same on every machine (seeded)."""
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(case.mean_sk, case.mean_sk / 2, case.batch), case.s_q).astype(np.int32)


def case_shapes(case: SweepCase) -> tuple[int, int]:
    """(max_blocks, num_blocks) of the case's block table and cache."""
    max_blocks = int(-(-case_lengths(case).max() // BLOCK_SIZE))
    return max_blocks, case.batch * max_blocks


def kernel_matches_xla(out, lse, xla_out, xla_lse) -> dict:
    """FlashMLA's tolerance between the kernel and the XLA path on the same inputs."""
    out, xla_out = np.asarray(out, np.float64), np.asarray(xla_out, np.float64)
    lse, xla_lse = np.asarray(lse, np.float64), np.asarray(xla_lse, np.float64)
    finite = np.isfinite(xla_lse)
    out_ok = bool(np.isfinite(out).all() and (np.abs(out - xla_out) <= np.maximum(8e-4, 2.01 / 128 * np.abs(xla_out))).all())
    lse_ok = bool((np.isinf(lse) == np.isinf(xla_lse)).all() and (np.abs(lse - xla_lse)[finite] <= 1e-3).all())
    return {"out_max_err": float(np.nanmax(np.abs(out - xla_out))), "lse_max_err": float(np.abs(lse - xla_lse)[finite].max()),
            "kernel_matches_xla": out_ok and lse_ok}


def sweep_case(case: SweepCase, implementations) -> dict:
    lengths = case_lengths(case)
    max_blocks, num_blocks = case_shapes(case)
    table = jnp.asarray(np.random.default_rng(1).permutation(num_blocks).reshape(case.batch, max_blocks).astype(np.int32))
    cache = jax.random.normal(jax.random.key(0), (num_blocks, BLOCK_SIZE, 1, D), jnp.bfloat16) / 10
    if case.fp8:
        cache = quantize_kv_cache(cache, DV)
    q = jax.random.normal(jax.random.key(1), (case.batch, case.s_q, case.h_q, D), jnp.bfloat16) / 10
    lens = jnp.asarray(lengths)
    meta = get_mla_metadata(lens, case.s_q * case.h_q, 1)
    total = int(lengths.sum())
    flops = case.s_q * total * case.h_q * (D + DV) * 2
    row_bytes = fp8_row_bytes(D, DV) if case.fp8 else D * 2
    moved = total * row_bytes + case.batch * case.s_q * case.h_q * (D + DV) * 2
    row = {"b": case.batch, "s_k": case.mean_sk, "h_q": case.h_q, "s_q": case.s_q, "varlen": True,
           "cache": "fp8" if case.fp8 else "bf16"}
    outputs = {}
    for name in implementations:
        fn = jax.jit(functools.partial(_decode, implementation=name))
        outputs[name] = fn(q, cache, table, lens, meta)
        ms = gpu_kernel_ms(fn, q, cache, table, lens, meta)
        row[f"{name}_us"] = ms * 1e3
        row[f"{name}_gbps"] = moved / ms / 1e6
        row[f"{name}_tflops"] = flops / ms / 1e9
    for name in KERNEL_VARIANTS:
        if name in outputs:
            row.update({f"{name}_{key}": value for key, value in kernel_matches_xla(*outputs[name], *outputs["xla"]).items()})
            if not row[f"{name}_kernel_matches_xla"]:
                raise AssertionError(f"{name} != XLA path: {row}")
    return row


def _decode(q, cache, table, lens, meta, *, implementation: str):
    """The XLA path, or a kernel variant of ``KERNEL_VARIANTS`` through the kernel's own entry point."""
    if implementation not in KERNEL_VARIANTS:
        return flash_mla_with_kvcache(q, cache, table, lens, DV, meta, causal=True, implementation=implementation)
    from pallas_kernels.mla_decode.kernel_ops import flash_mla

    return flash_mla(q, cache, table, lens, meta, head_dim_v=DV, softmax_scale=SCALE, causal=True, interpret=False,
                     kernel_options=KERNEL_VARIANTS[implementation])


def sweep(cases: list[SweepCase]) -> dict:
    """Times every case (XLA path; the kernel too on Hopper, asserted equal to it) and the copy bandwidth."""
    implementations = ["xla"] + (list(KERNEL_VARIANTS) if on_hopper() else [])
    copy = copy_bandwidth_gbps()
    rows = []
    for case in cases:
        try:
            rows.append(sweep_case(case, implementations))
        except Exception as error:  # one failing case must not hide the others
            rows.append({**case._asdict(), "error": f"{type(error).__name__}: {error}"[:400]})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        for name in implementations:
            if f"{name}_gbps" in row:
                row[f"{name}_copy_fraction"] = row[f"{name}_gbps"] / copy
    return {"copy_gbps": copy, "rows": rows, "failed": sum("error" in row for row in rows)}


def export_case(case: SweepCase, variant: str = "mosaic_gpu") -> dict:
    """The case's kernel path (layout, split-KV kernel, combine) exported for CUDA from abstract shapes:
    the real Mosaic GPU lowering (SMEM budget, TMA and wgmma rules) without a GPU or the case's memory."""
    from pallas_kernels.mla_decode.metadata import num_sm_parts

    S = jax.ShapeDtypeStruct
    max_blocks, num_blocks = case_shapes(case)
    cache = (FP8KVCache(S((num_blocks, BLOCK_SIZE, 1, DV), jnp.float8_e4m3fn), S((num_blocks, BLOCK_SIZE, 1, D - DV),
                                                                                 jnp.bfloat16),
                        S((num_blocks, 1, DV // 128, BLOCK_SIZE), jnp.float32))
             if case.fp8 else S((num_blocks, BLOCK_SIZE, 1, D), jnp.bfloat16))
    slots = num_sm_parts(case.s_q * case.h_q, 1) + case.batch
    meta = get_mla_metadata(jnp.zeros((case.batch,), jnp.int32), case.s_q * case.h_q, 1)
    meta = jax.tree.map(lambda x: S(x.shape, x.dtype), meta)
    assert meta.work.shape == (slots, 4)
    args = (S((case.batch, case.s_q, case.h_q, D), jnp.bfloat16), cache, S((case.batch, max_blocks), jnp.int32),
            S((case.batch,), jnp.int32), meta)
    start = time.perf_counter()
    exported = jax.export.export(jax.jit(functools.partial(_decode, implementation=variant)), platforms=["cuda"])(*args)
    return {**case._asdict(), "variant": variant, "exported_s": round(time.perf_counter() - start, 2),
            "mosaic_kernels": exported.mlir_module().count("stablehlo.custom_call @mosaic_gpu")}


def dry_run(cases: list[SweepCase], variants=tuple(KERNEL_VARIANTS)) -> dict:
    """Exports every case's kernel, in every variant, for CUDA; a case that does not lower is an error row."""
    rows = []
    for case in cases:
        for variant in variants:
            try:
                rows.append(export_case(case, variant))
            except Exception as error:
                rows.append({**case._asdict(), "variant": variant, "error": f"{type(error).__name__}: {error}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "failed": sum("error" in row for row in rows)}


def generate_throughput(run_dir: str, new_tokens: int = 128, batch: int = 4) -> dict:
    """Decode tokens/s of ``Generator`` (second call: compilation excluded)."""
    from jaxseek.generate import Generator, SamplingConfig, load_model

    generator = Generator(load_model(run_dir), max_blocks_per_seq=8)
    prompts = [list(b"import os\n"), list(b"def main():\n    "), list(b"class Tree:\n"), list(b"#")][:batch]
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    generator.generate(prompts, sampling)  # compile
    start = time.perf_counter()
    outputs = generator.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {"platform": jax.devices()[0].platform, "batch": batch, "new_tokens_per_request": new_tokens,
            "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="export each swept kernel config for CUDA, run nothing")
    parser.add_argument("--quick", action="store_true", help="the 16-case subset (gpu_suite's section)")
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--batch", type=ints)
    parser.add_argument("--s-k", type=ints)
    parser.add_argument("--h-q", type=ints)
    parser.add_argument("--cache", type=lambda text: text.split(","), help="bf16,fp8")
    parser.add_argument("--generate", metavar="RUN_DIR")
    args = parser.parse_args()
    cases = sweep_cases(args.quick, args.batch, args.s_k, args.h_q, args.cache)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.dry_run:
        report["dry_run"] = dry_run(cases)
    if args.sweep:
        report["sweep"] = sweep(cases)
    if args.generate:
        report["generate"] = generate_throughput(args.generate)
    print(json.dumps(report, indent=2))
    name = "dry_run" if args.dry_run and not args.sweep else jax.devices()[0].platform
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"mla_decode_{name}.json").write_text(json.dumps(report, indent=2))
    if any(report.get(key, {}).get("failed") for key in ("dry_run", "sweep")):
        sys.exit(1)


if __name__ == "__main__":
    main()
