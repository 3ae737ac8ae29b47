"""Pipeline schedules (``sharding.dualpipe`` + ``sharding.pipeline``) compared, in one run.

1. The comparison table, from the schedules the executor runs: simulated bubble (DualPipe README units: F=1,
   B=2, W=1, F&B=3) beside the published formula, peak activations per rank, parameters per rank, copies
   per stage, and the executor's ticks (its SPMD program length) and ring-buffer depth.
2. Measured step time of each schedule on 8 fake CPU devices: ``pipeline_step`` on a residual-MLP stage
   (d x 4d x d, GELU) with an MSE head, 8 stages (DualPipeV: 4 ranks x 8 stages), the same micro-batches,
   calls interleaved round by round; medians, as ratios against 1F1B. On a CPU the fake devices share the
   cores, so a bubble costs little here and the ratios mostly reflect the recomputation each schedule's
   B/W split does (B and W each re-run the stage forward); the bubble columns are the schedule-level result.

    python benchmarks/pipeline.py [--out benchmarks/results/pipeline_cpu.json] [--chunks 16] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sharding.dualpipe import KINDS, account, build_schedule, published_bubble  # noqa: E402
from sharding.pipeline import PipelineFns, PipelineParams, pipeline_step  # noqa: E402
from sharding.pipeline_ticks import compile_ticks  # noqa: E402


def mlp_fns() -> PipelineFns:
    def pre(w, batch):
        return batch[0] @ w

    def stage(p, x):
        return x + jax.nn.gelu(x @ p["up"]) @ p["down"], jnp.zeros((), jnp.float32), ()

    def head(w, y, batch):
        return jnp.mean((y @ w - batch[1]) ** 2), ()
    return PipelineFns(pre, stage, head)


def mlp_params(stages: int, hidden: int) -> PipelineParams:
    keys = jax.random.split(jax.random.key(0), 4)
    scale = hidden ** -0.5
    return PipelineParams(jax.random.normal(keys[0], (hidden, hidden)) * scale,
                          {"up": jax.random.normal(keys[1], (stages, hidden, 4 * hidden)) * scale,
                           "down": jax.random.normal(keys[2], (stages, 4 * hidden, hidden)) * scale / 2},
                          jax.random.normal(keys[3], (hidden, hidden)) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/pipeline_cpu.json")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--micro", type=int, default=32, help="rows per micro-batch")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    console = Console(width=150)
    stages = 8
    ranks = {"1f1b": 8, "zb1p": 8, "dualpipe": 8, "dualpipev": 4}
    table = Table(title=f"pipeline schedules, {stages} stages, {args.chunks} micro-batches (F=1, B=2, W=1, F&B=3)")
    for column in ("schedule", "ranks", "bubble", "published", "peak activations", "params / rank",
                   "copies / stage", "executor ticks", "ring depth", "step time vs 1F1B"):
        table.add_column(column, justify="right")
    rows, steps = {}, {}
    fns = mlp_fns()
    params = mlp_params(stages, args.hidden)
    keys = jax.random.split(jax.random.key(1), 2)
    batch = (jax.random.normal(keys[0], (args.chunks * args.micro, args.hidden)),
             jax.random.normal(keys[1], (args.chunks * args.micro, args.hidden)))
    for kind in KINDS:
        schedule = build_schedule(kind, ranks[kind], args.chunks)
        row = account(schedule)
        tables = compile_ticks(schedule)
        rows[kind] = {**row._asdict(), "published_bubble": published_bubble(kind, stages),
                      "ticks": tables.num_ticks, "ring_depth": tables.depth}
        mesh = Mesh(np.array(jax.devices()[:ranks[kind]]), ("pp",))
        step = jax.jit(lambda p, b, schedule=schedule, mesh=mesh: pipeline_step(schedule, fns, p, b, mesh=mesh))
        start = time.perf_counter()
        jax.block_until_ready(step(params, batch))
        rows[kind]["compile_s"] = time.perf_counter() - start
        steps[kind] = step
        console.print(f"compiled {kind} in {rows[kind]['compile_s']:.1f} s")
    times = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            start = time.perf_counter()
            jax.block_until_ready(steps[kind](params, batch))
            times[kind].append(time.perf_counter() - start)
    base = statistics.median(times["1f1b"])
    for kind in KINDS:
        median = statistics.median(times[kind])
        rows[kind].update(step_s=median, step_vs_1f1b=median / base)
        r = rows[kind]
        table.add_row(kind, str(r["num_ranks"]), f"{r['bubble']:g}", f"{r['published_bubble']:g}",
                      str(r["peak_activations"]), str(r["parameters_per_rank"]), str(r["copies_per_stage"]),
                      str(r["ticks"]), str(r["ring_depth"]), f"{r['step_vs_1f1b']:.2f}x")
    console.print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "devices": jax.device_count(), "rows": rows}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
