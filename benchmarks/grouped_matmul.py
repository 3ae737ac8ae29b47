"""Grouped-matmul variants (``jaxseek/model/grouped_matmul.py``) side by side on MoE-shaped inputs.

For 8, 64 and 256 experts: 4096 rows (tokens x top-k copies, sorted by expert), in 256, out 256, f32,
group sizes from a random top-k routing with uneven expert popularity (some experts get few or no rows).
Per variant: FLOPs and their ratio to the ideal (2 rows in out forward; 3x that for forward+backward of
sum(y * g)), ``compiled.memory_analysis().temp_size_in_bytes``, and the median wall time of the jitted
call (``block_until_ready``), beside a dense [rows, in] x [in, out] matmul timed in the same run.

FLOPs: XLA's ``cost_analysis`` counts a while-loop body once, whatever the trip count (jax 0.10.2;
checked by ``tests/test_grouped_matmul.py::test_xla_counts_a_loop_body_once``). So for a program with a
loop (the "tiled" variant) ``flops`` is XLA's count of the same variant unrolled over its static tile
bound (``unroll=True``, counted on the lowered HLO: the worst case for any group sizes), and
``xla_flops_as_reported`` keeps the misleading loop-once number. Other programs report XLA's count of the
compiled program (``flops_method`` says which, and whether it holds a loop). On a GPU that count is XLA's
report, not the work done: jax 0.11.2 on an H200 gave lax.ragged_dot 0.06x the ideal at 8 experts (the
GEMM runs outside what the analysis counts) and turned the capacity einsum's scatter into a loop.

    python benchmarks/grouped_matmul.py [--experts 8 64 256] [--note TEXT]
    # writes benchmarks/results/grouped_matmul_<platform>.json

Imports only jax, numpy and the standard library (plus jaxseek's grouped_matmul, which imports only jax).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from timing import median_seconds  # noqa: E402

from jaxseek.model import grouped_matmul as gm  # noqa: E402

ROWS, IN_DIM, OUT_DIM = 4096, 256, 256
EXPERTS = (8, 64, 256)


def routed_group_sizes(rows: int, experts: int, seed: int = 0) -> np.ndarray:
    """[experts] int32 rows per expert from a random top-k routing of rows // top_k tokens.

    Scores are Gaussian plus a per-expert popularity bias (std 0.5), so loads are uneven like a real router's.
    """
    top_k = min(8, max(1, experts // 4))
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(rows // top_k, experts)) + 0.5 * rng.normal(size=experts)  # [tokens, experts]
    chosen = np.argsort(-scores, axis=1)[:, :top_k]  # [tokens, top_k] distinct experts per token
    return np.bincount(chosen.ravel(), minlength=experts).astype(np.int32)


def _cost(stage) -> float:
    """FLOPs from a Lowered or Compiled's cost_analysis (a dict, or a one-element list on some versions)."""
    analysis = stage.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def _temp_bytes(compiled) -> int | None:
    memory = compiled.memory_analysis()
    return None if memory is None else int(memory.temp_size_in_bytes)


def _has_while(compiled) -> bool:
    return " while(" in compiled.as_text()


