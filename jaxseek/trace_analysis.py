"""Reading a profiler trace: per-scope time and computation/communication overlap (``jaxseek profile analyze``).

Input: a Chrome / Perfetto trace-event JSON (``.json`` or ``.json.gz``): the ``perfetto_trace.json.gz``
``jax.profiler`` writes, or a PyTorch-profiler trace such as profile-data's ``train.json``.

* **Ops** are the device work in the trace: events carrying an ``hlo_op`` argument (XLA ops; when a device
  has ``Stream #`` threads, only those, not the ``XLA Ops`` summary line) and events of category
  ``kernel`` / ``gpu_memcpy`` / ``gpu_memset`` (PyTorch).
* An op is **communication** when its name (or ``hlo_op``) matches ``COMM_PATTERN`` (collectives, send /
  recv, NCCL and DeepEP kernels), otherwise **computation**.
* Its **scope** is the path of ``jax.named_scope`` names it was traced under: the ``scope``, ``tf_op`` or
  ``name_scope`` argument, else the sidecar map ``{hlo_module: {hlo_op: op_name}}`` that ``jaxseek profile``
  writes beside a trace (CPU traces name no scope). The op counts toward the innermost scope of
  ``TRACKED_SCOPES`` on its path (exclusive time), in the backward pass when a ``transpose(...)`` wraps a
  component of the path.
* **Overlap**: per device (the ``device_ordinal`` argument, else the process), communication time hidden =
  |union of its communication intervals ∩ union of its computation intervals|; the overlap fraction is
  hidden / communication time, per stream (thread) and over all devices.

``analyze(path)`` returns a JSON-ready dict; ``print_report``, ``plot_step`` render it.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import re
from collections import defaultdict
from typing import Iterable, NamedTuple

COMM_PATTERN = re.compile(r"all-to-all|all-reduce|all-gather|reduce-scatter|collective-permute|collective-broadcast|"
                          r"send|recv|nccl|::ep::|ppermute|psum", re.IGNORECASE)
KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# named scope -> label in the breakdown (profile-data's names: attn, mlp, dispatch, combine, F/B/W of a chunk)
TRACKED_SCOPES = {
    "attention": "attention", "moe": "moe", "mlp": "mlp", "gate": "gate", "shared_experts": "shared_experts",
    "experts": "experts", "dispatch": "dispatch", "combine": "combine", "mtp": "mtp", "head": "head",
    "pipeline_forward": "F", "pipeline_backward": "B", "pipeline_weight_grad": "W", "pipeline_ppermute": "PP",
}
_WRAPPER = re.compile(r"^([\w.\-]+)\((.*)\)$")


class Op(NamedTuple):
    name: str
    device: str  # device_ordinal, else the process name
    stream: str  # the thread's name (or id)
    start: float  # microseconds
    end: float
    comm: bool
    scope: str  # a TRACKED_SCOPES label, or "(other)"
    backward: bool


def load_trace(path: str | pathlib.Path) -> dict:
    """The trace's JSON object (``{"traceEvents": [...]}``; a bare event list is wrapped)."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return {"traceEvents": data} if isinstance(data, list) else data


def sidecar_path(trace: str | pathlib.Path) -> pathlib.Path:
    """Where ``jaxseek profile`` keeps a trace's scope map: NAME.trace.json.gz -> NAME.scopes.json."""
    name = pathlib.Path(trace).name
    stem = name.split(".trace.json")[0] if ".trace.json" in name else name.split(".json")[0]
    return pathlib.Path(trace).with_name(stem + ".scopes.json")


