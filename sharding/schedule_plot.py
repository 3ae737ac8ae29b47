"""A pipeline schedule drawn like the DualPipe README's figure: one row per rank, simulated time across.

Each slot of ``Schedule.ranks`` is a box from its simulated start to its finish (``dualpipe.simulate``
with the given costs), coloured by what it computes: forward, backward for the input (B), backward for
the weights (W) or a whole backward (BW); an overlapped forward & backward slot is a box split in two,
the forward's colour on the left and the backward's on the right. The micro-batch number is written in
each box. Operations of the second leg (DualPipe's direction 1, which enters at the last rank, or a
DualPipeV rank's return stage 2N-1-r) are drawn lighter and hatched. White space is bubble.
"""

from __future__ import annotations

import math
import pathlib

from sharding.dualpipe import DEFAULT_COSTS, Op, Schedule, Timeline, published_bubble, simulate

# Fill colours of the README's figure: forward orange, backward green, weight gradients blue.
_COLOURS = {"F": "#f5a623", "B": "#2e9e5b", "W": "#5fa8e8", "BW": "#8fd45f"}
_LABELS = {"F": "forward (F)", "B": "backward for input (B)", "W": "backward for weights (W)",
           "BW": "whole backward (B+W)"}


def _check_costs(costs: dict | None) -> dict:
    """The simulator's costs with ``costs`` over ``DEFAULT_COSTS``; ValueError naming ``costs`` on an
    unknown key or a negative, non-finite or inconsistent (W > B) value."""
    merged = {**DEFAULT_COSTS, **(costs or {})}
    unknown = sorted(set(merged) - set(DEFAULT_COSTS))
    if unknown:
        raise ValueError(f"costs: unknown keys {unknown}, expected some of {sorted(DEFAULT_COSTS)}")
    for key, value in merged.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"costs: {key} must be a finite number >= 0, got {value!r}")
    if merged["W"] > merged["B"]:
        raise ValueError(f"costs: W (the weight part of a backward) must be <= B, got W={merged['W']} "
                         f"B={merged['B']}")
    return merged


def _second_leg(op: Op, schedule: Schedule) -> bool:
    """Direction 1 (DualPipe) or a stage past the last rank (DualPipeV's way back)."""
    return op.direction == 1 or op.stage >= schedule.num_ranks


def _lighter(colour: str, amount: float = 0.45) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(c + (1.0 - c) * amount for c in to_rgb(colour))


def _draw_op(ax, op: Op, schedule: Schedule, left: float, width: float, row: int, fontsize: float) -> None:
    from matplotlib.patches import Rectangle

    second = _second_leg(op, schedule)
    colour = _lighter(_COLOURS[op.kind]) if second else _COLOURS[op.kind]
    ax.add_patch(Rectangle((left, row - 0.4), width, 0.8, facecolor=colour, edgecolor="white",
                           hatch="///" if second else None, linewidth=0))  # white hatching
    ax.text(left + width / 2, row, str(op.micro_batch), ha="center", va="center", fontsize=fontsize)


def _legend(ax, schedule: Schedule) -> None:
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.patches import Patch

    kinds = {op.kind for _, _, op in schedule.ops()}
    handles = [Patch(facecolor=_COLOURS[k]) for k in ("F", "B", "W", "BW") if k in kinds]
    labels = [_LABELS[k] for k in ("F", "B", "W", "BW") if k in kinds]
    if any(len(slot) == 2 for slots in schedule.ranks for slot in slots):
        handles.append((Patch(facecolor=_COLOURS["F"]), Patch(facecolor=_COLOURS["BW"])))
        labels.append("overlapped F & B")
    if any(_second_leg(op, schedule) for _, _, op in schedule.ops()):
        handles.append(Patch(facecolor="#b0b0b0", hatch="///", edgecolor="white"))
        labels.append("direction 1 (enters at the last rank)" if schedule.kind == "dualpipe"
                      else f"way back (stages {schedule.num_ranks}..{schedule.num_stages - 1})")
    ax.legend(handles, labels, handler_map={tuple: HandlerTuple(ndivide=None, pad=0)}, loc="upper center",
              bbox_to_anchor=(0.5, -0.5 / len(schedule.ranks) - 0.12), ncol=min(len(handles), 6), fontsize=8,
              frameon=False)


def plot_schedule(schedule: Schedule, path: str | pathlib.Path, costs: dict | None = None) -> Timeline:
    """Writes ``schedule`` as a PNG figure at ``path`` (one row per rank, time from ``simulate`` under
    ``costs``, which override ``dualpipe.DEFAULT_COSTS``) and returns the simulated ``Timeline``."""
    from matplotlib.figure import Figure  # not pyplot: leave the caller's backend (e.g. a notebook's) alone
    from matplotlib.patches import Rectangle

    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a dualpipe.Schedule, got {type(schedule).__name__}")
    costs = _check_costs(costs)
    timeline = simulate(schedule, costs)
    num_ranks, span = len(schedule.ranks), max(timeline.makespan, 1e-9)
    widths = [(timeline.finish[key] - timeline.start[key]) / len(schedule.ranks[key[0]][key[1]])
              for key in timeline.start]
    narrowest = min([w for w in widths if w > 0] or [span])  # the thinnest box (or half box)
    width_in = min(max(6.0, 0.22 * span / narrowest), 26.0)
    fig = Figure(figsize=(width_in, 0.42 * num_ranks + 1.9))
    ax = fig.subplots()
    box_pt = 72.0 * 0.9 * width_in * narrowest / span  # the thinnest box's width in points, roughly
    fontsize = min(8.0, max(3.0, 0.45 * box_pt))
    for r, slots in enumerate(schedule.ranks):
        for i, slot in enumerate(slots):
            left, width = timeline.start[r, i], timeline.finish[r, i] - timeline.start[r, i]
            parts = [(op, left + k * width / len(slot), width / len(slot)) for k, op in enumerate(slot)]
            for op, part_left, part_width in parts:
                _draw_op(ax, op, schedule, part_left, part_width, r, fontsize)
            ax.add_patch(Rectangle((left, r - 0.4), width, 0.8, facecolor="none", edgecolor="black",
                                   linewidth=0.8 if len(slot) == 2 else 0.3))
    ax.set_xlim(0, span)
    ax.set_ylim(num_ranks - 0.5, -0.5)
    ax.set_yticks(range(num_ranks), [f"rank {r}" for r in range(num_ranks)], fontsize=8)
    ax.set_xlabel("time (units of the costs)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    shown = ", ".join(f"{k}={v:g}" for k, v in costs.items())
    ax.set_title(f"{schedule.kind}: {num_ranks} ranks, {schedule.num_stages} stages, {schedule.num_chunks} "
                 f"micro-batches; bubble {max(timeline.bubble):g} (published "
                 f"{published_bubble(schedule.kind, schedule.num_stages, costs):g}); {shown}", fontsize=9)
    _legend(ax, schedule)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return timeline