def _median_ms(fn, *args) -> float:
    """Median wall time in ms of an already compiled call. A call over 1 s (ragged_dot at 256 experts on a
    CPU) counts its first run and takes 3 runs in all; faster calls get a warm-up and 3 to 10 runs."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - start
    if once > 1.0:
        return 1e3 * statistics.median([once, median_seconds(fn, *args, warmup=0, repeats=1),
                                        median_seconds(fn, *args, warmup=0, repeats=1)])
    repeats = int(min(10, max(3, 0.3 / max(once, 1e-6))))
    return 1e3 * median_seconds(fn, *args, warmup=0, repeats=repeats)


def _unrolled_tiled(x, w, sizes):
    return gm.tiled_grouped_matmul(x, w, sizes, unroll=True)


def _programs(fn):
    """(forward, forward+backward of sum(y * g)) of ``fn``, jitted."""
    forward = jax.jit(fn)
    step = jax.jit(jax.value_and_grad(lambda x, w, sizes, g: jnp.sum(fn(x, w, sizes) * g), (0, 1)))
    return forward, step


def measure(name: str, experts: int, seed: int = 0) -> dict:
    """One variant at one expert count: FLOPs (forward, forward+backward), temp memory, wall times."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(ROWS, IN_DIM)), jnp.float32)  # [rows, in]
    w = jnp.asarray(rng.normal(size=(experts, IN_DIM, OUT_DIM)) / np.sqrt(IN_DIM), jnp.float32)
    g = jnp.asarray(rng.normal(size=(ROWS, OUT_DIM)), jnp.float32)  # [rows, out] cotangent
    sizes = jnp.asarray(routed_group_sizes(ROWS, experts, seed))  # [experts] int32
    ideal = 2 * ROWS * IN_DIM * OUT_DIM

    forward, step = _programs(gm.GROUPED_MATMULS[name])
    fwd_compiled = forward.lower(x, w, sizes).compile()
    step_compiled = step.lower(x, w, sizes, g).compile()
    looped = _has_while(fwd_compiled) or _has_while(step_compiled)
    row = {"variant": name, "experts": experts, "rows": ROWS, "in": IN_DIM, "out": OUT_DIM, "dtype": "float32",
           "max_group": int(sizes.max()), "empty_groups": int((sizes == 0).sum()), "has_while_loop": looped,
           "ideal_flops_fwd": ideal, "ideal_flops_fwd_bwd": 3 * ideal}
    if looped and name == "tiled":
        # The unrolled program is the same HLO on every backend; count it lowered for the CPU, since a GPU
        # Lowered.cost_analysis() gives no FLOPs (jax 0.11.2 on an H200) and compiling 496 unrolled tiles is slow.
        counted_fwd, counted_step = _programs(_unrolled_tiled)
        on_cpu = jax.device_put((x, w, sizes, g), jax.devices("cpu")[0])
        row["flops_fwd"] = _cost(counted_fwd.lower(*on_cpu[:3]))
        row["flops_fwd_bwd"] = _cost(counted_step.lower(*on_cpu))
        row["flops_method"] = "unrolled over the static tile bound, lowered HLO counted on CPU (worst case)"
        row["xla_flops_as_reported_fwd"] = _cost(fwd_compiled)
        row["xla_flops_as_reported_fwd_bwd"] = _cost(step_compiled)
        plan = gm.plan_tiles(ROWS, experts)
        row.update(tile=plan.tile, max_tiles=plan.max_tiles, used_tiles=int(gm.tile_map(sizes, plan).num_tiles))
    else:
        row["flops_fwd"], row["flops_fwd_bwd"] = _cost(fwd_compiled), _cost(step_compiled)
        row["flops_method"] = ("compiled cost_analysis, loop bodies counted once (undercount)" if looped
                               else "compiled cost_analysis (no loops)")
    row["flops_ratio_fwd"] = row["flops_fwd"] / ideal
    row["flops_ratio_fwd_bwd"] = row["flops_fwd_bwd"] / (3 * ideal)
    row["temp_bytes_fwd"], row["temp_bytes_fwd_bwd"] = _temp_bytes(fwd_compiled), _temp_bytes(step_compiled)
    row["ms_fwd"] = _median_ms(fwd_compiled, x, w, sizes)
    row["ms_fwd_bwd"] = _median_ms(step_compiled, x, w, sizes, g)
    reference = jax.jit(gm.ragged_dot_grouped_matmul)(x, w, sizes)
    row["max_abs_diff_vs_ragged_dot"] = float(jnp.max(jnp.abs(fwd_compiled(x, w, sizes) - reference)))
    return row


def run(platform_note: str | None = None, experts: tuple[int, ...] = EXPERTS) -> list[dict]:
    """Every variant at every expert count; one row each (a failing one records its error)."""
    device = jax.devices()[0]
    dense = jax.jit(lambda a, b: a @ b)
    x, w = jnp.ones((ROWS, IN_DIM), jnp.float32), jnp.ones((IN_DIM, OUT_DIM), jnp.float32)
    common = {"platform": jax.default_backend(), "device": device.device_kind, "jax": jax.__version__,
              "note": platform_note, "picked": gm.grouped_matmul_for(jax.default_backend()),
              "dense_ms_fwd": _median_ms(dense, x, w)}
    rows = []
    for count in experts:
        for name in gm.GROUPED_MATMULS:
            try:
                row = {**common, **measure(name, count)}
            except Exception as error:  # one failing variant must not hide the others
                row = {**common, "variant": name, "experts": count, "error": f"{type(error).__name__}: {error}"[:400]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| experts | variant | FLOPs / ideal fwd | fwd+bwd | temp MiB fwd | fwd+bwd | ms fwd | ms fwd+bwd "
             "| dense ms | max abs diff |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['experts']} | {r['variant']} | failed: {r['error'][:100]} ||||||||")
            continue
        lines.append(f"| {r['experts']} | {r['variant']} | {r['flops_ratio_fwd']:.2f} | {r['flops_ratio_fwd_bwd']:.2f} "
                     f"| {mib(r['temp_bytes_fwd'])} | {mib(r['temp_bytes_fwd_bwd'])} | {r['ms_fwd']:.2f} "
                     f"| {r['ms_fwd_bwd']:.2f} | {r['dense_ms_fwd']:.2f} | {r['max_abs_diff_vs_ragged_dot']:.1e} |")
    return "\n".join(lines)


def write_results(rows: list[dict], path: pathlib.Path | None = None) -> pathlib.Path:
    path = path or HERE / "results" / f"grouped_matmul_{jax.default_backend()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(["python", "benchmarks/grouped_matmul.py", *sys.argv[1:]]),
                                "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument("--note", default=None, help="free text recorded with every row (machine, conditions)")
    args = parser.parse_args()
    rows = run(args.note, tuple(args.experts))
    print(format_table(rows))
    print(f"wrote {write_results(rows)}")


if __name__ == "__main__":
    main()
