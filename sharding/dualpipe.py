"""Pipeline schedules as data: 1F1B, ZB1P, DualPipe and DualPipeV, each rank's sequence of operations.

A schedule is ``Schedule.ranks``: per rank, a list of slots; a slot is one operation or two overlapped ones
(DualPipe's F&B: one micro-batch's forward and another's backward in the same region, so one's
communication hides under the other's compute). An operation is ``Op(kind, micro_batch, direction, stage)``:

- kind: "F" forward, "B" backward for the input (activation gradient), "W" backward for the weights, or
  "BW" a whole backward (B then W at once, what a schedule without zero-bubble splitting runs);
- direction: 0 for micro-batches that enter at rank 0, 1 for those that enter at the last rank (DualPipe's
  second direction); one-directional schedules use 0 only;
- stage: the model stage (0 .. stages-1) the operation computes, in the order a micro-batch meets them.

Placement: 1F1B/ZB1P put stage r on rank r. DualPipe (PP ranks, PP stages) gives rank r stage r for
direction 0 and stage PP-1-r for direction 1, so every stage lives on two ranks (two parameter copies);
DualPipeV (N ranks, 2N stages) gives rank r stages r and 2N-1-r of one direction, the micro-batch turning
back at the last rank (a V). DualPipe's schedule is the DeepSeek-V3 report's eight steps, written as such
(``_dualpipe_rank``); DualPipeV is the same eight steps with rank/ranks in place of half_rank/half.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


class Op(NamedTuple):
    kind: str  # "F" | "B" | "W" | "BW"
    micro_batch: int
    direction: int
    stage: int


Slot = tuple[Op, ...]  # one op, or an overlapped forward and backward


@dataclasses.dataclass(frozen=True)
class Schedule:
    kind: str
    num_ranks: int
    num_stages: int
    num_chunks: int  # micro-batches in all (both directions for DualPipe)
    ranks: tuple[tuple[Slot, ...], ...]  # per rank, its slots in order

    def ops(self) -> list[tuple[int, int, Op]]:
        """Every (rank, slot index, op)."""
        return [(r, i, op) for r, slots in enumerate(self.ranks) for i, slot in enumerate(slots) for op in slot]

    def placement(self) -> tuple[tuple[int, ...], ...]:
        """Per rank, the stages it holds in phase order (the phase of an op is its stage's index here)."""
        found: list[list[int]] = [[] for _ in self.ranks]
        for r, _, op in self.ops():
            if op.stage not in found[r]:
                found[r].append(op.stage)
        return tuple(tuple(stages) for stages in found)


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


class _Rank:
    """Emits one rank's slots, counting micro-batches per phase and deferring weight gradients (zero bubble)."""

    def __init__(self, stage_of_phase, direction_of_phase):
        self.stage_of_phase, self.direction_of_phase = stage_of_phase, direction_of_phase
        self.next_forward, self.next_backward = [0, 0], [0, 0]
        self.deferred: list[Op] = []  # weight gradients waiting, first in first out
        self.slots: list[Slot] = []

    def _op(self, kind: str, phase: int, counter: list[int]) -> Op:
        op = Op(kind, counter[phase], self.direction_of_phase[phase], self.stage_of_phase[phase])
        counter[phase] += 1
        return op

    def forward(self, phase: int) -> Op:
        return self._op("F", phase, self.next_forward)

    def backward(self, phase: int, zero_bubble: bool) -> Op:
        """A backward for the input; with zero_bubble its weight gradient waits for a later ``weight()``."""
        op = self._op("B" if zero_bubble else "BW", phase, self.next_backward)
        if zero_bubble:
            self.deferred.append(op._replace(kind="W"))
        return op

    def weight(self) -> Op:
        return self.deferred.pop(0)

    def emit(self, *ops: Op) -> None:
        self.slots.append(tuple(ops))


def _dualpipe_rank(rank: _Rank, half_rank: int, half: int, chunks_per_direction: int, stages: int) -> None:
    """The eight steps of DualPipe for one rank (phase 0 = the rank's first stage's direction). DualPipeV
    calls it with (rank, ranks) for (half_rank, half)."""
    for _ in range((half - half_rank - 1) * 2):  # 1. nF0
        rank.emit(rank.forward(0))
    for _ in range(half_rank + 1):  # 2. nF0F1
        rank.emit(rank.forward(0))
        rank.emit(rank.forward(1))
    for _ in range(half - half_rank - 1):  # 3. nB1W1F1
        rank.emit(rank.backward(1, zero_bubble=True))
        rank.emit(rank.weight())
        rank.emit(rank.forward(1))
    for i in range(chunks_per_direction - stages + half_rank + 1):  # 4. nF0B1F1B0 (overlapped pairs)
        if i == 0 and half_rank == half - 1:  # the middle ranks do not overlap their first pair (smaller bubble)
            rank.emit(rank.forward(0))
            rank.emit(rank.backward(1, zero_bubble=False))
        else:
            rank.emit(rank.forward(0), rank.backward(1, zero_bubble=False))
        rank.emit(rank.forward(1), rank.backward(0, zero_bubble=False))
    for _ in range(half - half_rank - 1):  # 5. nB1F1B0
        rank.emit(rank.backward(1, zero_bubble=False))
        rank.emit(rank.forward(1), rank.backward(0, zero_bubble=False))
    steps6 = half_rank + 1  # 6. nB1B0, zero bubble switched on for the second half of these backwards
    for i in range(steps6):
        rank.emit(rank.backward(1, zero_bubble=2 * i >= steps6))
        rank.emit(rank.backward(0, zero_bubble=2 * i + 1 >= steps6))
    for _ in range(half - half_rank - 1):  # 7. nWB0
        rank.emit(rank.weight())
        rank.emit(rank.backward(0, zero_bubble=True))
    while rank.deferred:  # 8. nW
        rank.emit(rank.weight())


def _one_direction(num_ranks: int, num_chunks: int, zero_bubble: bool) -> list[list[Slot]]:
    """1F1B with stage r on rank r: warm-up forwards, one forward and one backward alternating, cool-down
    backwards. ZB1P (zero bubble, ZB-H1) splits each backward: B at once, W later, where the rank would wait
    for a downstream gradient in the cool-down."""
    ranks = []
    for r in range(num_ranks):
        rank = _Rank((r, r), (0, 0))
        warmup = min(num_ranks - r - 1, num_chunks)
        for _ in range(warmup):
            rank.emit(rank.forward(0))
        for _ in range(num_chunks - warmup):
            rank.emit(rank.forward(0))
            rank.emit(rank.backward(0, zero_bubble=zero_bubble))
            if len(rank.deferred) > r:  # rank r holds back up to r weight gradients (ZB-H1's memory bound)
                rank.emit(rank.weight())
        for _ in range(warmup):  # cool-down: each wait for a downstream gradient is filled with a W
            rank.emit(rank.backward(0, zero_bubble=zero_bubble))
            if rank.deferred:
                rank.emit(rank.weight())
        while rank.deferred:
            rank.emit(rank.weight())
        ranks.append(rank.slots)
    return ranks


def build_schedule(kind: str, num_ranks: int, num_chunks: int) -> Schedule:
    """Each rank's operations for ``num_chunks`` micro-batches over ``num_ranks`` pipeline ranks.

    kind: "1f1b" | "zb1p" | "dualpipe" | "dualpipev". DualPipe needs an even number of ranks and an even
    num_chunks >= 2 x ranks (half the micro-batches enter from each end); DualPipeV num_chunks >= 2 x ranks.
    """
    _require(kind in KINDS, "kind", f"expected one of {KINDS}, got {kind!r}")
    _require(num_ranks >= 1, "num_ranks", f"must be >= 1, got {num_ranks}")
    _require(num_chunks >= 1, "num_chunks", f"must be >= 1, got {num_chunks}")
    if kind in ("1f1b", "zb1p"):
        slots = _one_direction(num_ranks, num_chunks, zero_bubble=kind == "zb1p")
        return Schedule(kind, num_ranks, num_ranks, num_chunks, tuple(map(tuple, slots)))
    if kind == "dualpipe":
        _require(num_ranks % 2 == 0, "num_ranks", f"DualPipe needs an even number of ranks, got {num_ranks}")
        _require(num_chunks % 2 == 0 and num_chunks >= 2 * num_ranks, "num_chunks",
                 f"DualPipe needs an even number >= 2 x num_ranks = {2 * num_ranks}, got {num_chunks}")
        half, slots = num_ranks // 2, []
        for r in range(num_ranks):
            second_half = r >= half
            stages = (num_ranks - 1 - r, r) if second_half else (r, num_ranks - 1 - r)
            directions = (1, 0) if second_half else (0, 1)
            rank = _Rank(stages, directions)
            _dualpipe_rank(rank, min(r, num_ranks - 1 - r), half, num_chunks // 2, num_ranks)
            slots.append(tuple(rank.slots))
        return Schedule(kind, num_ranks, num_ranks, num_chunks, tuple(slots))
    _require(num_chunks >= 2 * num_ranks, "num_chunks",
             f"DualPipeV needs num_chunks >= 2 x num_ranks = {2 * num_ranks}, got {num_chunks}")
    slots = []
    for r in range(num_ranks):  # phase 0: stage r on the way out, phase 1: stage 2N-1-r on the way back
        rank = _Rank((r, 2 * num_ranks - 1 - r), (0, 0))
        _dualpipe_rank(rank, r, num_ranks, num_chunks, 2 * num_ranks)
        slots.append(tuple(rank.slots))
    return Schedule(kind, num_ranks, 2 * num_ranks, num_chunks, tuple(slots))


class Timeline(NamedTuple):
    """A simulated run: per (rank, slot index) start and finish times, and per-rank totals."""
    start: dict
    finish: dict
    makespan: float
    busy: tuple[float, ...]  # per rank: time spent computing
    bubble: tuple[float, ...]  # per rank: makespan - busy
    peak_activations: tuple[int, ...]  # per rank: most (micro-batch, stage) activations held between F and B


# The comparison table's units: F a forward chunk, B a whole backward chunk (input + weight gradients),
# W its weight-gradient part, F&B an overlapped forward and whole backward. Defaults: B = 2F = 2W and no
# speed-up from overlapping (F&B = F + B), the setting in which the published bubbles are exact.
DEFAULT_COSTS = {"F": 1.0, "B": 2.0, "W": 1.0, "F&B": 3.0}


def slot_cost(slot: Slot, costs: dict) -> float:
    """A slot's time: an overlapped pair costs F&B; a B (input gradient only) costs B - W; BW costs B."""
    if len(slot) == 2:
        return costs["F&B"]
    kind = slot[0].kind
    return {"F": costs["F"], "B": costs["B"] - costs["W"], "W": costs["W"], "BW": costs["B"]}[kind]


def dependencies(op: Op, num_stages: int) -> list[tuple[str, int, int, int]]:
    """What must be done before ``op``, as ("F" | "B", micro_batch, direction, stage) keys ("B" is also
    done by a BW): a forward needs the previous stage's forward; a backward its own forward and the next
    stage's input gradient; a weight gradient its own backward."""
    mb, d, s = op.micro_batch, op.direction, op.stage
    if op.kind == "F":
        return [("F", mb, d, s - 1)] if s > 0 else []
    if op.kind == "W":
        return [("B", mb, d, s)]
    return [("F", mb, d, s)] + ([("B", mb, d, s + 1)] if s < num_stages - 1 else [])


def simulate(schedule: Schedule, costs: dict | None = None, *, latency: float = 0.0) -> Timeline:
    """Runs every rank's slots in order, each as soon as the slots it depends on (on any rank) are done
    and results from other ranks have travelled ``latency``; ``ValueError`` naming the ranks when the schedule
    deadlocks. ``costs`` overrides ``DEFAULT_COSTS``."""
    costs = {**DEFAULT_COSTS, **(costs or {})}
    done: dict[tuple, float] = {}
    done_on: dict[tuple, int] = {}  # the rank that did it
    start, finish = {}, {}
    clock = [0.0] * schedule.num_ranks
    position = [0] * schedule.num_ranks
    held = [0] * schedule.num_ranks
    peak = [0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for r, slots in enumerate(schedule.ranks):
            while position[r] < len(slots):
                slot = slots[position[r]]
                needs = [key for op in slot for key in dependencies(op, schedule.num_stages)]
                if any(key not in done for key in needs):
                    break
                begin = max([clock[r]] + [done[key] + (latency if done_on[key] != r else 0.0) for key in needs])
                end = begin + slot_cost(slot, costs)
                start[r, position[r]], finish[r, position[r]] = begin, end
                for op in slot:
                    family = {"F": "F", "W": "W"}.get(op.kind, "B")
                    done[family, op.micro_batch, op.direction, op.stage] = end
                    done_on[family, op.micro_batch, op.direction, op.stage] = r
                    held[r] += {"F": 1, "B": -1, "BW": -1}.get(op.kind, 0)
                peak[r] = max(peak[r], held[r])
                clock[r] = end
                position[r] += 1
                progress = True
    stuck = [r for r in range(schedule.num_ranks) if position[r] < len(schedule.ranks[r])]
    _require(not stuck, "schedule", f"deadlocks: ranks {stuck} wait at slots "
             f"{[schedule.ranks[r][position[r]] for r in stuck]}")
    makespan = max(clock)
    busy = tuple(sum(slot_cost(slot, costs) for slot in slots) for slots in schedule.ranks)
    return Timeline(start, finish, makespan, busy, tuple(makespan - b for b in busy), tuple(peak))


class Accounting(NamedTuple):
    """The comparison table's columns for one schedule, in units of one stage of ``num_stages``."""
    kind: str
    num_ranks: int
    num_stages: int
    bubble: float  # the largest per-rank bubble
    peak_activations: int  # the most (micro-batch, stage) activations any rank holds
    parameters_per_rank: int  # stages' parameters on a rank (DualPipe and DualPipeV: 2)
    copies_per_stage: int  # ranks holding each stage (DualPipe: 2, its gradients summed)


def account(schedule: Schedule, costs: dict | None = None) -> Accounting:
    timeline = simulate(schedule, costs)
    placement = schedule.placement()
    copies = max(sum(stage in stages for stages in placement) for stage in range(schedule.num_stages))
    return Accounting(schedule.kind, schedule.num_ranks, schedule.num_stages, max(timeline.bubble),
                      max(timeline.peak_activations), max(map(len, placement)), copies)


def published_bubble(kind: str, num_stages: int, costs: dict | None = None) -> float:
    """The DualPipe README's bubble for ``num_stages`` pipeline stages (PP)."""
    c = {**DEFAULT_COSTS, **(costs or {})}
    return {"1f1b": (num_stages - 1) * (c["F"] + c["B"]),
            "zb1p": (num_stages - 1) * (c["F"] + c["B"] - 2 * c["W"]),
            "dualpipe": (num_stages / 2 - 1) * (c["F&B"] + c["B"] - 3 * c["W"]),
            "dualpipev": (num_stages / 2 - 1) * (c["F&B"] + c["B"] - 3 * c["W"])}[kind]
