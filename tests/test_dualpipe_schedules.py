"""Pipeline schedules as data (sharding/dualpipe.py): every operation once on the rank holding its stage,
in dependency order; the DualPipe README's comparison table (bubble, activations, parameters, copies)
reproduced by simulation; DualPipe's eight steps against the reference's step counts; the figure and the
``jaxseek schedule`` command."""

import collections

import pytest

from jaxseek.cli import main
from sharding.dualpipe import DEFAULT_COSTS, Op, account, build_schedule, dependencies, published_bubble, simulate
from sharding.schedule_plot import plot_schedule

PP_SIZES = (2, 4, 8)
# B = 2W but F != W, B != 2F; F&B = F + B (no overlap gain), the setting the ZB1P and 1F1B formulas assume.
SKEWED_COSTS = {"F": 2.0, "B": 3.0, "W": 1.5, "F&B": 5.0}
SCALED_COSTS = {"F": 2.0, "B": 4.0, "W": 2.0, "F&B": 6.0}  # DEFAULT_COSTS x 2
OVERLAP_COSTS = {"F": 1.0, "B": 2.0, "W": 1.0, "F&B": 2.5}  # overlapping a forward and a backward saves time


def _ranks_for(kind: str, pp: int) -> int:
    """Pipeline ranks for ``pp`` stages: DualPipeV holds two stages per rank."""
    return pp // 2 if kind == "dualpipev" else pp


def _cases():
    """(kind, num_ranks, num_chunks): PP in {2, 4, 8} for every kind, DualPipeV on 1, 2, 4 and 8 ranks,
    each at the fewest micro-batches the kind allows, an odd count where allowed, and 20."""
    cases = set()
    for kind in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        for ranks in {_ranks_for(kind, pp) for pp in PP_SIZES} | ({1, 2, 4, 8} if kind == "dualpipev" else set()):
            fewest = 2 * ranks if kind.startswith("dualpipe") else 1
            for chunks in {fewest, 20, fewest + 3 if kind != "dualpipe" else fewest + 2}:
                if chunks >= fewest:
                    cases.add((kind, ranks, chunks))
    return sorted(cases)


CASES = _cases()


def _expected_rank(kind: str, num_ranks: int, direction: int, stage: int) -> int:
    """Where the README places each stage: 1F1B/ZB1P stage s on rank s; DualPipe direction 0 stage s on
    rank s and direction 1 stage s on rank PP-1-s; DualPipeV stage s on rank s, then back (a V)."""
    if kind == "dualpipe" and direction == 1:
        return num_ranks - 1 - stage
    if kind == "dualpipev" and stage >= num_ranks:
        return 2 * num_ranks - 1 - stage
    return stage


def _families(kind: str) -> tuple[str, ...]:
    """The parts an op computes: a whole backward (BW) is both the input part B and the weight part W."""
    return ("B", "W") if kind == "BW" else (kind,)


def _positions(schedule):
    """{(part, micro_batch, direction, stage): (rank, slot index)} for the parts F, B and W."""
    where = {}
    for r, i, op in schedule.ops():
        for family in _families(op.kind):
            where[family, op.micro_batch, op.direction, op.stage] = (r, i)
    return where


@pytest.mark.parametrize("kind,num_ranks,num_chunks", CASES)
def test_every_operation_once_on_the_rank_holding_its_stage(kind, num_ranks, num_chunks):
    schedule = build_schedule(kind, num_ranks, num_chunks)
    stages = 2 * num_ranks if kind == "dualpipev" else num_ranks
    directions = (0, 1) if kind == "dualpipe" else (0,)
    per_direction = num_chunks // 2 if kind == "dualpipe" else num_chunks
    assert (schedule.num_ranks, schedule.num_stages, schedule.num_chunks) == (num_ranks, stages, num_chunks)
    expected = {(mb, d, s) for mb in range(per_direction) for d in directions for s in range(stages)}
    counts = {family: collections.Counter() for family in "FBW"}
    for r, _, op in schedule.ops():
        assert r == _expected_rank(kind, num_ranks, op.direction, op.stage), (r, op)
        for family in _families(op.kind):
            counts[family][op.micro_batch, op.direction, op.stage] += 1
    for family, counter in counts.items():
        assert set(counter) == expected, family
        assert set(counter.values()) == {1}, (family, [k for k, n in counter.items() if n > 1])
    for slots in schedule.ranks:  # a slot is one op, or an overlapped forward and backward
        for slot in slots:
            assert len(slot) == 1 or (len(slot) == 2 and slot[0].kind == "F" and slot[1].kind in ("B", "BW"))


