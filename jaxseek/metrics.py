"""Per-step training metrics: kept in memory, written to parquet (polars) and drawn as a PNG.

polars and matplotlib are imported when writing, so the training step itself imports neither.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

SCALARS = ("loss", "ce_loss", "mtp_loss", "balance_loss", "grad_norm", "learning_rate")


class MetricsLog:
    """Rows of per-step metrics; ``valid_loss`` is set on evaluation steps and null elsewhere."""

    def __init__(self, rows: list[dict[str, Any]] | None = None):
        self.rows = list(rows or [])

    def append(self, step: int, metrics: dict[str, Any], *, step_time_s: float, tokens: int) -> dict[str, Any]:
        """Adds the row for optimizer step ``step`` (1-based) from a step's device metrics."""
        load = np.asarray(metrics["expert_load"])
        balance = np.asarray(metrics["expert_balance"])
        row = {"step": step, **{k: float(metrics[k]) for k in SCALARS},
               "step_time_s": step_time_s, "tokens_per_s": tokens / step_time_s if step_time_s > 0 else 0.0,
               "expert_balance_mean": float(balance.mean()) if balance.size else 1.0,
               "expert_balance": balance.tolist(), "expert_load": load.tolist(),
               "dropped_tokens": int(metrics.get("dropped_tokens", 0)), "valid_loss": None}
        self.rows.append(row)
        return row

    def set_valid_loss(self, valid_loss: float) -> None:
        self.rows[-1]["valid_loss"] = valid_loss

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]

    def write_parquet(self, path: str | pathlib.Path) -> pathlib.Path:
        import polars as pl

        path = pathlib.Path(path)
        optional_floats = {"valid_loss", "eplb_balancedness_before", "eplb_balancedness_after"}
        overrides = {name: pl.Float64 for name in optional_floats if self.rows and name in self.rows[0]}
        if self.rows and "eplb_moved_slots" in self.rows[0]:
            overrides["eplb_moved_slots"] = pl.Int64
        pl.DataFrame(self.rows, schema_overrides=overrides).write_parquet(path)
        return path

    @classmethod
    def read_parquet(cls, path: str | pathlib.Path, *, up_to_step: int | None = None) -> MetricsLog:
        """Reads a log written by ``write_parquet``, keeping rows with ``step <= up_to_step``."""
        import polars as pl

        frame = pl.read_parquet(path)
        if up_to_step is not None:
            frame = frame.filter(pl.col("step") <= up_to_step)
        return cls(frame.to_dicts())


def plot_training(log: MetricsLog, path: str | pathlib.Path, *, unigram_entropy: float | None = None,
                  moe_layer_names: list[str] | None = None, title: str = "") -> pathlib.Path:
    """Loss curves, per-layer expert balance (max/mean load) and the last step's load heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in log.rows])
    fig, (ax_loss, ax_bal, ax_load) = plt.subplots(1, 3, figsize=(17, 4.5))
    ax_loss.plot(steps, [r["ce_loss"] for r in log.rows], label="train next-token CE", lw=1)
    ax_loss.plot(steps, [r["loss"] for r in log.rows], label="train total (CE + MTP + balance)", lw=1, alpha=0.6)
    valid = [(r["step"], r["valid_loss"]) for r in log.rows if r["valid_loss"] is not None]
    if valid:
        ax_loss.plot(*zip(*valid), "o-", label="validation CE")
    if unigram_entropy is not None:
        ax_loss.axhline(unigram_entropy, color="gray", ls="--", label=f"unigram entropy {unigram_entropy:.2f}")
    ax_loss.set(xlabel="step", ylabel="nats / byte", title="loss")
    ax_loss.legend(fontsize=8)
    balance = np.array([r["expert_balance"] for r in log.rows])  # [steps, moe_layers]
    num_layers = balance.shape[1] if balance.ndim == 2 else 0
    names = moe_layer_names or [f"MoE layer {i}" for i in range(num_layers)]
    for layer in range(num_layers):
        ax_bal.plot(steps, balance[:, layer], lw=1, label=names[layer])
    ax_bal.axhline(1.0, color="gray", ls="--")
    ax_bal.set(xlabel="step", ylabel="max / mean tokens per expert", title="expert balance (1 = perfect)")
    ax_bal.legend(fontsize=8)
    load = np.array(log.rows[-1]["expert_load"]) if log.rows else np.zeros((0, 0))
    if load.size:
        image = ax_load.imshow(load, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax_load, label="tokens")
        ax_load.set_yticks(range(num_layers), names)
    ax_load.set(xlabel="expert", title=f"expert load at step {steps[-1] if len(steps) else 0}")
    fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
