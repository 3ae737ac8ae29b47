"""Compile time and compile memory of a 61-layer DeepSeek-V3-shaped model: layers scanned vs unrolled.

The model keeps blocks of one kind in a ``BlockStack`` (a leading layer axis) run by ``jax.lax.scan``, so
XLA compiles one dense and one MoE block body. "unrolled" runs the same parameters through a Python loop
over ``stack.layer(i)`` (every dense block, then every MoE block), so XLA sees 61 copies of a block; the
post-stage and loss are the model's own (``jaxseek.model.loss.head_loss``), the MTP module included.

The model is DeepSeek-V3's structure (61 layers, first 3 dense, MTP 1, q_lora, MLA with a RoPE part and
YaRN, group-limited sigmoid routing, one shared expert) at a reduced width (``benchmark_config``), float32,
on abstract [2, 64 + 1 + 1] int32 token windows: nothing the size of the model is materialised.

Two programs per variant: "forward" is ``language_model_loss`` (the training step's forward, loss only);
"grad" is ``jax.value_and_grad`` of it with respect to the ``nnx.Param`` state. Each (variant, program)
runs in a child process (this script with ``--child``) that times ``jit(f).trace``, ``.lower()`` and
``.compile()`` separately and reports its peak RSS (VmHWM, reset just before tracing: ``getrusage``'s
ru_maxrss is inherited across fork + exec on Linux) minus its RSS just before tracing,
XLA's ``memory_analysis()`` and the program size: StableHLO text (``lowered.as_text()``) and the
instruction count of the optimised HLO (``compiled.as_text()``). The persistent compilation cache is off.

Before measuring, both variants run on a tiny concrete config; their losses, expert loads and gradients
must agree (a check that "unrolled" computes the same function).

    python benchmarks/compile_time.py [--layers 61] [--quick]
    # writes benchmarks/results/compile_time_<platform>.json (not with --quick unless --out is given)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxseek.config import ModelConfig  # noqa: E402
from jaxseek.model.grouped_matmul import grouped_matmul_for  # noqa: E402
from jaxseek.model.loss import head_loss, language_model_loss  # noqa: E402
from jaxseek.model.moe import MoEStats  # noqa: E402
from jaxseek.model.transformer import Transformer, expert_statistics  # noqa: E402
from jaxseek.presets import get_preset  # noqa: E402

BATCH, SEQ = 2, 64
VARIANTS = ("scanned", "unrolled")
PROGRAMS = ("forward", "grad")
RESULT_MARKER = "COMPILE_TIME_RESULT "


def benchmark_config(num_layers: int = 61) -> ModelConfig:
    """DeepSeek-V3's structure at a width that builds in seconds on a CPU (float32, no FP8)."""
    v3, _ = get_preset("deepseek-v3")
    if num_layers <= v3.first_k_dense:
        raise ValueError(f"layers: need more than first_k_dense={v3.first_k_dense} to have MoE layers, got {num_layers}")
    return v3.replace(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=num_layers, compute_dtype="float32",
        mla=dataclasses.replace(v3.mla, num_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                                qk_rope_head_dim=16, v_head_dim=32),
        moe=dataclasses.replace(v3.moe, num_routed_experts=16, n_group=4, topk_group=2, num_experts_per_token=4,
                                intermediate_size=64),
    )


def sanity_config() -> ModelConfig:
    """A tiny concrete config with both stacks (2 dense, 3 MoE blocks) and MTP, for the equivalence check."""
    tiny, _ = get_preset("tiny")
    return tiny.replace(num_layers=5, first_k_dense=2)