@pytest.mark.parametrize("kind,num_ranks,num_chunks", CASES)
def test_dependency_order_on_each_rank_and_in_the_simulated_time(kind, num_ranks, num_chunks):
    schedule = build_schedule(kind, num_ranks, num_chunks)
    where = _positions(schedule)
    for r, i, op in schedule.ops():
        key = (op.micro_batch, op.direction, op.stage)
        if op.kind == "W":  # its B earlier on the same rank
            assert where[("B", *key)][0] == r and where[("B", *key)][1] < i, op
        if op.kind in ("B", "BW"):  # its forward earlier on the same rank (never in the same slot)
            assert where[("F", *key)][0] == r and where[("F", *key)][1] < i, op
    timeline = simulate(schedule, SKEWED_COSTS)  # raises on a deadlock
    assert len(timeline.start) == sum(len(slots) for slots in schedule.ranks)
    for r, i, op in schedule.ops():  # every dependency finished before the slot starts, across ranks too
        mb, d, s = op.micro_batch, op.direction, op.stage
        needs = {"F": [("F", mb, d, s - 1)] if s > 0 else [],
                 "W": [("B", mb, d, s)]}.get(op.kind, [("F", mb, d, s)] + (
                     [("B", mb, d, s + 1)] if s < schedule.num_stages - 1 else []))
        for need in needs:
            assert timeline.finish[where[need]] <= timeline.start[r, i], (op, need)
    for r, slots in enumerate(schedule.ranks):  # one slot at a time per rank
        for i in range(1, len(slots)):
            assert timeline.start[r, i] >= timeline.finish[r, i - 1]


def test_dependencies_are_the_documented_ones():
    assert dependencies(Op("F", 3, 1, 0), 4) == []
    assert dependencies(Op("F", 3, 1, 2), 4) == [("F", 3, 1, 1)]
    assert dependencies(Op("B", 3, 1, 2), 4) == [("F", 3, 1, 2), ("B", 3, 1, 3)]
    assert dependencies(Op("BW", 3, 0, 3), 4) == [("F", 3, 0, 3)]  # the last stage starts the backward
    assert dependencies(Op("W", 3, 0, 1), 4) == [("B", 3, 0, 1)]


def _table_bubble(kind: str, pp: int, c: dict) -> float:
    """The README's comparison table, written out here (not through published_bubble)."""
    if kind == "1f1b":
        return (pp - 1) * (c["F"] + c["B"])
    if kind == "zb1p":
        return (pp - 1) * (c["F"] + c["B"] - 2 * c["W"])
    return (pp / 2 - 1) * (c["F&B"] + c["B"] - 3 * c["W"])


@pytest.mark.parametrize("costs", [DEFAULT_COSTS, SKEWED_COSTS], ids=["default", "skewed"])
@pytest.mark.parametrize("kind", ["1f1b", "zb1p"])
@pytest.mark.parametrize("pp", PP_SIZES)
def test_one_direction_bubbles_match_the_published_table(kind, pp, costs):
    for chunks in (pp, 2 * pp + 1, 20):
        bubble = account(build_schedule(kind, pp, chunks), costs).bubble
        assert bubble == pytest.approx(_table_bubble(kind, pp, costs)), chunks
        assert bubble == pytest.approx(published_bubble(kind, pp, costs))


