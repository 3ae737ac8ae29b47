"""The pipeline executor (sharding/pipeline.py) and its tick tables (sharding/pipeline_ticks.py) on a
residual MLP in float64: per-micro-batch losses, every gradient, the summed stats and the last stage's
outputs against a sequential loop over micro-batches and stages, for 1F1B, ZB1P, DualPipe and DualPipeV on
2, 4 and 8 pipeline ranks; the tables replayed message by message (every operation once, every ring-buffer
read finds its own micro-batch, ``depth`` as small as the schedule allows); the public boundary's errors;
and the overlapped forward-and-backward region's named scopes in the lowered program."""

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from sharding import pipeline_ticks as ticks
from sharding.dualpipe import KINDS, build_schedule, simulate
from sharding.pipeline import PipelineFns, PipelineParams, forward_only, pipeline_step

FEATURES, HIDDEN, WIDE, TARGETS, MICRO = 5, 6, 13, 3, 3  # odd sizes; MICRO rows per micro-batch
# (kind, ranks, micro-batches): PP 2 and 4 for every kind (DualPipeV on 4 ranks runs 8 stages), PP 8 for
# DualPipe; odd counts, fewer micro-batches than ranks (ZB1P 4 x 3), DualPipe above its minimum.
TRAIN_CASES = [("1f1b", 2, 3), ("1f1b", 4, 6), ("zb1p", 2, 5), ("zb1p", 4, 3), ("dualpipe", 2, 4),
               ("dualpipe", 4, 10), ("dualpipe", 8, 16), ("dualpipev", 2, 6), ("dualpipev", 4, 8)]
TOLERANCE = 1e-12


@pytest.fixture(scope="module", autouse=True)
def float64():
    """float64 for this module only (restored afterwards, other test files run in float32)."""
    with jax.enable_x64(True):
        yield


# --- the model: pre (embedding), stages (residual MLP blocks), head (linear + squared error) ---

def pre(p, data):
    """p: [FEATURES, HIDDEN]; data: ([MICRO, FEATURES] inputs, [MICRO, TARGETS] targets)."""
    return jnp.tanh(data[0] @ p)  # [MICRO, HIDDEN]


def stage(p, x):
    """One residual block. x: [MICRO, HIDDEN]. The extra loss depends on the weights and on the activation
    (so it sends a gradient upstream); the stats count calls and sum the output."""
    y = x + jnp.tanh(x @ p["w1"]) @ p["w2"]  # [MICRO, HIDDEN]
    extra = 1e-3 * jnp.sum(p["w1"] ** 2) + 1e-2 * jnp.mean(y ** 2)
    return y, extra, {"calls": jnp.ones((), jnp.int32), "y_sum": jnp.sum(y)}


def head(p, y, data):
    loss = jnp.mean((y @ p["w"] + p["b"] - data[1]) ** 2)
    return loss, {"seen": jnp.ones((), jnp.int32), "rows": jnp.asarray(y.shape[0], jnp.int32)}


FNS = PipelineFns(pre, stage, head)


