"""Expert parallelism (``sharding.ep``: DeepEP's normal, internode and low-latency modes) measured.

1. Bytes per token (NumPy arithmetic on a DeepSeek-V3-like routing, no devices): 256 experts, top-8 inside
   the 4 best of 8 expert groups (``noaux_tc`` without the bias), sigmoid affinities with a per-expert
   popularity offset (busiest expert ~3.8x the mean load, busiest of 8 ranks ~1.2x), 4096 tokens per rank,
   hidden 7168, over 8 and 64 ranks, and the measured shape of 2. Per token, bf16 rows (2H bytes) or FP8 rows
   (H + 4H/128: e4m3 + a float32 scale per 128 channels):
   - min: the theoretical minimum, one row per distinct destination rank other than the token's own;
   - useful: rows ``dispatch`` sends to other ranks that carry a token (min less the dropped copies);
   - buffer: what the fixed-capacity ``all_to_all`` moves between ranks, (R-1) x C rows per rank, padding
     included, plus the routing metadata (int32 ids + float32 weights, 8 x top_k bytes a row);
   - DeepEP per pair: one row per (token, expert) pair on another rank, as the low-latency mode sends;
   - low-latency buffer: what ``low_latency_dispatch``'s ``all_to_all`` moves with M = tokens per rank, the
     whole (R-1) x L x M message buffer (DeepEP's header-and-payload messages);
   - across nodes (8 ranks a node; 8 ranks as 2 nodes of 4): payload bytes of the flat dispatch (a row per
     destination rank) and of ``hierarchical_dispatch`` (a row per destination node), by ``inter_node_bytes``.
   Capacity C and expanded rows N are ``sharding.ep.normal``'s own (``pair_capacity``, ``expanded_rows``);
   drops follow ``dispatch``'s rules (the rows of 2 record its own count beside this one).
2. Overhead (8 fake CPU devices; on a GPU the visible ones, up to 8): jit-compiled ``shard_map`` programs of
   ``dispatch`` + ``combine`` (expanded layout, weights) against a plain ``jax.lax.all_to_all`` round trip of
   the same [R, C, H] payload (FP8: e4m3 data and scales there, bf16 back, as ``combine`` sends), calls
   interleaved round by round in one process; medians. DeepEP's other modes in the same rounds, against the
   same peer: ``hierarchical_dispatch`` + ``hierarchical_combine`` on 2 nodes x R/2 ranks, and
   ``low_latency_dispatch`` + ``low_latency_combine`` with M = tokens per rank (dropless rows only; it is
   built for decoding batches). Profile rows in the same rounds: metadata only (the routing layout, the two
   metadata exchanges and the expansion's argsort), dispatch only, DeepEP V1's per-rank rows
   (``expand=False``, no expansion). (FP8 rows move as uint8 inside ``dispatch``: XLA:CPU gathers float8 rows
   an order of magnitude slower, measured here before the change.)
3. Train step: ``jaxseek.train.train`` on the tiny preset with ``ep=8`` (rules "ep", MoE strategy "ep") against
   ``dp=8`` (rules "dp", MoE local), same seed and data, runs alternating ep, dp, ep, dp: median tokens/s,
   compile time, and the largest relative difference between the per-step losses of ep and dp.
4. Off the CPU only (XLA:CPU has no ``ragged_all_to_all``), in the same rounds as 2: ``dispatch(...,
   transport="ragged")`` + ``combine``, which moves only the filled rows of each [C]-row block, and a plain
   ``jax.lax.ragged_all_to_all`` round trip of the same rows into the same block layout.

On fake CPU devices an ``all_to_all`` is a memory copy between threads of one process: the ratios measure
what our code does around the collective (layout, sort, gathers, FP8 casts), not network bandwidth.

    python benchmarks/ep.py [--quick] [--json PATH]    # ~6-9 min on 2 shared cores; --quick: ~25 s
    # writes benchmarks/results/ep_<platform>.json (--quick writes only with --json)

Imports jax, numpy, rich and ``sharding.ep``; the train step's modules (polars, Orbax) only when it runs.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from timing import median_seconds  # noqa: E402

from pallas_kernels.quant import FP8Array, dequantize_per_token, per_token_cast_to_fp8  # noqa: E402
from sharding.ep.hierarchical import hierarchical_combine, hierarchical_dispatch  # noqa: E402
from sharding.ep.low_latency import low_latency_combine, low_latency_dispatch  # noqa: E402
from sharding.ep.normal import combine, dispatch  # noqa: E402
from ep_bytes import (BYTE_SHAPES, MEASURED, QUICK, WIRES, RoutingShape, byte_rows, deepseek_routing,  # noqa: E402
                      inter_node_rows, simulate_dispatch)

# --- 2. dispatch + combine against the collective --------------------------------------------------

class Exchange(NamedTuple):
    """One way of moving tokens to their experts and back, timed against the same ``all_to_all`` peer.

    ``round_trip(x [T, H], topk_idx [T, K], topk_weights [T, K], *, num_experts, capacity_factor, use_fp8)``
    runs per rank inside a ``shard_map`` over a mesh of ``mesh_shape(ranks)`` (axis names to sizes; tokens
    are split over all of them) and returns (y [T, H], num_dropped [1] int32). Another mode joins ``EXCHANGES``
    as one such function."""

    round_trip: Callable
    mesh_shape: Callable[[int], dict] = lambda ranks: {"ep": ranks}
    wires: tuple[str, ...] = WIRES
    ragged: bool = False  # uses lax.ragged_all_to_all: skipped on the CPU
    dropless_only: bool = False  # takes no capacity factor: timed once, with the dropless rows


def _normal(stage: str, transport: str = "all_to_all") -> Callable:
    def round_trip(x, idx, w, *, num_experts, capacity_factor, use_fp8):
        d = dispatch(x, idx, w, num_experts=num_experts, capacity_factor=capacity_factor, use_fp8=use_fp8,
                     expand=stage != "v1", transport=transport)
        dropped = d.num_dropped[None]
        if stage == "metadata":  # no token rows move: layout, metadata all_to_alls, the expansion's argsort
            return d.expert_ids, d.weights, dropped
        if stage == "dispatch":
            return d.x, dropped
        return combine(d.x, d.handle, None if stage == "v1" else d.weights), dropped
    return round_trip


def _hierarchical(x, idx, w, *, num_experts, capacity_factor, use_fp8):
    """DeepEP's internode normal mode: across nodes once per destination node, then inside the node."""
    d = hierarchical_dispatch(x, idx, w, num_experts=num_experts, capacity_factor=capacity_factor, use_fp8=use_fp8)
    return hierarchical_combine(d.x, d.handle, d.weights), d.num_dropped[None]