@pytest.mark.parametrize("costs", [DEFAULT_COSTS, SCALED_COSTS, OVERLAP_COSTS], ids=["default", "scaled", "overlap"])
@pytest.mark.parametrize("kind", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", (2, 4, 8))
def test_dualpipe_bubbles_match_the_published_table(kind, pp, costs):
    ranks = _ranks_for(kind, pp)
    for chunks in (2 * ranks, 20):
        schedule = build_schedule(kind, ranks, chunks)
        assert schedule.num_stages == pp
        bubble = account(schedule, costs).bubble
        assert bubble == pytest.approx(_table_bubble(kind, pp, costs)), chunks
        assert bubble == pytest.approx(published_bubble(kind, pp, costs))


@pytest.mark.parametrize("kind,parameters,copies", [("1f1b", 1, 1), ("zb1p", 1, 1), ("dualpipe", 2, 2),
                                                    ("dualpipev", 2, 1)])
@pytest.mark.parametrize("pp", PP_SIZES)
def test_memory_columns_match_the_published_table(kind, parameters, copies, pp):
    row = account(build_schedule(kind, _ranks_for(kind, pp), 20))
    extra = 1 if kind.startswith("dualpipe") else 0
    assert (row.num_stages, row.peak_activations) == (pp, pp + extra)
    assert (row.parameters_per_rank, row.copies_per_stage) == (parameters, copies)


def _reference_signature(half_rank: int, half: int, chunks_per_direction: int, stages: int) -> list:
    """The reference DualPipe's per-rank loop (deepseek-ai/DualPipe, dualpipe.py, steps 1-8), transcribed
    as slots of (kind, phase) with the reference's own step counts and its zero-bubble switch in step 6."""
    slots, deferred = [], 0
    step_1 = (half - half_rank - 1) * 2
    step_2 = half_rank + 1
    step_3 = half - half_rank - 1
    step_4 = chunks_per_direction - stages + half_rank + 1
    step_5 = half - half_rank - 1
    step_6 = half_rank + 1
    step_7 = half - half_rank - 1
    slots += [(("F", 0),)] * step_1
    slots += [(("F", 0),), (("F", 1),)] * step_2
    slots += [(("B", 1),), (("W", None),), (("F", 1),)] * step_3
    for i in range(step_4):
        if i == 0 and half_rank == half - 1:  # the middle ranks: first pair not overlapped
            slots += [(("F", 0),), (("BW", 1),)]
        else:
            slots += [(("F", 0), ("BW", 1))]
        slots += [(("F", 1), ("BW", 0))]
    slots += [(("BW", 1),), (("F", 1), ("BW", 0))] * step_5
    enable_zb = False
    for i in range(step_6):
        if i == step_6 // 2 and half_rank % 2 == 1:
            enable_zb = True
        slots.append((("B" if enable_zb else "BW", 1),))
        deferred += enable_zb
        if i == step_6 // 2 and half_rank % 2 == 0:
            enable_zb = True
        slots.append((("B" if enable_zb else "BW", 0),))
        deferred += enable_zb
    slots += [(("W", None),), (("B", 0),)] * step_7
    assert deferred == half_rank + 1  # the reference's step 8 count
    slots += [(("W", None),)] * (half_rank + 1)
    return slots


def _signature(schedule, r: int) -> list:
    first_stage = schedule.placement()[r][0]
    return [tuple((op.kind, None if op.kind == "W" else int(op.stage != first_stage)) for op in slot)
            for slot in schedule.ranks[r]]


@pytest.mark.parametrize("num_ranks,num_chunks", [(2, 4), (4, 8), (4, 10), (8, 16), (8, 20), (8, 24)])
def test_dualpipe_ranks_follow_the_reference_eight_steps(num_ranks, num_chunks):
    schedule = build_schedule("dualpipe", num_ranks, num_chunks)
    half = num_ranks // 2
    for r in range(num_ranks):
        half_rank = min(r, num_ranks - 1 - r)
        assert _signature(schedule, r) == _reference_signature(half_rank, half, num_chunks // 2, num_ranks), r


@pytest.mark.parametrize("num_ranks,num_chunks", [(1, 2), (2, 4), (2, 7), (4, 10), (4, 20)])
def test_dualpipev_ranks_follow_the_reference_eight_steps(num_ranks, num_chunks):
    schedule = build_schedule("dualpipev", num_ranks, num_chunks)
    for r in range(num_ranks):
        assert _signature(schedule, r) == _reference_signature(r, num_ranks, num_chunks, 2 * num_ranks), r


def test_dualpipe_step_counts_at_pp8_chunks20():
    """Counted by structure on rank 0 and the middle rank 3 (PP=8, C=20, half = 4)."""
    pp, chunks, half = 8, 20, 4
    schedule = build_schedule("dualpipe", pp, chunks)
    for r in (0, 3):
        half_rank = min(r, pp - 1 - r)
        sig = _signature(schedule, r)
        leading = next(i for i, slot in enumerate(sig) if slot != (("F", 0),))
        assert leading == (half - half_rank - 1) * 2 + 1  # step 1's nF0 and step 2's first F0
        pairs = sum(len(slot) == 2 for slot in sig)
        step_4 = chunks // 2 - pp + half_rank + 1  # pairs of (F0 & B1, F1 & B0)
        middle = half_rank == half - 1
        assert pairs == 2 * step_4 - middle + (half - half_rank - 1)  # + step 5's F1 & B0
        assert sum(slot == (("F", 1),) for slot in sig) == (half_rank + 1) + (half - half_rank - 1)  # steps 2, 3
        assert sum(slot == (("B", 0),) for slot in sig) >= half - half_rank - 1  # step 7
        assert sig[-(half_rank + 1):] == [(("W", None),)] * (half_rank + 1)  # step 8
    assert _signature(schedule, 3)[8:10] == [(("F", 0),), (("BW", 1),)]  # the middle rank's split first pair
    assert _signature(schedule, 0)[6 + 2 + 3 * 3] == (("F", 0), ("BW", 1))  # rank 0 overlaps its first pair


@pytest.mark.parametrize("kind,num_ranks,num_chunks,argument", [
    ("dualpipe", 3, 12, "num_ranks"), ("dualpipe", 4, 9, "num_chunks"), ("dualpipe", 4, 6, "num_chunks"),
    ("dualpipev", 4, 7, "num_chunks"), ("gpipe", 4, 8, "kind"), ("1f1b", 0, 8, "num_ranks"),
    ("zb1p", 4, 0, "num_chunks")])
def test_precondition_errors_name_the_argument(kind, num_ranks, num_chunks, argument):
    with pytest.raises(ValueError, match=argument):
        build_schedule(kind, num_ranks, num_chunks)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("kind,num_ranks,num_chunks,costs", [("dualpipe", 8, 20, None),
                                                             ("zb1p", 4, 8, SKEWED_COSTS)])
def test_plot_writes_a_png(tmp_path, kind, num_ranks, num_chunks, costs):
    path = tmp_path / f"{kind}.png"
    timeline = plot_schedule(build_schedule(kind, num_ranks, num_chunks), path, costs)
    width, height = _png_size(path)
    assert 20_000 < path.stat().st_size < 3_000_000
    assert 600 <= width <= 3000 and 250 <= height <= 1500 and width > height
    assert timeline.makespan > 0


def test_plot_rejects_bad_costs(tmp_path):
    with pytest.raises(ValueError, match="costs"):
        plot_schedule(build_schedule("1f1b", 2, 4), tmp_path / "x.png", {"X": 1.0})
    with pytest.raises(ValueError, match="costs"):
        plot_schedule(build_schedule("1f1b", 2, 4), tmp_path / "x.png", {"W": 3.0})
    assert not (tmp_path / "x.png").exists()


def test_cli_schedule_writes_the_figure_and_the_row(tmp_path, capsys):
    out = tmp_path / "dualpipe.png"
    assert main(["schedule", "--kind", "dualpipev", "--ranks", "4", "--chunks", "10", "--out", str(out),
                 "--costs", "F=2,B=4,W=2,F&B=6"]) == 0
    text = capsys.readouterr().out
    assert _png_size(out)[0] > 600
    assert "dualpipev: 4 ranks, 8 stages" in text and f"wrote {out}" in text.replace("\n", "")
    row = next(line for line in text.splitlines() if "2x" in line)
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]
    # bubble (8/2-1)(6+4-3x2) = 12 simulated and published, PP+1 activations, 2 stages per rank, 1 copy
    assert cells[:5] == ["12", "12", "9", "2x", "1"]


@pytest.mark.parametrize("argv,message", [
    (["--kind", "gpipe"], "gpipe"), (["--kind", "dualpipe", "--ranks", "3"], "num_ranks"),
    (["--kind", "dualpipe", "--ranks", "4", "--chunks", "6"], "num_chunks"), (["--costs", "F=x"], "costs")])
def test_cli_schedule_bad_arguments_are_clean_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "bad.png"
    assert main(["schedule", *argv, "--out", str(out)]) == 2
    text = capsys.readouterr().out
    assert "error:" in text and message in text and "Traceback" not in text
    assert not out.exists()


def test_latency_is_charged_only_between_ranks():
    """A one-rank DualPipeV keeps every dependency on its rank: latency changes nothing. One micro-batch through
    4 ranks of 1F1B crosses 2 (PP - 1) = 6 rank boundaries, each paying it once."""
    single = build_schedule("dualpipev", 1, 2)
    assert simulate(single, latency=5.0).makespan == simulate(single).makespan
    schedule = build_schedule("1f1b", 4, 1)
    assert simulate(schedule, latency=0.5).makespan == simulate(schedule).makespan + 0.5 * 6