def hlo_scope_map(module_name: str, hlo_text: str) -> dict[str, dict[str, str]]:
    """``{module: {instruction: op_name}}`` from a compiled executable's HLO text (``compiled.as_text()``)."""
    ops = {}
    for match in re.finditer(r"%?([\w.\-]+) = [^\n]*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text):
        ops[match.group(1)] = match.group(2)
    found = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    return {found.group(1) if found else module_name: ops}


def parse_scope(path: str) -> tuple[str, bool]:
    """``"jit(step)/transpose(jvp(moe))/dispatch/gather"`` -> ("dispatch", True): the innermost tracked
    scope on the path ("(other)" if none) and whether a ``transpose`` (the backward pass) wraps a part."""
    label, backward = "(other)", False
    for part in path.split("/"):
        while True:
            wrapped = _WRAPPER.match(part)
            if wrapped is None:
                break
            backward = backward or wrapped.group(1) == "transpose"
            part = wrapped.group(2)
        label = TRACKED_SCOPES.get(part, label)
    return label, backward


def extract_ops(trace: dict, scopes: dict[str, dict[str, str]] | None = None) -> list[Op]:
    """The trace's device ops (see the module docstring), sorted by start time."""
    events = trace.get("traceEvents", [])
    process_names, thread_names = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process_names[e.get("pid")] = str(e.get("args", {}).get("name", e.get("pid")))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread_names[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", e.get("tid")))
    candidates = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None
                  and ("hlo_op" in e.get("args", {}) or e.get("cat") in KERNEL_CATEGORIES)]
    with_streams = {e.get("pid") for e in candidates
                    if thread_names.get((e.get("pid"), e.get("tid")), "").startswith("Stream")}
    scopes = scopes or {}
    ops = []
    for e in candidates:
        pid, args = e.get("pid"), e.get("args", {})
        stream = thread_names.get((pid, e.get("tid")), str(e.get("tid")))
        if pid in with_streams and not stream.startswith("Stream"):
            continue  # the XLA Ops / Modules summary lines repeat the streams' ops
        hlo_op = str(args.get("hlo_op", e["name"]))
        path = (args.get("scope") or args.get("tf_op") or args.get("name_scope")
                or scopes.get(str(args.get("hlo_module", "")), {}).get(hlo_op, ""))
        scope, backward = parse_scope(str(path))
        device = str(args["device_ordinal"]) if "device_ordinal" in args else process_names.get(pid, str(pid))
        start = float(e["ts"])
        ops.append(Op(str(e["name"]), device, stream, start, start + float(e["dur"]),
                      bool(COMM_PATTERN.search(e["name"]) or COMM_PATTERN.search(hlo_op)), scope, backward))
    return sorted(ops, key=lambda op: op.start)


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged [start, end) intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        elif end > start:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def step_windows(trace: dict) -> list[tuple[float, float]]:
    """[start, end) of each step annotation: ``jax.profiler.StepTraceAnnotation`` (a ``step_num`` argument)
    or PyTorch's ``ProfilerStep#N``, in time order."""
    return sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in trace.get("traceEvents", [])
                  if e.get("ph") == "X" and e.get("dur") is not None
                  and ("step_num" in e.get("args", {}) or str(e.get("name", "")).startswith("ProfilerStep#")))


def overlap(ops: list[Op]) -> dict:
    """Hidden communication per stream and overall (see the module docstring)."""
    compute_by_device = defaultdict(list)
    comm_by_device = defaultdict(list)
    comm_by_stream = defaultdict(list)
    for op in ops:
        if op.comm:
            comm_by_device[op.device].append((op.start, op.end))
            comm_by_stream[(op.device, op.stream)].append((op.start, op.end))
        else:
            compute_by_device[op.device].append((op.start, op.end))
    compute = {d: union(v) for d, v in compute_by_device.items()}

    def row(comm_intervals, compute_intervals):
        comm_union = union(comm_intervals)
        comm_us = length(comm_union)
        hidden = intersection(comm_union, compute_intervals)
        return {"comm_us": comm_us, "hidden_us": hidden, "exposed_us": comm_us - hidden,
                "overlap": hidden / comm_us if comm_us else None}

    streams = [{"device": d, "stream": s, **row(v, compute.get(d, []))} for (d, s), v in sorted(comm_by_stream.items())]
    devices = {d: row(comm_by_device.get(d, []), compute.get(d, [])) for d in sorted(set(compute) | set(comm_by_device))}
    comm_us = sum(r["comm_us"] for r in devices.values())
    hidden = sum(r["hidden_us"] for r in devices.values())
    overall = {"comm_us": comm_us, "hidden_us": hidden, "exposed_us": comm_us - hidden,
               "compute_us": sum(length(v) for v in compute.values()),
               "overlap": hidden / comm_us if comm_us else None}
    return {"streams": streams, "devices": devices, "overall": overall}


def breakdown(ops: list[Op]) -> list[dict]:
    """Per (scope, pass): ops, summed op time (exclusive: an op counts once, for its innermost scope), the
    communication part, and the share of all op time; largest first."""
    rows = defaultdict(lambda: {"ops": 0, "time_us": 0.0, "comm_us": 0.0})
    for op in ops:
        r = rows[(op.scope, "backward" if op.backward else "forward")]
        r["ops"] += 1
        r["time_us"] += op.end - op.start
        r["comm_us"] += (op.end - op.start) if op.comm else 0.0
    total = sum(r["time_us"] for r in rows.values()) or 1.0
    return sorted(({"scope": s, "pass": p, **r, "share": r["time_us"] / total} for (s, p), r in rows.items()),
                  key=lambda r: -r["time_us"])