def unrolled_language_model_loss(model: Transformer, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``language_model_loss`` with the block stacks run as a Python loop over ``stack.layer(i)``.

    Args:
      tokens: [batch, seq + 1 + D] int32 windows (D = mtp_depth).
    Returns:
      the same (loss, aux) as ``language_model_loss``.
    """
    config = model.config
    seq = tokens.shape[1] - 1 - config.mtp_depth
    positions = model.positions(tokens.shape[0], seq)  # [batch, seq]
    h = model.embed(tokens[:, :seq])  # [batch, seq, hidden]
    per_layer: list[MoEStats] = []
    for stack in (model.dense_blocks, model.moe_blocks):
        if stack is None:
            continue
        for index in range(stack.num_layers):
            h, stats = stack.layer(index)(h, positions)
            if stats is not None:
                per_layer.append(stats)
    # The scan stacks the MoE blocks' statistics on a leading [moe_layers] axis; so does this.
    block_stats = jax.tree.map(lambda *s: jnp.stack(s), *per_layer) if per_layer else None
    loss, aux = head_loss(model, h, tokens, positions)
    load, balance = expert_statistics([block_stats, aux.pop("mtp_stats")], config.moe.num_routed_experts)
    loss = loss + config.moe.seq_aux_loss_weight * balance
    return loss, {**aux, "balance_loss": balance, "expert_load": load}


LOSSES = {"scanned": language_model_loss, "unrolled": unrolled_language_model_loss}


def program(variant: str, kind: str, graphdef: nnx.GraphDef):
    """``f(params, rest, tokens)``: the loss ("forward") or ((loss, aux), param grads) ("grad")."""
    loss_fn = LOSSES[variant]

    def loss_of(params, rest, tokens):
        return loss_fn(nnx.merge(graphdef, params, rest), tokens)

    if kind == "forward":
        return loss_of
    return jax.value_and_grad(loss_of, has_aux=True)


def check_equivalence(seed: int = 0) -> dict:
    """Both variants on a tiny concrete model: losses, loads and gradients must agree."""
    config = sanity_config()
    graphdef, params, rest = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(seed + 1), (BATCH, 33 + config.mtp_depth), 0, config.vocab_size)
    out = {v: jax.jit(program(v, "grad", graphdef))(params, rest, tokens) for v in VARIANTS}
    (loss_s, aux_s), grads_s = out["scanned"]
    (loss_u, aux_u), grads_u = out["unrolled"]
    loss_diff = abs(float(loss_s) - float(loss_u))
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_u)))
    grad_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(grads_s))
    loads_equal = bool(np.array_equal(np.asarray(aux_s["expert_load"]), np.asarray(aux_u["expert_load"])))
    assert loss_diff <= 1e-5 * max(1.0, abs(float(loss_s))), f"losses differ: {float(loss_s)} vs {float(loss_u)}"
    assert loads_equal, "expert loads differ between the scanned and unrolled variants"
    assert grad_diff <= 1e-5 * max(1.0, grad_scale), f"gradients differ by {grad_diff} (scale {grad_scale})"
    return {"config": f"{config.num_layers} layers ({config.first_k_dense} dense), hidden {config.hidden_size}, "
                      f"mtp {config.mtp_depth}", "loss_scanned": float(loss_s), "loss_unrolled": float(loss_u),
            "loss_abs_diff": loss_diff, "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale,
            "expert_loads_equal": loads_equal}


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} missing from /proc/self/status")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hlo_instructions(hlo_text: str) -> int:
    """Instructions in an HLO module's text (lines defining a value: ``%name = ...`` or ``ROOT ...``)."""
    return sum(1 for line in hlo_text.splitlines() if re.match(r"\s*(ROOT\s+)?%?[\w.\-]+\s*=\s", line))


def measure_child(variant: str, kind: str, num_layers: int) -> dict:
    """Traces, lowers and compiles one program on abstract inputs; meant to run alone in a fresh process."""
    jax.config.update("jax_enable_compilation_cache", False)
    config = benchmark_config(num_layers)
    abstract_model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    to_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    params, rest = jax.tree.map(to_struct, params), jax.tree.map(to_struct, rest)
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ + 1 + config.mtp_depth), jnp.int32)
    jitted = jax.jit(program(variant, kind, graphdef))

    # Peak RSS: VmHWM, reset to the current RSS here. getrusage's ru_maxrss cannot be used alone: Linux
    # carries it over fork + exec, so a child starts with its parent's peak (measured: +874 MiB everywhere).
    hwm_reset = reset_peak_rss()
    rss_before = proc_status_kib("VmRSS")
    start = time.perf_counter()
    traced = jitted.trace(params, rest, tokens)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    peak_lowered = proc_status_kib("VmHWM")
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    peak_compiled = proc_status_kib("VmHWM")

    stablehlo = lowered.as_text()
    optimized = compiled.as_text()
    result = {
        "variant": variant, "program": kind, "layers": num_layers,
        "param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "trace_s": trace_s, "lower_s": lower_s, "trace_lower_s": trace_s + lower_s, "compile_s": compile_s,
        "rss_before_lowering_mib": rss_before / 1024, "peak_rss_mib": peak_compiled / 1024,
        "peak_rss_source": "VmHWM reset before tracing" if hwm_reset else "VmHWM since exec",
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_delta_lower_mib": max(0, peak_lowered - rss_before) / 1024,
        "peak_rss_delta_mib": max(0, peak_compiled - rss_before) / 1024,
        "stablehlo_chars": len(stablehlo), "stablehlo_lines": stablehlo.count("\n"),
        "optimized_hlo_chars": len(optimized), "optimized_hlo_instructions": hlo_instructions(optimized),
        "while_loops": optimized.count(" while("),
    }
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                      "generated_code_size_in_bytes"):
            value = getattr(analysis, field, None)
            if value is not None:
                result["xla_" + field.replace("_size_in_bytes", "_mib")] = value / 2**20
    return result


