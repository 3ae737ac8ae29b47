"""Every GPU check and benchmark in one command, for the few minutes a GPU is lent (H200 target < 8 min).

1. Roofline peers measured now: copy bandwidth, bf16 matmul rate.
2. FP8 GEMM kernels on odd shapes against the XLA reference (all four ops, on the GPU).
3. FP8 GEMM speed over DeepGEMM's shapes (``benchmarks/fp8_gemm.py``) and a small tile sweep.
4. Training-step throughput (``benchmarks/train_tiny.py``).
5. MLA decoding: the kernel validated against float64 and XLA (``gpu_validation.py``), FlashMLA's sweep
   (``benchmarks/mla_decode.py``), racecheck of its barriers.
6. The MoE grouped-matmul variants (``benchmarks/grouped_matmul.py``), ptxas registers of the FP8 kernel.

Sections that run a kernel for the first time run in child processes with a time limit, so a hang or
fault costs only that section; ``--deadline-s`` bounds the whole run.

    python benchmarks/gpu_suite.py [--quick] [--sections a,b,...] [--deadline-s S] [--out DIR]

Imports only jax, flax, optax, orbax and rich (the lent GPU machine has no polars).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fp8_gemm  # noqa: E402
from timing import copy_bandwidth_gbps, gpu_kernel_ms, matmul_tflops  # noqa: E402


def child_rows(script_args: list[str], timeout_s: int) -> list[dict]:
    """Runs ``python *script_args`` in a child process (a kernel that hangs or faults on the GPU must not stop
    the suite) and returns the JSON objects it printed, one per line, plus an error row if it failed;
    on a timeout, the rows it had printed so far."""
    import subprocess
    try:
        done = subprocess.run([sys.executable, *script_args], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")] + [
            {"error": f"timed out after {timeout_s} s"}]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode:
        rows.append({"error": f"exit {done.returncode}: {done.stderr[-1500:]}"})
    return rows


def in_subprocess(section: str, timeout_s: int = 240) -> list[dict]:
    """A section of this suite in a child process."""
    return child_rows([__file__, "--child", section] + (["--quick"] if "--quick" in sys.argv else []), timeout_s)


def fp8_correctness() -> list[dict]:
    """Each op on unaligned shapes, ragged/empty groups: Mosaic GPU kernel vs the XLA path."""
    from pallas_kernels.fp8_gemm import api
    from pallas_kernels.numerics import calc_diff
    from pallas_kernels.quant import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8

    key = jax.random.key
    x = jax.random.normal(key(0), (300, 520))
    w = jax.random.normal(key(1), (3, 200, 520))
    qx, qw = per_token_cast_to_fp8(x), jax.vmap(per_block_cast_to_fp8)(w)
    m_indices = jnp.array([0] * 70 + [-1] * 30 + [2] * 200, jnp.int32)
    xm = jax.random.normal(key(2), (3, 150, 520))
    qxm = jax.vmap(per_token_cast_to_fp8)(xm)
    masked_m = jnp.array([1, 0, 150], jnp.int32)
    dy, act = jax.random.normal(key(3), (640, 96)), jax.random.normal(key(4), (640, 136))
    qa, qb = per_channel_cast_to_fp8(dy), per_channel_cast_to_fp8(act)
    group_ks = jnp.array([256, 0, 384], jnp.int32)
    cases = {
        "fp8_gemm_nt 300x200x520": lambda impl: api.fp8_gemm_nt(qx, (qw.data[0], qw.scale[0]), implementation=impl),
        "fp8_gemm_nt 1x200x520": lambda impl: api.fp8_gemm_nt((qx.data[:1], qx.scale[:1]), (qw.data[0], qw.scale[0]),
                                                              implementation=impl),
        "contiguous ragged 70/skip30/0/200": lambda impl: api.m_grouped_fp8_gemm_nt_contiguous(
            qx, qw, m_indices, implementation=impl),
        "masked 1/0/150": lambda impl: api.m_grouped_fp8_gemm_nt_masked(qxm, qw, masked_m, 64, implementation=impl)[2],
        "k_grouped 256/0/384": lambda impl: api.k_grouped_fp8_gemm_nt_contiguous(
            (qa.data.T, qa.scale.T), (qb.data.T, qb.scale.T), group_ks, implementation=impl),
    }
    rows = []
    for name, fn in cases.items():
        try:
            kernel, xla = np.asarray(fn("mosaic_gpu"), np.float32), np.asarray(fn("xla"), np.float32)
            rows.append({"case": name, "calc_diff_vs_xla": calc_diff(kernel, xla),
                         "max_abs_diff": float(np.abs(kernel - xla).max()), "finite": bool(np.isfinite(kernel).all())})
        except Exception as error:
            rows.append({"case": name, "error": f"{type(error).__name__}: {error}"[:400]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tile_sweep(m=4096, n=7168, k=16384) -> list[dict]:
    """A few kernel configs on one compute-bound shape (what the heuristic should pick)."""
    from pallas_kernels.fp8_gemm import kernel_ops, reference, schedule
    from pallas_kernels.dispatch import num_sms_of_device
    from pallas_kernels.fp8_gemm.config import select_config
    from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig
    from pallas_kernels.quant import per_block_cast_to_fp8, per_token_cast_to_fp8

    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16)
    (a, sa), (b, sb) = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
    sb_cols = reference.block_scales_per_column(sb, n)[None]
    sms = num_sms_of_device()
    heuristic, _ = select_config(m // 128, n, 2, num_sms=sms)
    configs = [heuristic] + [KernelConfig(tile_n=t, max_concurrent_steps=s, num_sms=sms, grid_tile_width=w)
                             for t, s, w in ((128, 4, 16), (128, 3, 8), (96, 4, 8))]
    rows = []
    for config in configs:
        def run(a, sa, b, sb_cols, config=config):
            return kernel_ops.run(a, sa, b[None], sb_cols, row_tiles=m // 128, out_dtype=jnp.bfloat16, interpret=False,
                              make_tiles=lambda mp, ks: (schedule.dense_tiles(m, mp, 128, ks), mp), config=config)
        try:
            ms = gpu_kernel_ms(jax.jit(run), a, sa, b, sb_cols)
            rows.append({"config": str(config), "tflops": 2 * m * n * k / ms / 1e9, "heuristic": config is heuristic})
        except Exception as error:
            rows.append({"config": str(config), "error": f"{type(error).__name__}: {error}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def mla_decode_sweep(quick: bool) -> dict:
    """FlashMLA's sweep, 16 cases (b 128, s_k 4096/16384, h_q 16/128, s_q 1/2, bf16/FP8; 8 with ``quick``), each
    kernel asserted == XLA path; the full 160-case grid is ``mla_decode.py --sweep`` on its own."""
    import mla_decode
    cases = mla_decode.sweep_cases(quick=True)
    return mla_decode.sweep([c for c in cases if c.mean_sk == 4096] if quick else cases)


def training() -> list[dict]:
    import train_tiny
    return [train_tiny.measure("tiny", 20), train_tiny.measure("small", 20, bf16=True)]


def grouped_matmuls() -> list[dict]:
    import grouped_matmul
    return grouped_matmul.run()


def validation(check: str, timeout_s: int) -> list[dict]:
    """A ``gpu_validation.py`` check in a child process."""
    return child_rows([str(HERE / "gpu_validation.py"), check], timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes per benchmark")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--sections", default="peers,fp8_correctness,fp8_gemm,training,fp8_tile_sweep,mla_validate,"
                        "mla_decode,grouped_matmul,racecheck,ptxas", help="comma-separated subset of the sections to run")
    parser.add_argument("--deadline-s", type=float, default=480, help="skip sections once this much time has passed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    children = {"fp8_correctness": fp8_correctness, "fp8_tile_sweep": tile_sweep, "training": training,
                "grouped_matmul": grouped_matmuls, "mla_decode": lambda: mla_decode_sweep(args.quick)}
    if args.child:
        result = children[args.child]()
        for row in result if isinstance(result, list) else [result]:
            print(json.dumps(row), flush=True)
        return
    device = jax.devices()[0]
    report = {"device": device.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"{device.device_kind}, jax {jax.__version__}", flush=True)
    # name -> (run(time limit in s), its own limit); child sections never outlive the suite's deadline
    sections = {
        "peers": (lambda _: {"copy_gbps": copy_bandwidth_gbps(), "bf16_matmul_tflops": matmul_tflops()}, None),
        "fp8_correctness": (lambda t: in_subprocess("fp8_correctness", t), 240),
        "fp8_gemm": (lambda _: fp8_gemm.run(args.quick), None),
        "training": (lambda t: in_subprocess("training", t), 150),
        "fp8_tile_sweep": (lambda t: in_subprocess("fp8_tile_sweep", t), 240),
        "mla_validate": (lambda t: validation("mla_kernel", t), 200),
        "mla_decode": (lambda t: in_subprocess("mla_decode", t), 200),
        "grouped_matmul": (lambda t: in_subprocess("grouped_matmul", t), 120),
        "racecheck": (lambda t: validation("racecheck", t), 170),
        "ptxas": (lambda t: validation("ptxas", t), 130),
    }
    suite_start = time.time()
    for name in args.sections.split(","):
        section, limit = sections[name]
        left = args.deadline_s - (time.time() - suite_start)
        if left < 20:
            report[name] = {"skipped": f"past the {args.deadline_s:.0f} s deadline"}
            print(f"== {name}: skipped (deadline)", flush=True)
            continue
        start = time.time()
        try:
            report[name] = section(int(min(limit, left)) if limit else None)
        except Exception:
            report[name] = {"error": traceback.format_exc()[-2000:]}
        print(f"== {name} ({time.time() - start:.0f} s): {json.dumps(report[name])[:3000]}", flush=True)
    if isinstance(report.get("fp8_gemm"), list):
        print(fp8_gemm.format_table(report["fp8_gemm"]))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'gpu_suite.json'}")


if __name__ == "__main__":
    main()