def analyze(path: str | pathlib.Path, scopes: dict | None = None) -> dict:
    """The JSON-ready analysis of a trace file; ``scopes`` defaults to its sidecar map when there is one."""
    trace = load_trace(path)
    if scopes is None and sidecar_path(path).exists():
        scopes = json.loads(sidecar_path(path).read_text())
    ops = extract_ops(trace, scopes)
    windows = step_windows(trace)
    return {"trace": str(path), "ops": len(ops), "op_time_us": sum(op.end - op.start for op in ops),
            "steps": len(windows), "step_us": [e - s for s, e in windows], "scopes": breakdown(ops),
            **overlap(ops)}


def _fraction(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_report(result: dict, console) -> None:
    """The analysis as rich tables: the scope breakdown, then the overlap per stream and overall."""
    from rich.table import Table

    table = Table(title=f"{result['trace']}: {result['ops']} ops, {result['op_time_us'] / 1e3:.2f} ms of op time, "
                        f"{result['steps']} steps")
    for column in ("scope", "pass", "ops", "time (ms)", "comm (ms)", "share"):
        table.add_column(column, justify="left" if column in ("scope", "pass") else "right")
    for r in result["scopes"]:
        table.add_row(r["scope"], r["pass"], str(r["ops"]), f"{r['time_us'] / 1e3:.3f}", f"{r['comm_us'] / 1e3:.3f}",
                      _fraction(r["share"]))
    console.print(table)
    streams = Table(title="communication hidden under computation")
    for column in ("device", "stream", "comm (ms)", "hidden (ms)", "exposed (ms)", "overlap"):
        streams.add_column(column, justify="left" if column in ("device", "stream") else "right")
    for r in result["streams"]:
        streams.add_row(r["device"], r["stream"], f"{r['comm_us'] / 1e3:.3f}", f"{r['hidden_us'] / 1e3:.3f}",
                        f"{r['exposed_us'] / 1e3:.3f}", _fraction(r["overlap"]))
    o = result["overall"]
    streams.add_row("all", "overall", f"{o['comm_us'] / 1e3:.3f}", f"{o['hidden_us'] / 1e3:.3f}",
                    f"{o['exposed_us'] / 1e3:.3f}", _fraction(o["overlap"]), style="bold")
    console.print(streams)


def plot_step(path: str | pathlib.Path, out_png: str | pathlib.Path, scopes: dict | None = None,
              step: int = 0) -> tuple[float, float]:
    """Draws the ops of one step (the ``step``-th step annotation, else the whole trace) as a timeline, one
    row per (device, stream), computation coloured by scope and communication hatched red; returns the
    [start, end) window drawn, in microseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trace = load_trace(path)
    if scopes is None and sidecar_path(path).exists():
        scopes = json.loads(sidecar_path(path).read_text())
    ops = extract_ops(trace, scopes)
    windows = step_windows(trace)
    if windows:
        window = windows[min(step, len(windows) - 1)]
    else:
        window = (min((op.start for op in ops), default=0.0), max((op.end for op in ops), default=1.0))
    shown = [op for op in ops if op.end > window[0] and op.start < window[1]]
    rows = sorted({(op.device, op.stream) for op in shown})
    labels = sorted({op.scope for op in shown})
    cmap = plt.get_cmap("tab20")
    colours = {label: cmap(i % 20) for i, label in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.45 * max(len(rows), 1)))
    for y, key in enumerate(rows):
        for op in (o for o in shown if (o.device, o.stream) == key):
            ax.broken_barh([((op.start - window[0]) / 1e3, (op.end - op.start) / 1e3)], (y - 0.4, 0.8),
                           facecolors="tab:red" if op.comm else colours[op.scope],
                           hatch="//" if op.comm else None, edgecolor="none", alpha=0.6 if op.backward else 1.0)
    ax.set_yticks(range(len(rows)), [f"{d} / {s}"[:48] for d, s in rows], fontsize=7)
    ax.set_xlabel("ms from the step's start")
    ax.set_title(f"{pathlib.Path(path).name}: one step ({(window[1] - window[0]) / 1e3:.2f} ms); "
                 "faded = backward pass")
    handles = [Patch(color=colours[label], label=label) for label in labels]
    handles.append(Patch(facecolor="tab:red", hatch="//", label="communication"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return window