def make_inputs(num_stages: int, num_chunks: int, seed: int):
    """Fresh float64 parameters (stages stacked [num_stages, ...]) and a batch of num_chunks micro-batches."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float64)
    params = PipelineParams(normal(FEATURES, HIDDEN, scale=0.5),
                            {"w1": normal(num_stages, HIDDEN, WIDE, scale=0.3),
                             "w2": normal(num_stages, WIDE, HIDDEN, scale=0.3)},
                            {"w": normal(HIDDEN, TARGETS, scale=0.5), "b": normal(TARGETS)})
    rows = num_chunks * MICRO
    return params, (normal(rows, FEATURES), normal(rows, TARGETS))


@jax.jit
@functools.partial(jax.value_and_grad, has_aux=True)
def micro_batch_grad(params, data):
    """One micro-batch through pre, every stage in order and head: ((objective, (output [MICRO, HIDDEN], stage
    stats [num_stages], head stats)), gradients of the objective)."""
    def block(x, p):
        y, extra, stats = stage(p, x)
        return y, (extra, stats)
    y, (extras, stats) = jax.lax.scan(block, pre(params.pre, data), params.stages)
    loss, head_stats = head(params.post, y, data)
    return loss + jnp.sum(extras), (y, stats, head_stats)


class Reference(NamedTuple):
    losses: np.ndarray  # [num_chunks]
    outputs: np.ndarray  # [num_chunks, MICRO, HIDDEN] the last stage's
    stage_stats: dict  # summed over micro-batches, leaves [num_stages]
    head_stats: dict
    grads: PipelineParams  # of the mean objective


def sequential(params, batch, num_chunks: int) -> Reference:
    """The loop the pipeline must reproduce: micro-batch after micro-batch, gradients averaged."""
    steps = [jax.device_get(micro_batch_grad(params, jax.tree.map(lambda a: a[mb * MICRO:(mb + 1) * MICRO], batch)))
             for mb in range(num_chunks)]
    (losses, (outputs, stage_stats, head_stats)), grads = jax.tree.map(lambda *a: np.stack(a), *steps)
    return Reference(losses, outputs, jax.tree.map(lambda a: a.sum(0), stage_stats),
                     jax.tree.map(lambda a: a.sum(0), head_stats), jax.tree.map(lambda g: g.mean(0), grads))


def calc_diff(x, y) -> float:
    """DeepEP / DualPipe's similarity on x + 1 and y + 1: 0 for equal arrays."""
    x, y = np.asarray(x, np.float64) + 1, np.asarray(y, np.float64) + 1
    return float(1 - 2 * np.sum(x * y) / np.sum(x * x + y * y))


def assert_close(got, want, what: str) -> None:
    """Every leaf: calc_diff and the largest absolute difference both under TOLERANCE."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        name = what + jax.tree_util.keystr(path)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert np.abs(a - b).max() < TOLERANCE, (name, np.abs(a - b).max())
        assert abs(calc_diff(a, b)) < TOLERANCE, (name, calc_diff(a, b))


def pp_mesh(ranks: int, axis: str = "pp") -> Mesh:
    return Mesh(np.array(jax.devices()[:ranks]), (axis,))


@functools.cache
def run_case(kind: str, ranks: int, chunks: int):
    """(schedule, params, batch, pipelined result, Reference), computed once per case."""
    schedule = build_schedule(kind, ranks, chunks)
    params, batch = make_inputs(schedule.num_stages, chunks, seed=1000 * KINDS.index(kind) + 100 * ranks + chunks)
    mesh = pp_mesh(ranks)
    step = jax.jit(lambda p, b: pipeline_step(schedule, FNS, p, b, mesh=mesh, return_outputs=True))
    result = jax.device_get(step(params, batch))
    return schedule, params, batch, result, sequential(params, batch, chunks)


@pytest.mark.parametrize("kind,ranks,chunks", TRAIN_CASES)
def test_training_step_matches_sequential_loop(kind, ranks, chunks):
    schedule, _, _, result, want = run_case(kind, ranks, chunks)
    assert result.losses.dtype == np.float64 and result.losses.shape == (chunks,)
    np.testing.assert_allclose(result.losses, want.losses, rtol=0, atol=TOLERANCE)
    assert_close(result.grads.pre, want.grads.pre, "pre")
    assert_close(result.grads.stages, want.grads.stages, "stages")
    assert_close(result.grads.post, want.grads.post, "post")
    np.testing.assert_array_equal(result.stage_stats["calls"], np.full(schedule.num_stages, chunks))
    np.testing.assert_allclose(result.stage_stats["y_sum"], want.stage_stats["y_sum"], rtol=0, atol=1e-10)
    assert int(result.head_stats["seen"]) == chunks and int(result.head_stats["rows"]) == chunks * MICRO
    assert result.outputs.shape == (chunks, MICRO, HIDDEN)
    np.testing.assert_allclose(result.outputs, want.outputs, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("ranks,chunks", [(4, 10), (8, 16)])
def test_dualpipe_sums_both_copies_of_every_stage(ranks, chunks):
    """DualPipe holds each stage on two ranks, one per direction; each copy's share (the reference over that
    direction's half of the batch) is material, so a gradient missing either copy cannot pass."""
    schedule, params, batch, result, _ = run_case("dualpipe", ranks, chunks)
    placement = schedule.placement()
    assert all(sum(s in stages for stages in placement) == 2 for s in range(schedule.num_stages))
    half = chunks // 2
    shares = [sequential(params, jax.tree.map(lambda a: a[d * half * MICRO:][:half * MICRO], batch), half).grads.stages
              for d in (0, 1)]
    for name, got in result.grads.stages.items():
        one, other = shares[0][name] / 2, shares[1][name] / 2  # the mean over all micro-batches
        assert_close(got, one + other, f"stages[{name!r}]")
        for share in (one, other):
            per_stage = np.abs(share).reshape(schedule.num_stages, -1).max(axis=1)
            assert (per_stage > 1e3 * TOLERANCE).all(), (name, per_stage)


