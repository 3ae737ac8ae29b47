"""``jaxseek profile``: the analyzer on synthetic traces of known overlap and scope times, and a real trace."""

import argparse
import gzip
import json

import jax
import pytest

from jaxseek import trace_analysis
from sharding.mesh import make_mesh


def _trace(events, *, threads=(("compute", 1), ("comm", 2))):
    meta = [{"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    meta += [{"ph": "M", "pid": 7, "tid": tid, "name": "thread_name", "args": {"name": f"Stream #{tid}({name})"}}
             for name, tid in threads]
    return {"traceEvents": meta + events}


def _op(name, tid, ts, dur, scope="", module="jit_step"):
    return {"ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": name, "hlo_module": module, **({"tf_op": scope} if scope else {})}}


@pytest.mark.parametrize("comm_start, comm_end, expected", [(100, 200, 0.0), (50, 150, 0.5), (25, 75, 1.0)])
def test_overlap_known_fractions(tmp_path, comm_start, comm_end, expected):
    """Compute on [0, 100), an all-to-all on another stream: after, half under, inside -> 0%, 50%, 100%."""
    events = [_op("fusion.1", 1, 0, 60, "jit(step)/jvp(attention)/dot_general"),
              _op("fusion.2", 1, 60, 40, "jit(step)/jvp(moe)/experts/dot_general"),
              _op("all-to-all.3", 2, comm_start, comm_end - comm_start, "jit(step)/jvp(moe)/dispatch/all_to_all"),
              {"ph": "X", "pid": 7, "tid": 9, "ts": 0, "dur": 500, "name": "python span"}]  # host: not an op
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(events), f)
    result = trace_analysis.analyze(path)
    assert result["ops"] == 3
    assert result["overall"]["overlap"] == pytest.approx(expected)
    assert result["overall"]["comm_us"] == pytest.approx(comm_end - comm_start)
    (stream,) = result["streams"]
    assert stream["stream"] == "Stream #2(comm)" and stream["overlap"] == pytest.approx(expected)


def test_scope_times_and_passes(tmp_path):
    """Exclusive time per innermost tracked scope, backward under transpose(...), via tf_op or the sidecar."""
    events = [_op("fusion.1", 1, 0, 30, "jit(step)/jvp(attention)/dot_general"),
              _op("fusion.2", 1, 30, 20, "jit(step)/transpose(jvp(attention))/dot_general"),
              _op("gather.3", 1, 50, 5),  # named by the sidecar map
              _op("all-to-all.4", 2, 55, 10, "jit(step)/jvp(moe)/combine/x"),
              _op("copy.5", 1, 70, 7)]  # no scope
    path = tmp_path / "train.p0.trace.json"
    path.write_text(json.dumps(_trace(events)))
    trace_analysis.sidecar_path(path).write_text(json.dumps({"jit_step": {"gather.3": "jit(step)/jvp(moe)/dispatch/gather"}}))
    rows = {(r["scope"], r["pass"]): r for r in trace_analysis.analyze(path)["scopes"]}
    assert {k: r["time_us"] for k, r in rows.items()} == {
        ("attention", "forward"): 30, ("attention", "backward"): 20, ("dispatch", "forward"): 5,
        ("combine", "forward"): 10, ("(other)", "forward"): 7}
    assert rows[("combine", "forward")]["comm_us"] == 10 and rows[("attention", "forward")]["comm_us"] == 0
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)


def test_parse_scope_and_hlo_map():
    assert trace_analysis.parse_scope("jit(step)/transpose(jvp(moe))/dispatch/gather") == ("dispatch", True)
    assert trace_analysis.parse_scope("jit(step)/pipeline_weight_grad/while/body") == ("W", False)
    assert trace_analysis.parse_scope("") == ("(other)", False)
    text = ('HloModule jit_step, is_scheduled=true\n  %fusion.3 = f32[2]{0} fusion(%p), kind=kLoop, '
            'metadata={op_name="jit(step)/jvp(moe)/gate/dot" stack_frame_id=1}\n  %p = f32[2] parameter(0)\n')
    assert trace_analysis.hlo_scope_map("x", text) == {"jit_step": {"fusion.3": "jit(step)/jvp(moe)/gate/dot"}}


def test_real_tiny_trace(tmp_path, capsys):
    """Two traced training steps of the tiny preset (small batch) on one device: the named scopes are in the
    trace, and analyze / the CLI handler write a table, JSON and a PNG."""
    from rich.console import Console

    from jaxseek import profile_run

    parser = argparse.ArgumentParser()
    profile_run.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "train", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                              "--seq-len", "16", "--layers", "2", "--out", str(tmp_path)])
    trace = profile_run.capture("train", args, mesh=make_mesh(devices=jax.devices()[:1]))
    assert trace.name == "train.p0.trace.json.gz" and list(tmp_path.glob("xplane/p0/plugins/profile/*/*.xplane.pb"))
    result = trace_analysis.analyze(trace)
    assert result["steps"] == 2 and result["ops"] > 0
    found = {r["scope"] for r in result["scopes"]}
    assert {"attention", "moe", "gate", "dispatch", "experts", "combine", "shared_experts", "mlp"} <= found
    assert {r["pass"] for r in result["scopes"]} == {"forward", "backward"}
    args = parser.parse_args(["profile", "analyze", str(trace), "--json", str(tmp_path / "a.json"),
                              "--png", str(tmp_path / "step.png")])
    assert args.handler(args, Console(width=200)) == 0
    assert json.loads((tmp_path / "a.json").read_text())["ops"] == result["ops"]
    assert (tmp_path / "step.png").read_bytes()[:4] == b"\x89PNG"
    print(json.dumps({"overall": result["overall"], "scopes": result["scopes"]}, indent=1))
