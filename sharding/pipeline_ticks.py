"""A schedule compiled to the SPMD executor's tick tables: per (tick, rank), what to compute and where
its results go.

Every rank runs the same program (``sharding.pipeline``); at tick t rank r performs the slot the table
names for it, then activations and gradients move one hop by ``ppermute`` before tick t+1. Ticks come from
running the schedule with every slot taking one tick and a result usable from the next tick on, so each
rank keeps its schedule's order and waits (an idle tick) only where the schedule itself would.

Each rank keeps what it received, per phase (the stages it holds, ``Schedule.placement()``), in ring
buffers of ``depth`` entries indexed by micro-batch mod depth: the stage inputs (kept until the weight
gradient has used them) and the output gradients. ``depth`` is the most entries one buffer ever holds at
once, so the executor's memory follows the schedule's activation count.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sharding.dualpipe import Op, Schedule, Slot, dependencies

# Slot kinds, the executor's branch numbers.
IDLE, FORWARD, BACKWARD, WEIGHT, FULL_BACKWARD, FORWARD_AND_BACKWARD = range(6)
KIND_NAMES = ("idle", "F", "B", "W", "BW", "F&B")
# Where a result goes: nowhere (a first stage's input gradient, a last stage's output), the next rank,
# the previous rank, or this rank (DualPipeV's turn at the last rank).
NOWHERE, TO_NEXT, TO_PREVIOUS, TO_SELF = range(4)
SOURCES = (TO_NEXT, TO_PREVIOUS, TO_SELF)  # a receiver files what arrived from each route


@dataclasses.dataclass(frozen=True)
class TickTables:
    """int32 tables, [ticks, ranks] unless noted. F fields describe the slot's forward, B fields its backward
    (B, W or BW; also the W of a W slot). ``micro_batch`` columns are global indices into the batch's
    micro-batches (direction 1 of DualPipe after direction 0); ``slot`` columns index the ring buffers."""
    kind: np.ndarray
    f_phase: np.ndarray
    f_micro_batch: np.ndarray
    f_slot: np.ndarray
    b_phase: np.ndarray
    b_micro_batch: np.ndarray
    b_slot: np.ndarray
    send_activation: np.ndarray  # route of the forward's output
    send_gradient: np.ndarray  # route of the backward's input gradient
    # [ticks, ranks, 3 sources, 3]: (valid, phase, slot) where what arrived from each route is filed
    receive_activation: np.ndarray
    receive_gradient: np.ndarray
    stage_of_phase: np.ndarray  # [ranks, phases]
    depth: int
    num_ticks: int


def _route(schedule: Schedule, rank: int, op: Op, downstream: bool) -> tuple[int, int, int]:
    """(route, receiving rank, receiving phase) for a result of ``op`` travelling to the next stage
    (downstream) or the previous one; (NOWHERE, -1, -1) past either end."""
    stage = op.stage + (1 if downstream else -1)
    if not 0 <= stage < schedule.num_stages:
        return NOWHERE, -1, -1
    placement = schedule.placement()
    holders = [r for r in (rank, rank + 1, rank - 1) if 0 <= r < schedule.num_ranks and stage in placement[r]]
    # DualPipe holds every stage twice; a direction's micro-batches use the copy one hop along it.
    if schedule.kind == "dualpipe":
        step = 1 if (op.direction == 0) == downstream else -1
        holders = [rank + step]
    (target,) = holders[:1]
    route = TO_SELF if target == rank else (TO_NEXT if target == rank + 1 else TO_PREVIOUS)
    return route, target, placement[target].index(stage)


def _ticks(schedule: Schedule) -> list[list[int]]:
    """Per rank, the tick of each slot: as soon as its dependencies finished on an earlier tick."""
    done: dict[tuple, int] = {}
    ticks: list[list[int]] = [[] for _ in schedule.ranks]
    clock = [0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for r, slots in enumerate(schedule.ranks):
            while len(ticks[r]) < len(slots):
                slot = slots[len(ticks[r])]
                needs = [key for op in slot for key in dependencies(op, schedule.num_stages)]
                if any(key not in done for key in needs):
                    break
                tick = max([clock[r]] + [done[key] + 1 for key in needs])
                ticks[r].append(tick)
                for op in slot:
                    done[{"F": "F", "W": "W"}.get(op.kind, "B"), op.micro_batch, op.direction, op.stage] = tick
                clock[r] = tick + 1
                progress = True
    stuck = [r for r in range(schedule.num_ranks) if len(ticks[r]) < len(schedule.ranks[r])]
    if stuck:
        raise ValueError(f"schedule: deadlocks on ranks {stuck}")
    return ticks


def _slot_kind(slot: Slot) -> int:
    if len(slot) == 2:
        return FORWARD_AND_BACKWARD
    return {"F": FORWARD, "B": BACKWARD, "W": WEIGHT, "BW": FULL_BACKWARD}[slot[0].kind]


def compile_ticks(schedule: Schedule) -> TickTables:
    """The tables for ``schedule`` (see ``TickTables``); ``ValueError`` if it deadlocks."""
    ticks = _ticks(schedule)
    num_ticks = 1 + max(t for rank in ticks for t in rank)
    num_ranks = schedule.num_ranks
    placement = schedule.placement()
    phases = max(map(len, placement))
    per_direction = schedule.num_chunks // 2 if schedule.kind == "dualpipe" else schedule.num_chunks

    def global_micro_batch(op: Op) -> int:
        return op.direction * per_direction + op.micro_batch

    shape = (num_ticks, num_ranks)
    t = {name: np.full(shape, -1, np.int32) for name in ("f_phase", "f_micro_batch", "f_slot", "b_phase",
                                                         "b_micro_batch", "b_slot")}
    kind = np.zeros(shape, np.int32)
    send_activation = np.zeros(shape, np.int32)
    send_gradient = np.zeros(shape, np.int32)
    # Buffer lifetimes per (rank, phase, micro-batch): from arrival to the last use (W or BW).
    arrive: dict[tuple, int] = {}
    release: dict[tuple, int] = {}
    filed = []  # (tick, receiving rank, "activation" | "gradient", source, phase, micro-batch)
    for r, slots in enumerate(schedule.ranks):
        for slot, tick in zip(slots, ticks[r]):
            kind[tick, r] = _slot_kind(slot)
            for op in slot:
                phase = placement[r].index(op.stage)
                mb = global_micro_batch(op)
                uses = ("activation",) if op.kind == "F" else ("activation", "gradient")
                for what in uses:  # a buffer entry lives until its last use (the W or BW when training)
                    release[what, r, phase, mb] = max(release.get((what, r, phase, mb), tick), tick)
                if op.kind == "F":
                    t["f_phase"][tick, r], t["f_micro_batch"][tick, r] = phase, mb
                    route, target, target_phase = _route(schedule, r, op, downstream=True)
                    send_activation[tick, r] = route
                    if route != NOWHERE:
                        filed.append((tick, target, "activation", route, target_phase, mb))
                        arrive["activation", target, target_phase, mb] = tick + 1
                else:
                    t["b_phase"][tick, r], t["b_micro_batch"][tick, r] = phase, mb
                    if op.kind in ("B", "BW"):
                        route, target, target_phase = _route(schedule, r, op, downstream=False)
                        send_gradient[tick, r] = route
                        if route != NOWHERE:
                            filed.append((tick, target, "gradient", route, target_phase, mb))
                            arrive["gradient", target, target_phase, mb] = tick + 1
    depth = _depth(arrive, release)
    for name in ("f", "b"):
        micro_batches = t[f"{name}_micro_batch"]
        t[f"{name}_slot"] = np.where(micro_batches >= 0, micro_batches % depth, -1).astype(np.int32)
    receive = {"activation": np.zeros(shape + (3, 3), np.int32), "gradient": np.zeros(shape + (3, 3), np.int32)}
    for tick, target, what, route, phase, mb in filed:
        # a result sent to the next rank arrives there from its previous one, and vice versa
        source = {TO_NEXT: TO_PREVIOUS, TO_PREVIOUS: TO_NEXT, TO_SELF: TO_SELF}[route]
        receive[what][tick, target, SOURCES.index(source)] = (1, phase, mb % depth)
    stage_of_phase = np.array([list(p) + [p[0]] * (phases - len(p)) for p in placement], np.int32)
    return TickTables(kind=kind, **t, send_activation=send_activation, send_gradient=send_gradient,
                      receive_activation=receive["activation"], receive_gradient=receive["gradient"],
                      stage_of_phase=stage_of_phase, depth=depth, num_ticks=num_ticks)


def _depth(arrive: dict, release: dict) -> int:
    """The smallest ring depth with which no buffer entry is overwritten before its last use."""
    lives: dict[tuple, list[tuple[int, int, int]]] = {}
    for key, start in arrive.items():
        what, rank, phase, mb = key
        lives.setdefault((what, rank, phase), []).append((mb, start, release.get(key, start)))
    depth = 1
    for entries in lives.values():
        while any(a != b and a[0] % depth == b[0] % depth and a[1] <= b[2] and b[1] <= a[2]
                  for a in entries for b in entries):
            depth += 1
    return depth