def run_child(variant: str, kind: str, num_layers: int, timeout_s: float) -> dict:
    """Runs ``measure_child`` in a fresh interpreter (so its peak RSS is this program's alone)."""
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", variant, kind,
               "--layers", str(num_layers)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "program": kind, "layers": num_layers, "error": f"timed out after {timeout_s:.0f} s"}
    wall_s = time.perf_counter() - start
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return {**json.loads(line[len(RESULT_MARKER):]), "child_wall_s": wall_s}
    return {"variant": variant, "program": kind, "layers": num_layers,
            "error": f"child exited {done.returncode}: {done.stderr.strip()[-2000:]}"}


COLUMNS = (  # (header, key, format)
    ("variant", "variant", "{}"), ("program", "program", "{}"), ("trace s", "trace_s", "{:.2f}"),
    ("lower s", "lower_s", "{:.2f}"), ("compile s", "compile_s", "{:.2f}"),
    ("peak RSS delta MiB", "peak_rss_delta_mib", "{:.0f}"), ("XLA temp MiB", "xla_temp_mib", "{:.1f}"),
    ("XLA args MiB", "xla_argument_mib", "{:.1f}"), ("StableHLO chars", "stablehlo_chars", "{:,}"),
    ("HLO instrs", "optimized_hlo_instructions", "{:,}"), ("whiles", "while_loops", "{}"),
)


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one row per (variant, program); an unrolled/scanned ratio row per program."""
    cells = [[h for h, _, _ in COLUMNS]]
    for row in rows:
        if "error" in row:
            cells.append([row["variant"], row["program"], row["error"][:60]] + [""] * (len(COLUMNS) - 3))
            continue
        cells.append([fmt.format(row[key]) if key in row else "-" for _, key, fmt in COLUMNS])
    for kind in PROGRAMS:
        pair = {r["variant"]: r for r in rows if r["program"] == kind and "error" not in r}
        if len(pair) == 2:
            ratio = ["unrolled/scanned", kind]
            for _, key, _ in COLUMNS[2:]:
                a, b = pair["unrolled"].get(key), pair["scanned"].get(key)
                ratio.append(f"{a / b:.1f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-")
            cells.append(ratio)
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(cell, widths)) for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=61, help="total layers (first 3 dense, the rest MoE)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 5 layers unless --layers is given")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default: results/compile_time_<platform>.json)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child process")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PROGRAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = 5 if args.quick and "--layers" not in sys.argv else args.layers

    if args.child:
        variant, kind = args.child
        print(RESULT_MARKER + json.dumps(measure_child(variant, kind, layers)), flush=True)
        return

    config = benchmark_config(layers)
    print(f"config: {config}\nMoE grouped matmul 'auto' -> {grouped_matmul_for(jax.default_backend())!r}; "
          f"batch {BATCH} x seq {SEQ} (+1 target, +{config.mtp_depth} MTP look-ahead), "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}\n", flush=True)
    start = time.perf_counter()
    sanity = check_equivalence()
    print(f"equivalence ({sanity['config']}): loss {sanity['loss_scanned']:.6f} vs {sanity['loss_unrolled']:.6f}, "
          f"grad max |diff| {sanity['grad_max_abs_diff']:.2e}, expert loads equal: {sanity['expert_loads_equal']}"
          f" ({time.perf_counter() - start:.1f} s)\n", flush=True)

    rows = []
    for kind in PROGRAMS:
        for variant in VARIANTS:
            row = run_child(variant, kind, layers, args.timeout)
            rows.append(row)
            done = (f"{row['trace_s']:.1f} + {row['lower_s']:.1f} + {row['compile_s']:.1f} s, "
                    f"peak RSS +{row['peak_rss_delta_mib']:.0f} MiB" if "error" not in row else row["error"])
            print(f"  {variant:>8} {kind:<7}: {done}", flush=True)
    print("\n" + format_table(rows))

    out = args.out if args.out is not None else (
        None if args.quick else HERE / "results" / f"compile_time_{jax.devices()[0].platform}.json")
    if out is not None:
        record = {
            "command": "python benchmarks/compile_time.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
            "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
            "batch": BATCH, "seq": SEQ, "config": dataclasses.asdict(config),
            "grouped_matmul_used": grouped_matmul_for(jax.default_backend()), "equivalence": sanity,
            "total_wall_s": time.perf_counter() - start, "rows": rows,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
