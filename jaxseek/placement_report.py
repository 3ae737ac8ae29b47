"""``jaxseek eplb``: a placement computed from recorded expert loads, written as parquet, JSON and a
heat map of load per GPU before (one replica per expert, experts in order) and after EPLB."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from sharding.eplb import Placement, balancedness, rebalance_experts


def read_loads(path: str | pathlib.Path, *, last_steps: int | None = None) -> np.ndarray:
    """[layers, experts] loads from a parquet file: a ``jaxseek train`` metrics file (its
    ``expert_load`` column, averaged over the last ``last_steps`` steps) or columns layer, expert, load."""
    import polars as pl

    frame = pl.read_parquet(path)
    if "expert_load" in frame.columns:
        rows = frame["expert_load"].to_list()[-(last_steps or len(frame)):]
        return np.asarray(rows, np.float64).mean(0)
    if {"layer", "expert", "load"} <= set(frame.columns):
        layers, experts = frame["layer"].max() + 1, frame["expert"].max() + 1
        loads = np.zeros((layers, experts))
        loads[frame["layer"].to_numpy(), frame["expert"].to_numpy()] = frame["load"].to_numpy()
        return loads
    raise ValueError(f"loads: {path} has neither an expert_load column nor layer/expert/load columns")


def plain_gpu_loads(weight: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L, gpus] loads with one replica per expert, experts e on GPU e // (E / gpus) (needs gpus | E)."""
    return weight.reshape(weight.shape[0], num_gpus, -1).sum(-1)


def write_report(weight: np.ndarray, placement: Placement, out_dir: str | pathlib.Path) -> dict:
    """Writes placement.parquet (layer, slot, gpu, expert, replicas), placement.json and gpu_load.png."""
    import polars as pl

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, slots = placement.phy2log.shape
    gpu = placement.gpu_of_slot()
    pl.DataFrame({
        "layer": np.repeat(np.arange(layers), slots),
        "slot": np.tile(np.arange(slots), layers),
        "gpu": np.tile(gpu, layers),
        "expert": placement.phy2log.reshape(-1),
        "replicas": np.take_along_axis(placement.logcnt, placement.phy2log, 1).reshape(-1),
    }).write_parquet(out_dir / "placement.parquet")
    num_gpus = placement.num_gpus
    before = (balancedness(plain_gpu_loads(weight, num_gpus)) if weight.shape[1] % num_gpus == 0
              else np.full(layers, np.nan))
    summary = {"layers": layers, "experts": weight.shape[1], "replicas": slots, "gpus": num_gpus,
               "balancedness_before_mean": float(np.nanmean(before)) if np.isfinite(before).any() else None,
               "balancedness_after_mean": float(placement.balancedness.mean()),
               "balancedness_after": placement.balancedness.tolist(), "phy2log": placement.phy2log.tolist()}
    (out_dir / "placement.json").write_text(json.dumps(summary, indent=2))
    _plot(weight, placement, before, out_dir / "gpu_load.png")
    return summary


def _plot(weight, placement: Placement, before: np.ndarray, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_gpus = placement.num_gpus
    panels = [("after EPLB", placement.gpu_load, placement.balancedness)]
    if np.isfinite(before).all():
        panels.insert(0, ("one replica per expert, in order", plain_gpu_loads(weight, num_gpus), before))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.3 * weight.shape[0] + 2.5), squeeze=False)
    for ax, (title, loads, ratio) in zip(axes[0], panels):
        relative = loads / np.maximum(loads.mean(1, keepdims=True), 1e-12)  # 1 = the layer's mean GPU load
        image = ax.imshow(relative, aspect="auto", cmap="coolwarm", vmin=0.5, vmax=1.5, interpolation="nearest")
        ax.set(title=f"{title}\nmean balancedness {ratio.mean():.3f} (mean / max GPU load)", xlabel="GPU",
               ylabel="MoE layer")
        ax.set_xticks(range(num_gpus))
        ax.set_yticks(range(loads.shape[0]))
        fig.colorbar(image, ax=ax, label="GPU load / layer mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def placement_from_file(path, *, replicas: int, groups: int, nodes: int, gpus: int, out_dir,
                        last_steps: int | None = None) -> dict:
    weight = read_loads(path, last_steps=last_steps)
    return write_report(weight, rebalance_experts(weight, replicas, groups, nodes, gpus), out_dir)
