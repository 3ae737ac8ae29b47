"""MLA decoding: FlashMLA's benchmark sweep (GPU) and ``jaxseek generate`` throughput (any machine).

Sweep (FlashMLA's test): b = 128, mean s_k in {4096, 8192}, h_q in {16, 32, 64, 128}, s_q in {1, 2}, varlen
on/off (lengths ~ N(s_k, s_k / 2), at least s_q), h_kv = 1, d = 576, dv = 512, causal. FlashMLA's formulas:
FLOPs = s_q * total_seqlens * h_q * (d + dv) * 2;
bytes = (total_seqlens * d + b * s_q * h_q * (d + dv)) * 2.
The varlen cases run again over the FP8 cache (656 bytes a token instead of 1152 in the bytes formula),
dequantised in the kernel. Reports each implementation available on the device (the XLA path always) and % of the copy bandwidth
measured in the same run.

    python benchmarks/mla_decode.py --sweep          # on a GPU
    python benchmarks/mla_decode.py --generate DIR   # tokens/s of `jaxseek generate` from a trained run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import copy_bandwidth_gbps, gpu_kernel_ms  # noqa: E402

from pallas_kernels.dispatch import on_hopper  # noqa: E402
from pallas_kernels.mla_decode.api import flash_mla_with_kvcache  # noqa: E402
from pallas_kernels.mla_decode.fp8_cache import fp8_row_bytes, quantize_kv_cache  # noqa: E402
from pallas_kernels.mla_decode.metadata import BLOCK_SIZE, get_mla_metadata  # noqa: E402

D, DV = 576, 512


def sweep_case(batch, mean_sk, h_q, s_q, varlen, implementations, fp8=False):
    rng = np.random.default_rng(0)
    lengths = (np.maximum(rng.normal(mean_sk, mean_sk / 2, batch), s_q) if varlen else np.full(batch, mean_sk))
    lengths = lengths.astype(np.int32)
    max_blocks = int(-(-lengths.max() // BLOCK_SIZE))
    table = rng.permutation(batch * max_blocks).reshape(batch, max_blocks).astype(np.int32)
    cache = jax.random.normal(jax.random.key(0), (batch * max_blocks, BLOCK_SIZE, 1, D), jnp.bfloat16) / 10
    if fp8:
        cache = quantize_kv_cache(cache, DV)
    q = jax.random.normal(jax.random.key(1), (batch, s_q, h_q, D), jnp.bfloat16) / 10
    lens = jnp.asarray(lengths)
    meta = get_mla_metadata(lens, s_q * h_q, 1)
    total = int(lengths.sum())
    flops = s_q * total * h_q * (D + DV) * 2
    row_bytes = fp8_row_bytes(D, DV) if fp8 else D * 2
    moved = total * row_bytes + batch * s_q * h_q * (D + DV) * 2
    row = {"b": batch, "s_k": mean_sk, "h_q": h_q, "s_q": s_q, "varlen": varlen, "cache": "fp8" if fp8 else "bf16"}
    outputs = {}
    for name in implementations:
        fn = jax.jit(lambda q, c, t, l, m, name=name: flash_mla_with_kvcache(q, c, t, l, DV, m, causal=True,
                                                                             implementation=name))
        outputs[name] = fn(q, cache, jnp.asarray(table), lens, meta)
        ms = gpu_kernel_ms(fn, q, cache, jnp.asarray(table), lens, meta)
        row[f"{name}_us"] = ms * 1e3
        row[f"{name}_gbps"] = moved / ms / 1e6
        row[f"{name}_tflops"] = flops / ms / 1e9
    if "mosaic_gpu" in outputs:  # the kernel's first GPU runs validate it against the XLA path
        (out, lse), (ref_out, ref_lse) = outputs["mosaic_gpu"], outputs["xla"]
        row["mosaic_gpu_out_max_err"] = float(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)).max())
        row["mosaic_gpu_lse_max_err"] = float(jnp.abs(lse - ref_lse).max())
    return row


def sweep(quick: bool = False) -> dict:
    """FlashMLA's sweep; ``quick``: s_k 4096, h_q 16/64/128, varlen only (bf16 and FP8 caches)."""
    implementations = ["xla"] + (["mosaic_gpu"] if on_hopper() else [])
    copy = copy_bandwidth_gbps()
    rows = []
    caches = ((True, False), (True, True)) if quick else ((False, False), (True, False), (True, True))
    for mean_sk in (4096,) if quick else (4096, 8192):
        for h_q in (16, 64, 128) if quick else (16, 32, 64, 128):
            for s_q in (1, 2):
                for varlen, fp8 in caches:
                    try:
                        rows.append(sweep_case(128, mean_sk, h_q, s_q, varlen, implementations, fp8))
                    except Exception as error:  # one failing case must not hide the others
                        rows.append({"s_k": mean_sk, "h_q": h_q, "s_q": s_q, "varlen": varlen,
                                     "cache": "fp8" if fp8 else "bf16", "error": f"{type(error).__name__}: {error}"[:300]})
                    print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        for name in implementations:
            if f"{name}_gbps" in row:
                row[f"{name}_copy_fraction"] = row[f"{name}_gbps"] / copy
    return {"copy_gbps": copy, "rows": rows}


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
    parser.add_argument("--generate", metavar="RUN_DIR")
    args = parser.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if args.sweep:
        report["sweep"] = sweep()
    if args.generate:
        report["generate"] = generate_throughput(args.generate)
    print(json.dumps(report, indent=2))
    (HERE / "results" / f"mla_decode_{jax.devices()[0].platform}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