@pytest.mark.parametrize("kind,ranks,chunks", [("dualpipe", 4, 10), ("dualpipev", 2, 6)])
def test_forward_only_step_matches_sequential_forward(kind, ranks, chunks):
    _, params, batch, _, want = run_case(kind, ranks, chunks)
    step = jax.jit(lambda p, b: pipeline_step(build_schedule(kind, ranks, chunks), FNS, p, b, mesh=pp_mesh(ranks),
                                              train=False, return_outputs=True))
    result = jax.device_get(step(params, batch))
    assert result.grads is None
    np.testing.assert_allclose(result.losses, want.losses, rtol=0, atol=TOLERANCE)
    assert result.outputs.shape == (chunks, MICRO, HIDDEN)  # [num_chunks, *y]
    np.testing.assert_allclose(result.outputs, want.outputs, rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(result.stage_stats["calls"], np.full(len(want.stage_stats["calls"]), chunks))
    np.testing.assert_allclose(result.stage_stats["y_sum"], want.stage_stats["y_sum"], rtol=0, atol=1e-10)
    assert int(result.head_stats["seen"]) == chunks


def test_bad_arguments_name_the_argument():
    schedule = build_schedule("1f1b", 2, 4)
    params, batch = make_inputs(2, 4, seed=0)

    def step(schedule=schedule, fns=FNS, params=params, batch=batch, mesh=pp_mesh(2)):
        return pipeline_step(schedule, fns, params, batch, mesh=mesh)
    with pytest.raises(ValueError, match=r"^mesh: no 'pp' axis"):
        step(mesh=pp_mesh(2, axis="dp"))
    with pytest.raises(ValueError, match=r"^schedule: built for 2 ranks .* has 4"):
        step(mesh=pp_mesh(4))
    with pytest.raises(ValueError, match=r"^params\.stages: .*num_stages=2.*\(6, 13\)"):
        step(params=params._replace(stages={**params.stages, "w1": params.stages["w1"][0]}))
    with pytest.raises(ValueError, match=r"^params\.stages: .*num_stages=2"):
        step(params=params._replace(stages=jax.tree.map(lambda a: jnp.concatenate([a, a]), params.stages)))
    with pytest.raises(ValueError, match=r"^batch: leading dimension 13 .*num_chunks=4"):
        step(batch=jax.tree.map(lambda a: jnp.concatenate([a, a[:1]]), batch))

    def narrowing(p, x):
        y, extra, stats = stage(p, x)
        return y[:, 1:], extra, stats
    with pytest.raises(ValueError, match=r"^fns\.stage: .*\(3, 6\).*\(3, 5\)"):
        step(fns=FNS._replace(stage=narrowing))

    def widening(p, x):
        y, extra, stats = stage(p, x)
        return y.astype(jnp.float32), extra, stats
    with pytest.raises(ValueError, match=r"^fns\.stage: .*float32"):
        step(fns=FNS._replace(stage=widening))


# --- the tick tables, replayed ---

TABLE_CASES = [(kind, ranks, chunks) for kind in KINDS for ranks in (2, 4, 8) for chunks in (2 * ranks, 2 * ranks + 6)]
TABLE_CASES += [("1f1b", 4, 1), ("1f1b", 8, 5), ("zb1p", 4, 3), ("zb1p", 8, 7), ("dualpipev", 1, 2), ("dualpipev", 3, 7)]


def table_ops(tables: ticks.TickTables) -> list[list[tuple[int, tuple]]]:
    """Per rank, in tick order, (tick, the slot's ops as (kind, global micro-batch, stage))."""
    per_rank = [[] for _ in range(tables.kind.shape[1])]
    for t, r in zip(*np.nonzero(tables.kind)):
        kind = int(tables.kind[t, r])
        forward = ("F", int(tables.f_micro_batch[t, r]), int(tables.stage_of_phase[r, tables.f_phase[t, r]]))
        back_kind = {ticks.BACKWARD: "B", ticks.WEIGHT: "W"}.get(kind, "BW")
        backward = (back_kind, int(tables.b_micro_batch[t, r]), int(tables.stage_of_phase[r, tables.b_phase[t, r]]))
        ops = {ticks.FORWARD: (forward,), ticks.FORWARD_AND_BACKWARD: (forward, backward)}.get(kind, (backward,))
        for name, used in (("f", len(ops) == 2 or kind == ticks.FORWARD), ("b", kind != ticks.FORWARD)):
            fields = [getattr(tables, f"{name}_{field}")[t, r] for field in ("phase", "micro_batch", "slot")]
            assert all(v >= 0 for v in fields) if used else all(v == -1 for v in fields), (t, r, name, fields)
        per_rank[r].append((int(t), ops))
    return per_rank


def replay(tables: ticks.TickTables, num_stages: int) -> int:
    """Sends and files every message as the tables say, labelled (micro-batch, sending stage), and checks each
    read of a ring buffer finds the entry of its own micro-batch from the neighbouring stage (so no entry is
    overwritten while live). Returns the most entries any one buffer holds at once (arrival to last use)."""
    num_ticks, num_ranks = tables.kind.shape
    rings = {"activation": {}, "gradient": {}}  # (rank, phase, slot) -> (micro-batch, sending stage)
    lives = collections.defaultdict(dict)  # (what, rank, phase) -> {micro-batch: [arrival, last use]}
    for t in range(num_ticks):
        for r in range(num_ranks):
            kind = tables.kind[t, r]
            reads = []
            if kind in (ticks.FORWARD, ticks.FORWARD_AND_BACKWARD):
                reads.append(("activation", -1, tables.f_phase[t, r], tables.f_micro_batch[t, r], tables.f_slot[t, r]))
            if kind in (ticks.BACKWARD, ticks.WEIGHT, ticks.FULL_BACKWARD, ticks.FORWARD_AND_BACKWARD):
                for what, step in (("activation", -1), ("gradient", 1)):
                    reads.append((what, step, tables.b_phase[t, r], tables.b_micro_batch[t, r], tables.b_slot[t, r]))
            for what, step, phase, mb, slot in reads:
                source_stage = tables.stage_of_phase[r, phase] + step
                if 0 <= source_stage < num_stages:  # else pre's output / no gradient: the buffer is not read
                    assert rings[what].get((r, phase, slot)) == (mb, source_stage), (t, r, what, phase, mb, slot)
                    lives[what, r, phase][mb][1] = t
        for r in range(num_ranks):  # results move after every rank's reads of this tick
            for index, source in enumerate(ticks.SOURCES):
                sender = r + {ticks.TO_NEXT: 1, ticks.TO_PREVIOUS: -1, ticks.TO_SELF: 0}[source]
                route = {ticks.TO_NEXT: ticks.TO_PREVIOUS, ticks.TO_PREVIOUS: ticks.TO_NEXT}.get(source, source)
                for what, sent, phase_of, mb_of, filing in (
                        ("activation", tables.send_activation, tables.f_phase, tables.f_micro_batch,
                         tables.receive_activation),
                        ("gradient", tables.send_gradient, tables.b_phase, tables.b_micro_batch, tables.receive_gradient)):
                    valid, phase, slot = filing[t, r, index]
                    sends = 0 <= sender < num_ranks and sent[t, sender] == route
                    assert bool(valid) == bool(sends), (t, r, what, source)
                    if valid:
                        mb = mb_of[t, sender]
                        label = (mb, tables.stage_of_phase[sender, phase_of[t, sender]])
                        assert slot == mb % tables.depth
                        rings[what][r, phase, slot] = label
                        lives[what, r, phase][mb] = [t + 1, t + 1]
    most = 0
    for entries in lives.values():
        for arrival, _ in entries.values():
            most = max(most, sum(a <= arrival <= last for a, last in entries.values()))
    return most


@pytest.mark.parametrize("kind,ranks,chunks", TABLE_CASES)
def test_tick_tables_run_every_op_once_with_rings_as_deep_as_needed(kind, ranks, chunks):
    schedule = build_schedule(kind, ranks, chunks)
    stages, per_direction = schedule.num_stages, chunks // 2 if kind == "dualpipe" else chunks
    for run, parts in ((schedule, ("F", "B", "W")), (forward_only(schedule), ("F",))):
        tables = ticks.compile_ticks(run)
        per_rank = table_ops(tables)
        # the tables keep each rank's slots in the schedule's order, with global micro-batch indices
        assert [[ops for _, ops in rank] for rank in per_rank] == [
            [tuple((op.kind, op.direction * per_direction + op.micro_batch, op.stage) for op in slot)
             for slot in slots] for slots in run.ranks]
        # every (micro-batch, stage) is computed exactly once per part (a BW or an overlapped backward is B + W)
        counts = collections.Counter((part, mb, s) for rank in per_rank for _, ops in rank for kind_, mb, s in ops
                                     for part in ({"BW": ("B", "W")}.get(kind_, (kind_,))))
        assert counts == collections.Counter((p, mb, s) for p in parts for mb in range(chunks) for s in range(stages))
        assert tables.num_ticks == 1 + max(t for rank in per_rank for t, _ in rank)
        most = replay(tables, stages)
        assert tables.depth == max(most, 1)  # the ring is exactly as deep as the most entries live at once
        if run is schedule:  # inputs are kept from arrival to their weight gradient: within one of the peak
            assert tables.depth <= max(simulate(schedule).peak_activations) + 1


def test_overlapped_forward_and_backward_share_one_named_region():
    """In the lowered DualPipe step the switch over slot kinds (DualPipe on 2 ranks uses all six) has one branch
    per kind; only the F&B branch holds both the pipeline_forward and the pipeline_backward scopes, F only the
    first, B and BW only the second, W only pipeline_weight_grad."""
    schedule = build_schedule("dualpipe", 2, 4)
    assert sorted(set(ticks.compile_ticks(schedule).kind.flat) | {ticks.IDLE}) == list(range(len(ticks.KIND_NAMES)))
    params, batch = make_inputs(2, 4, seed=1)
    lowered = jax.jit(lambda p, b: pipeline_step(schedule, FNS, p, b, mesh=pp_mesh(2))).lower(params, batch)
    text = lowered.as_text(debug_info=True)
    assert "pipeline_forward" in text and "pipeline_backward" in text
    module = lowered.compiler_ir("stablehlo")

    def walk(operation, found):
        found.append(operation)
        for region in operation.regions:
            for block in region.blocks:
                for inner in block.operations:
                    walk(inner.operation, found)
        return found

    def scopes(region):
        names = " ".join(str(op.location) for block in region.blocks for inner in block.operations
                         for op in walk(inner.operation, []))
        return tuple(s for s in ("pipeline_forward", "pipeline_backward", "pipeline_weight_grad") if s in names)
    with module.context:
        switches = [op for op in walk(module.operation, []) if op.name == "stablehlo.case"
                    and len(op.regions) == len(ticks.KIND_NAMES)]
        assert len(switches) == 1
        assert dict(zip(ticks.KIND_NAMES, map(scopes, switches[0].regions))) == {
            "idle": (), "F": ("pipeline_forward",), "B": ("pipeline_backward",), "W": ("pipeline_weight_grad",),
            "BW": ("pipeline_backward",), "F&B": ("pipeline_forward", "pipeline_backward")}