def _low_latency(x, idx, w, *, num_experts, capacity_factor, use_fp8):
    """DeepEP's low-latency mode, M = this rank's tokens: one message per (token, expert) pair into the masked
    layout [L, R*M, H], FP8 rows dequantised as an FP8 expert's input would be, the weighted combine."""
    del capacity_factor  # buffers hold every pair: M >= tokens
    d = low_latency_dispatch(x, idx, x.shape[0], num_experts, use_fp8=use_fp8)
    y = d.x
    if use_fp8:
        local, rows, hidden = y.data.shape
        flat = FP8Array(y.data.reshape(local * rows, hidden), y.scale.reshape(local * rows, -1))
        y = dequantize_per_token(flat).reshape(local, rows, hidden).astype(x.dtype)
    return low_latency_combine(y, idx, w, d.handle), d.num_dropped[None]


EXCHANGES = {"dispatch+combine": Exchange(_normal("dispatch+combine")),
             "dispatch+combine, ragged": Exchange(_normal("dispatch+combine", "ragged"), ragged=True),
             "hierarchical (2 nodes) dispatch+combine": Exchange(
                 _hierarchical, mesh_shape=lambda ranks: {"node": 2, "local": ranks // 2}),
             "low-latency dispatch+combine": Exchange(_low_latency, dropless_only=True)}
PROFILE = {"metadata only": Exchange(_normal("metadata")), "dispatch only": Exchange(_normal("dispatch")),
           "V1 rows dispatch+combine": Exchange(_normal("v1"))}


def _mesh(shape: dict) -> Mesh:
    size = int(np.prod(list(shape.values())))
    return Mesh(np.asarray(jax.devices()[:size]).reshape(tuple(shape.values())), tuple(shape))


def _mapped(mesh: Mesh, fn: Callable) -> Callable:
    spec = P(tuple(mesh.axis_names))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def _placed(mesh: Mesh, *arrays) -> tuple:
    return tuple(jax.device_put(a, NamedSharding(mesh, P(tuple(mesh.axis_names)))) for a in arrays)


def peer_round_trip(mesh: Mesh, ranks: int, capacity: int, hidden: int, wire: str) -> tuple[Callable, tuple]:
    """A plain ``all_to_all`` of [R, C, H] rows there and [R, C, H] bf16 rows back; FP8: e4m3 data and
    [R, C, H/128] float32 scales there, an independent bf16 buffer back (what ``combine`` returns)."""
    axis = mesh.axis_names[0]

    def a2a(rows):
        return jax.lax.all_to_all(rows.reshape((ranks, capacity) + rows.shape[1:]), axis, 0, 0).reshape(rows.shape)

    rows = jnp.ones((ranks * ranks * capacity, hidden), jnp.bfloat16)
    if wire == "bf16":
        return _mapped(mesh, lambda x: a2a(a2a(x))), _placed(mesh, rows)
    q = per_token_cast_to_fp8(rows.astype(jnp.float32))
    return _mapped(mesh, lambda d, s, back: (a2a(d), a2a(s), a2a(back))), _placed(mesh, q.data, q.scale, rows)


def paired_medians(programs: dict[str, tuple[Callable, tuple]], rounds: int) -> dict[str, float]:
    """Median seconds of each program; one call each first, then ``rounds`` rounds that call every program in
    turn (a fast one several times per round, one over 2 s in the first 3 rounds only), so load from other
    processes falls on all of them alike. Each timing follows one untimed call of the same program: without
    it, the program timed right after the low-latency mode (E x M messages a rank: GiBs) ran ~4x slower."""
    repeats, slow = {}, set()
    for name, (fn, args) in programs.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once = time.perf_counter() - start
        repeats[name] = int(min(5, max(1, 0.1 / once)))
        if once > 2.0:
            slow.add(name)
    times = {name: [] for name in programs}
    for round_index in range(rounds):
        for name, (fn, args) in programs.items():
            if name not in slow or round_index < 3:
                times[name].append(median_seconds(fn, *args, warmup=1, repeats=repeats[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def overhead_rows(shape: RoutingShape, rounds: int, profile: bool, console: Console) -> list[dict]:
    """Per (wire, capacity factor): the peer and every exchange (and profile stage), ms and ratio to the peer."""
    ranks = min(shape.ranks, jax.device_count())
    shape = shape._replace(ranks=ranks)
    idx, w = deepseek_routing(shape)
    x = np.random.default_rng(1).standard_normal((ranks * shape.tokens, shape.hidden)).astype(jnp.bfloat16)
    exchanges = {**EXCHANGES, **(PROFILE if profile else {})}
    on_cpu, out = jax.default_backend() == "cpu", []
    if on_cpu:
        console.print("  ragged_all_to_all rows skipped: XLA:CPU does not implement it")
    for factor in (None, 1.25):
        simulated = simulate_dispatch(idx, shape, factor)
        for wire in WIRES:
            programs, dropped = {}, {}
            peer_mesh = _mesh({"ep": ranks})
            programs["all_to_all round trip"] = peer_round_trip(peer_mesh, ranks, simulated["capacity"],
                                                                shape.hidden, wire)
            if not on_cpu:
                programs["ragged_all_to_all round trip"] = ragged_peer(
                    peer_mesh, simulated_sent(idx, shape, simulated["capacity"]), simulated["capacity"], shape.hidden,
                    wire)
            for name, exchange in exchanges.items():
                if wire not in exchange.wires or (exchange.ragged and on_cpu) or (exchange.dropless_only and factor):
                    continue
                mesh = _mesh(exchange.mesh_shape(ranks))
                fn = _mapped(mesh, lambda x, i, w, rt=exchange.round_trip, factor=factor, fp8=wire == "fp8": rt(
                    x, i, w, num_experts=shape.experts, capacity_factor=factor, use_fp8=fp8))
                args = _placed(mesh, x, idx, w)
                dropped[name] = int(np.asarray(fn(*args)[-1]).sum())
                programs[name] = (fn, args)
            console.print(f"  timing {wire}, capacity {_factor(factor)}: {len(programs)} programs x {rounds} rounds")
            ms = {name: 1e3 * s for name, s in paired_medians(programs, rounds).items()}
            for name, value in ms.items():
                out.append({**shape._asdict(), "wire": wire, "capacity_factor": factor,
                            "capacity": simulated["capacity"], "expanded_rows": simulated["expanded_rows"],
                            "program": name, "ms": value,
                            "ratio_to_all_to_all": value / ms["all_to_all round trip"],
                            "dropped": dropped.get(name), "dropped_simulated": simulated["dropped"]})
    return out


def simulated_sent(idx: np.ndarray, shape: RoutingShape, capacity: int) -> np.ndarray:
    """[R (source), R (destination)] int32 rows ``dispatch`` fills in each [C]-row block."""
    local = shape.experts // shape.ranks
    in_rank = (np.where(idx >= 0, idx // local, shape.ranks)[:, :, None] == np.arange(shape.ranks)).any(1)
    return np.minimum(in_rank.reshape(shape.ranks, shape.tokens, shape.ranks).sum(1), capacity).astype(np.int32)


def ragged_peer(mesh: Mesh, sent: np.ndarray, capacity: int, hidden: int, wire: str) -> tuple[Callable, tuple]:
    """``peer_round_trip``'s payload through ``jax.lax.ragged_all_to_all``: only the filled rows of each [C]-row
    block (``sent`` [R, R] rows from rank s to rank r) move, into the same [R, C] block layout."""
    axis, ranks = mesh.axis_names[0], sent.shape[0]

    def per_rank(counts, *payload):  # counts [1, R]; payload: [R*C, ...] arrays as peer_round_trip's
        send = counts[0]
        recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [R] rows from each source
        starts = jnp.arange(ranks, dtype=jnp.int32) * capacity
        mine = jnp.full((ranks,), jax.lax.axis_index(axis) * capacity, jnp.int32)  # my block at every receiver

        def move(rows, sizes, received):
            return jax.lax.ragged_all_to_all(rows, jnp.zeros_like(rows), starts, sizes, mine, received, axis_name=axis)

        if wire == "bf16":
            return move(move(payload[0], send, recv), recv, send)
        data, scale, back = payload  # FP8: e4m3 rows and scales there, an independent bf16 buffer back
        return move(data, send, recv), move(scale, send, recv), move(back, recv, send)

    rows = jnp.ones((ranks * ranks * capacity, hidden), jnp.bfloat16)
    q = per_token_cast_to_fp8(rows.astype(jnp.float32))
    payload = (rows,) if wire == "bf16" else (q.data, q.scale, rows)
    return _mapped(mesh, per_rank), _placed(mesh, sent, *payload)


# --- 3. the train step --------------------------------------------------------------------------------

def train_rows(steps: int, batch: int, seq_len: int, repeats: int = 2) -> dict:
    """The tiny preset trained with ep=8 (rules "ep") and dp=8 (rules "dp"), same seed and data; the runs
    alternate (ep, dp, ep, dp, ...) so that load from other processes falls on both alike."""
    from jaxseek.data import load_stdlib_corpus
    from jaxseek.presets import get_preset
    from jaxseek.train import train
    from sharding.mesh import make_mesh

    mc, tc = get_preset("tiny")
    tc = tc.replace(steps=steps, batch_size=batch, seq_len=seq_len, warmup_steps=min(tc.warmup_steps, steps // 4),
                    eval_every=steps, checkpoint_every=steps, eval_batches=1)
    corpus = load_stdlib_corpus(max_bytes=4_000_000)
    meshes = {"ep=8": (make_mesh(dp=1, ep=8), "ep"), "dp=8": (make_mesh(dp=8, ep=1), "dp")}
    runs = {name: {"rules": rules, "tokens_per_s": [], "compile_s": [], "losses": [], "dropped": 0}
            for name, (_, rules) in meshes.items()}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            for name, (mesh, rules) in meshes.items():
                result = train(mc, tc, pathlib.Path(scratch) / f"{name}-{repeat}", corpus=corpus, mesh=mesh,
                               rules=rules, console=Console(quiet=True), show_progress=False)
                run = runs[name]
                run["tokens_per_s"].append(result.tokens_per_s)
                run["compile_s"].append(result.compile_s)
                run["losses"].append(result.log.losses())
                run["dropped"] += sum(r["dropped_tokens"] for r in result.log.rows)
    for run in runs.values():
        run["median_tokens_per_s"] = statistics.median(run["tokens_per_s"])
        run["median_compile_s"] = statistics.median(run["compile_s"])
        run["repeats_identical"] = all(losses == run["losses"][0] for losses in run["losses"])
    ep, dp = np.asarray(runs["ep=8"]["losses"][0]), np.asarray(runs["dp=8"]["losses"][0])
    return {"preset": "tiny", "steps": steps, "batch": f"{batch}x{seq_len}", "repeats": repeats, "runs": runs,
            "tokens_per_s_ratio_ep_to_dp": runs["ep=8"]["median_tokens_per_s"] / runs["dp=8"]["median_tokens_per_s"],
            "max_relative_loss_difference": float(np.max(np.abs(ep - dp) / np.abs(dp)))}


# --- tables and main ----------------------------------------------------------------------------------

def _factor(f) -> str:
    return "dropless" if f is None else f"{f:g}"


def print_tables(report: dict, console: Console) -> None:
    table = Table(title="bytes per token (dispatch, one direction)")
    for column in ("ranks", "wire", "capacity", "C", "N", "dropped", "min", "useful", "buffer", "buffer / min",
                   "DeepEP per pair", "low-latency buffer"):
        table.add_column(column, justify="left" if column in ("wire", "capacity") else "right")
    for r in report["bytes"]:
        table.add_row(str(r["ranks"]), r["wire"], _factor(r["capacity_factor"]), str(r["capacity"]),
                      str(r["expanded_rows"]), f"{r['dropped_fraction']:.2%}", f"{r['min_bytes_per_token']:,.0f}",
                      f"{r['useful_bytes_per_token']:,.0f}", f"{r['buffer_bytes_per_token']:,.0f}",
                      f"{r['buffer_bytes_per_token'] / r['min_bytes_per_token']:.2f}x",
                      f"{r['deepep_pair_bytes_per_token']:,.0f}", f"{r['low_latency_buffer_bytes_per_token']:,.0f}")
    console.print(table)
    table = Table(title="bytes per token across nodes (payload, dispatch)")
    for column in ("ranks", "nodes", "wire", "flat", "hierarchical", "hierarchical / flat"):
        table.add_column(column, justify="left" if column == "wire" else "right")
    for r in report["inter_node"]:
        table.add_row(str(r["ranks"]), str(r["nodes"]), r["wire"], f"{r['flat_bytes_per_token']:,.0f}",
                      f"{r['hierarchical_bytes_per_token']:,.0f}",
                      f"{r['hierarchical_bytes_per_token'] / r['flat_bytes_per_token']:.2f}x")
    console.print(table)
    table = Table(title="dispatch + combine vs all_to_all round trip (medians, same rounds)")
    for column in ("wire", "capacity", "C", "N", "program", "ms", "ratio", "dropped"):
        table.add_column(column, justify="left" if column in ("wire", "capacity", "program") else "right")
    for r in report["overhead"]:
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        ratio = r.get("note") or f"{r['ratio_to_all_to_all']:.2f}x"
        table.add_row(r["wire"], _factor(r.get("capacity_factor")), str(r.get("capacity", "")),
                      str(r.get("expanded_rows", "")), r["program"], ms, ratio,
                      "" if r.get("dropped") is None else str(r["dropped"]))
    console.print(table)
    if report.get("train"):
        t = report["train"]
        table = Table(title=f"train step, tiny preset, {t['batch']}, {t['steps']} steps, {t['repeats']} runs each")
        for column in ("mesh", "rules", "tokens/s (median)", "each run", "compile s (median)", "dropped"):
            table.add_column(column)
        for name, run in t["runs"].items():
            table.add_row(name, run["rules"], f"{run['median_tokens_per_s']:,.0f}",
                          " ".join(f"{v:,.0f}" for v in run["tokens_per_s"]), f"{run['median_compile_s']:.1f}",
                          str(run["dropped"]))
        console.print(table)
        console.print(f"tokens/s ep=8 / dp=8: {t['tokens_per_s_ratio_ep_to_dp']:.2f}x; "
                      f"max relative loss difference: {t['max_relative_loss_difference']:.2e}")


def run(quick: bool, console: Console) -> dict:
    measured = QUICK if quick else MEASURED
    report = {"command": " ".join(["python", "benchmarks/ep.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "platform": jax.default_backend(), "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "cpu_cores": os.cpu_count(), "jax": jax.__version__, "measured_shape": measured._asdict()}
    console.print("[bold]bytes per token[/]")
    shapes = (measured,) if quick else BYTE_SHAPES + (measured,)
    report["bytes"] = [row for shape in shapes for row in byte_rows(shape)]
    report["inter_node"] = [row for shape in shapes for row in inter_node_rows(shape)]
    console.print(f"[bold]overhead[/] on {min(measured.ranks, jax.device_count())} {jax.default_backend()} devices")
    report["overhead"] = overhead_rows(measured, rounds=2 if quick else 5, profile=not quick, console=console)
    if jax.device_count() >= 8 and not quick:  # two train-step compiles take ~40 s each on 2 cores
        console.print("[bold]train step[/] ep=8 vs dp=8")
        report["train"] = train_rows(steps=12, batch=16, seq_len=128)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, 2 rounds, no profile rows, no train step (a smoke, < 1 min)")
    parser.add_argument("--json", type=pathlib.Path,
                        help="where to write the results (default: results/ep_<platform>.json)")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 150)
    start = time.perf_counter()
    report = run(args.quick, console)
    report["wall_s"] = time.perf_counter() - start
    print_tables(report, console)
    path = args.json or (None if args.quick else HERE / "results" / f"ep_{report['platform']}.json")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {path} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
