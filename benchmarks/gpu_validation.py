"""Checks that only a GPU can make, for the few minutes one is lent (each runs as a gpu_suite section).

- ``mla_kernel``: the split-KV MLA decoding kernel (``implementation="mosaic_gpu"``) on the cases the CPU
  interpreter runs, at full size (576/512, h_q up to 128, s_q 1 and 2 causal, lengths 0/1/63/65/long,
  NaN-poisoned unused slots, shuffled block tables, split sequences), bf16 and FP8 caches: against
  float64 with FlashMLA's tolerances and against the XLA path (``kernel_matches_xla``: FlashMLA's out tolerance,
  lse within 1e-3), on FlashMLA's inputs and on peaky ones (scores ~ N(0, 9): a zeroed P, a dropped
  accumulator, a lost page or a 2% softmax-scale error in the GPU-only branches moves lse by ~0.1 there).
- ``racecheck``: one small kernel call under ``compute-sanitizer --tool racecheck`` (the two-warpgroup
  barriers; the interpreter's race detector does not see them).
- ``ptxas``: registers and spills of the FP8 GEMM kernel as ptxas reports them.

    python benchmarks/gpu_validation.py {mla_kernel|racecheck|racecheck-child|ptxas}

Prints one JSON object per line. Imports only jax, numpy, pytest (for the tests' case builders) and the
project's kernels.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MLA_CASES = [  # (seqlens, s_q, h_q, causal, forced SM parts or None = the device's, score std or None)
    ((0, 1, 63, 65, 600), 1, 16, False, None, None),
    ((7, 530, 64, 1), 2, 32, True, 8, None),
    ((500, 3, 4100), 2, 64, True, None, None),
    ((70, 1000, 2000, 64), 1, 128, False, 16, None),
    ((4096,) * 8, 1, 128, False, None, None),
    ((2048, 17, 3000, 129), 2, 128, True, None, None),
    ((7, 530, 64, 1), 2, 32, True, 8, 3.0),
    ((70, 1000, 2000, 64), 1, 128, False, None, 3.0),
]


def _emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _out_close(out, ref, peaky: bool) -> bool:
    """FlashMLA's elementwise tolerance; on peaky inputs (outputs ~ a few V rows) 8e-3 of the largest output,
    as the interpreted test (test_kernel_in_interpreter_with_peaky_softmax_matches_float64_and_xla)."""
    import numpy as np

    if peaky:
        return bool(np.abs(out - ref).max() <= 8e-3 * np.abs(ref).max())
    return bool((np.abs(out - ref) <= np.maximum(8e-4, 2.01 / 128 * np.abs(ref))).all())


def mla_kernel() -> list[dict]:
    import jax.numpy as jnp
    import numpy as np
    from test_mla_decode import make_case, reference64

    from pallas_kernels.mla_decode.api import flash_mla_with_kvcache
    from pallas_kernels.mla_decode.fp8_cache import dequantize_kv_cache, quantize_kv_cache
    from pallas_kernels.mla_decode.metadata import get_mla_metadata

    rows = []
    for cache_kind in ("bf16", "fp8"):
        for seqlens, s_q, h_q, causal, parts, score_std in MLA_CASES:
            row = {"cache": cache_kind, "seqlens": list(seqlens)[:6], "batch": len(seqlens), "s_q": s_q, "h_q": h_q,
                   "causal": causal, "sm_parts": parts, "score_std": score_std}
            try:
                start = time.time()
                q, cache, table, lens = make_case(seqlens, s_q, h_q, seed=len(seqlens), score_std=score_std)
                if cache_kind == "fp8":
                    cache = quantize_kv_cache(cache, 512)
                    unused = jnp.isnan(dequantize_kv_cache(cache)[..., 0]).transpose(0, 2, 1)[:, :, None, :]
                    cache = cache._replace(scales=jnp.where(unused, jnp.nan, cache.scales))
                    oracle_cache = dequantize_kv_cache(cache)
                else:
                    oracle_cache = cache
                kwargs = {} if parts is None else {"num_sms": parts * -(-s_q * h_q // 64)}
                metadata = get_mla_metadata(lens, s_q * h_q, 1, **kwargs)
                row["max_splits"] = int(metadata.num_splits.max())
                out, lse = flash_mla_with_kvcache(q, cache, table, lens, 512, metadata, causal=causal,
                                                  implementation="mosaic_gpu")
                xla_out, xla_lse = flash_mla_with_kvcache(q, cache, table, lens, 512, metadata, causal=causal,
                                                          implementation="xla")
                ref_out, ref_lse = reference64(q, oracle_cache, table, lens, 512, 576 ** -0.5, causal)
                out64, lse64 = np.asarray(out, np.float64), np.asarray(lse, np.float64)
                finite = np.isfinite(ref_lse)
                row.update(
                    finite=bool(np.isfinite(out64).all()),
                    out_max_err=float(np.abs(out64 - ref_out).max()),
                    out_within_flashmla_tol=_out_close(out64, ref_out, score_std is not None),
                    lse_max_err=float(np.abs(lse64[finite] - ref_lse[finite]).max()) if finite.any() else 0.0,
                    lse_inf_pattern_ok=bool(np.array_equal(np.isinf(lse64), np.isinf(ref_lse))),
                    kernel_vs_xla_max_diff=float(np.abs(out64 - np.asarray(xla_out, np.float64)).max()),
                    kernel_vs_xla_lse_max_diff=float(np.abs(lse64 - np.asarray(xla_lse, np.float64))[finite].max())
                    if finite.any() else 0.0,
                    kernel_matches_xla=_out_close(out64, np.asarray(xla_out, np.float64), score_std is not None)
                    and bool((np.abs(lse64 - np.asarray(xla_lse, np.float64))[finite] <= 1e-3).all()),
                    xla_out_max_err=float(np.abs(np.asarray(xla_out, np.float64) - ref_out).max()),
                    seconds=round(time.time() - start, 1))
                row["ok"] = (row["finite"] and row["out_within_flashmla_tol"] and row["lse_inf_pattern_ok"]
                             and row["kernel_matches_xla"])
            except Exception as error:  # one failing case must not hide the others
                row["error"] = f"{type(error).__name__}: {error}"[:600]
            rows.append(_emit(row))
    return rows


def racecheck_child() -> None:
    """The small kernel call that ``racecheck`` runs under the sanitizer (bf16 and FP8 pages)."""
    import numpy as np
    from test_mla_decode import make_case

    from pallas_kernels.mla_decode.api import flash_mla_with_kvcache
    from pallas_kernels.mla_decode.fp8_cache import quantize_kv_cache
    q, cache, table, lens = make_case((100, 3), 2, 64, seed=1)
    for kv in (cache, quantize_kv_cache(np.nan_to_num(np.asarray(cache, np.float32)).astype(cache.dtype), 512)):
        out, _ = flash_mla_with_kvcache(q, kv, table, lens, 512, causal=True, implementation="mosaic_gpu")
        print(json.dumps({"child_finite": bool(np.isfinite(np.asarray(out, np.float32)).all())}), flush=True)


def racecheck(timeout_s: int = 150) -> list[dict]:
    command = ["compute-sanitizer", "--tool", "racecheck", "--racecheck-report", "hazard",
               sys.executable, __file__, "racecheck-child"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    except FileNotFoundError:
        return [_emit({"racecheck": "compute-sanitizer not found on PATH"})]
    except subprocess.TimeoutExpired as error:
        tail = (error.stdout or b"")[-1500:]
        return [_emit({"racecheck": f"timed out after {timeout_s} s", "tail": str(tail)})]
    lines = (done.stdout + done.stderr).splitlines()
    summary = [line for line in lines if "RACECHECK SUMMARY" in line or "hazard" in line.lower()][:20]
    return [_emit({"racecheck_exit": done.returncode, "summary": summary,
                   "child_rows": [line for line in lines if line.startswith("{")], "tail": lines[-15:]})]


def ptxas() -> list[dict]:
    """Compiles the FP8 GEMM kernel once with Mosaic GPU's ptxas dump on and keeps the register lines."""
    env = {**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_PTX": "0"}
    code = ("import jax, jax.numpy as jnp\n"
            "from pallas_kernels.quant import per_token_cast_to_fp8, per_block_cast_to_fp8\n"
            "from pallas_kernels.fp8_gemm import fp8_gemm_nt\n"
            "x = jax.random.normal(jax.random.key(0), (4096, 7168), jnp.bfloat16)\n"
            "w = jax.random.normal(jax.random.key(1), (4096, 7168), jnp.bfloat16)\n"
            "y = fp8_gemm_nt(per_token_cast_to_fp8(x), per_block_cast_to_fp8(w), implementation='mosaic_gpu')\n"
            "print(float(y[0, 0]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(ROOT))
    lines = (done.stdout + done.stderr).splitlines()
    keep = [line.strip() for line in lines if any(k in line for k in ("registers", "spill", "Used", "stack frame"))]
    return [_emit({"ptxas_exit": done.returncode, "lines": keep[:40], "tail": lines[-5:] if done.returncode else []})]


if __name__ == "__main__":
    {"mla_kernel": mla_kernel, "racecheck": racecheck, "racecheck-child": racecheck_child, "ptxas": ptxas}[sys.argv[1]]()
