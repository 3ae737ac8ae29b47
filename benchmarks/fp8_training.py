"""FP8 training fidelity: the tiny preset trained with and without FP8 GEMMs, same seed and data.

DeepSeek-V3 reports the FP8 model's loss within 0.25% of BF16's. This trains both for the preset's
steps (or ``--steps``) and reports the final train and validation losses and their relative difference.
Writes ``benchmarks/results/fp8_training.json`` and a PNG of both loss curves.

    python benchmarks/fp8_training.py [--preset tiny] [--steps 500]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from rich.console import Console

from jaxseek.data import load_stdlib_corpus
from jaxseek.presets import get_preset
from jaxseek.train import train

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    console = Console()
    model, train_config = get_preset(args.preset)
    if args.steps:
        train_config = train_config.replace(steps=args.steps, warmup_steps=min(train_config.warmup_steps, args.steps // 10))
    corpus = load_stdlib_corpus()
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in (("reference", model), ("fp8", model.with_fp8())):
            console.print(f"[bold]{name}[/] ({config.compute_dtype} compute, fp8={config.fp8})")
            runs[name] = train(config, train_config, pathlib.Path(scratch) / name, corpus=corpus, console=console)
    final = {name: {"train_loss": run.log.rows[-1]["ce_loss"], "valid_loss": run.valid_loss,
                    "tokens_per_s": run.tokens_per_s} for name, run in runs.items()}
    report = {
        "preset": args.preset, "steps": train_config.steps, "runs": final,
        "train_loss_relative_difference": abs(final["fp8"]["train_loss"] / final["reference"]["train_loss"] - 1),
        "valid_loss_relative_difference": abs(final["fp8"]["valid_loss"] / final["reference"]["valid_loss"] - 1),
    }
    console.print_json(json.dumps(report))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fp8_training.json").write_text(json.dumps(report, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        ax.plot([r["step"] for r in run.log.rows], [r["ce_loss"] for r in run.log.rows], lw=1, label=name)
    ax.set(xlabel="step", ylabel="train next-token loss (nats/byte)",
           title=f"{args.preset}: FP8 vs {model.compute_dtype} (valid diff {report['valid_loss_relative_difference']:.2%})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "fp8_training.png", dpi=110)


if __name__ == "__main__":
    main()
