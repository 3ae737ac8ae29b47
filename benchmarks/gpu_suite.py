"""Every GPU check and benchmark in one command, for the few minutes a GPU is lent (H200 target < 8 min).

1. Roofline peers measured now: copy bandwidth, bf16 matmul rate.
2. FP8 GEMM kernels against the XLA path (all four ops, every kernel variant, scale-stressing inputs; the
   section fails if any element differs beyond float32 rounding: ``benchmarks/fp8_correctness.py``).
3. FP8 GEMM speed over DeepGEMM's shapes (``benchmarks/fp8_gemm.py``) and the variant sweep
   (``benchmarks/fp8_sweep.py``).
4. Training-step throughput (``benchmarks/train_tiny.py``).
5. MLA decoding: the kernel validated against float64 and XLA (``gpu_validation.py``), FlashMLA's sweep
   (``benchmarks/mla_decode.py``), racecheck of its barriers.
6. The MoE grouped-matmul variants (``benchmarks/grouped_matmul.py``), ptxas registers of the FP8 kernel
   (``fp8_registers``, not run by default: the same for every kernel variant).

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

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fp8_gemm  # noqa: E402
from timing import copy_bandwidth_gbps, matmul_tflops  # noqa: E402


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
    """Each op, the default config and every kernel variant, on scale-stressing inputs: Mosaic GPU kernel ==
    XLA path element by element (``fp8_correctness.py``). Prints every row, then raises AssertionError naming
    the failures (the child exits non-zero and the suite records the error)."""
    import fp8_correctness as correctness
    rows = correctness.run()
    correctness.check(rows)
    return rows


def tile_sweep() -> list[dict]:
    """The kernel variants (promotion, tile_m, tile_n, stages, clusters, unpadded B) on two shapes: the quick
    sweep of ``fp8_sweep.py`` (18 configs; the full one, 117, is ``python benchmarks/fp8_gemm.py --sweep``)."""
    import fp8_sweep
    rows = fp8_sweep.run(quick=True)
    print(fp8_sweep.format_table(rows), file=sys.stderr)
    return rows


def fp8_registers() -> list[dict]:
    """ptxas registers and spills of each FP8 kernel variant (``fp8_sweep.registers``)."""
    import fp8_sweep
    return fp8_sweep.registers()


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
    children = {"fp8_correctness": fp8_correctness, "fp8_tile_sweep": tile_sweep, "fp8_registers": fp8_registers,
                "training": training,
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
        "fp8_tile_sweep": (lambda t: in_subprocess("fp8_tile_sweep", t), 300),
        "fp8_registers": (lambda t: in_subprocess("fp8_registers", t), 300),  # not in the default list
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
