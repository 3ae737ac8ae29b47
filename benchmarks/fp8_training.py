"""FP8 training fidelity, with an ablation of where the loss gap comes from.

Trains the same model, seed and data four ways: the compute dtype alone (the reference), then FP8 in the
forward GEMMs only, forward + dgrad, forward + dgrad + wgrad (DeepSeek-V3's recipe: every linear and expert
GEMM in FP8, the embedding, output head, router, norms and attention core kept in the compute dtype);
``--runs`` can add wgrad alone, and ``float32`` (no FP8, float32 compute: the loss change a mere change of
precision makes, the yardstick for the FP8 gaps). Reports each run's final train and validation losses and
their relative difference from the reference (DeepSeek-V3: < 0.25% against BF16). Writes
``benchmarks/results/fp8_training_<preset>[_<tag>].json`` and a PNG: the loss curves and each run's smoothed
relative difference from the reference.

    python benchmarks/fp8_training.py [--preset small] [--steps 300] [--batch-size 8] [--seq-len 128]
        [--compute-dtype bfloat16] [--runs reference,forward,...] [--tag NAME]

On a 2-core CPU the ``small`` preset (hidden 256, so 1x128 groups and 128x128 blocks no longer cover whole
rows and matrices as they do at the tiny preset's hidden 64) takes ~2 min per 100 steps at batch 8 x 128.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np
from rich.console import Console

REPO = pathlib.Path(__file__).resolve().parents[1]
# ``python benchmarks/fp8_training.py`` puts benchmarks/ first on sys.path: this checkout's root goes there
# instead, so its packages (not an installed copy's) are the ones trained.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))

from jaxseek.data import load_stdlib_corpus  # noqa: E402
from jaxseek.presets import get_preset  # noqa: E402
from jaxseek.train import train  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# run name -> the GEMMs in FP8 (None: none). "float32" trains without FP8 in float32 compute: how far a mere
# change of precision moves this model's loss, the yardstick for the FP8 gaps.
RUNS = {"reference": None, "forward": "forward", "forward+dgrad": "forward,dgrad",
        "forward+dgrad+wgrad": "forward,dgrad,wgrad", "wgrad": "wgrad", "float32": None}


def smoothed_relative_difference(losses: np.ndarray, reference: np.ndarray, window: int) -> np.ndarray:
    """[steps] loss / reference - 1 after a trailing moving average of both over ``window`` steps."""
    kernel = np.ones(window) / window
    ours, ref = np.convolve(losses, kernel, "valid"), np.convolve(reference, kernel, "valid")
    return ours / ref - 1


def _losses(run) -> np.ndarray:
    """[steps] the run's per-step train next-token loss."""
    return np.array([row["ce_loss"] for row in run.log.rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--runs", default="reference,forward,forward+dgrad,forward+dgrad+wgrad",
                        help=f"comma-separated, reference first, from {list(RUNS)}")
    parser.add_argument("--tag", help="suffix of the result files' names")
    args = parser.parse_args()
    console = Console()
    names = [name for name in args.runs.split(",") if name]
    if names[0] != "reference" or any(name not in RUNS for name in names):
        parser.error(f"--runs: 'reference' first, then names from {list(RUNS)}; got {args.runs!r}")
    model, train_config = get_preset(args.preset)
    model = model.replace(compute_dtype=args.compute_dtype)
    changes = {key: value for key, value in (("steps", args.steps), ("batch_size", args.batch_size),
                                             ("seq_len", args.seq_len)) if value}
    steps = changes.get("steps", train_config.steps)
    train_config = train_config.replace(**changes, warmup_steps=min(train_config.warmup_steps, steps // 10),
                                        eval_every=steps, checkpoint_every=steps)
    corpus = load_stdlib_corpus()
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            config = model if RUNS[name] is None else model.with_fp8(RUNS[name])
            if name == "float32":
                config = config.replace(compute_dtype="float32")
            console.print(f"[bold]{name}[/] ({config.compute_dtype} compute, fp8 GEMMs: {RUNS[name] or 'none'})")
            runs[name] = train(config, train_config, pathlib.Path(scratch) / name, corpus=corpus, console=console)
    reference = runs["reference"]
    final = {}
    for name, run in runs.items():
        final[name] = {"fp8_gemms": RUNS[name], "train_loss": run.log.rows[-1]["ce_loss"],
                       "valid_loss": run.valid_loss, "tokens_per_s": run.tokens_per_s}
        if name != "reference":
            final[name]["train_loss_relative_difference"] = final[name]["train_loss"] / final["reference"]["train_loss"] - 1
            final[name]["valid_loss_relative_difference"] = run.valid_loss / reference.valid_loss - 1
            # one batch's loss is noisy: the mean per-step gap over the second half of training is steadier
            gaps = _losses(run) / _losses(reference) - 1
            final[name]["train_gap_second_half_mean"] = float(gaps[gaps.size // 2:].mean())
        final[name]["train_losses"] = [round(float(x), 5) for x in _losses(run)]
    report = {"preset": args.preset, "hidden_size": model.hidden_size, "compute_dtype": args.compute_dtype,
              "steps": train_config.steps, "batch": f"{train_config.batch_size}x{train_config.seq_len}", "runs": final}
    console.print_json(json.dumps({**report, "runs": {name: {k: v for k, v in row.items() if k != "train_losses"}
                                                           for name, row in final.items()}}))
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (f"fp8_training_{args.preset}" + (f"_{args.tag}" if args.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (curves, gaps) = plt.subplots(1, 2, figsize=(12, 4))
    window = max(train_config.steps // 20, 1)
    ref_losses = _losses(reference)
    for name, run in runs.items():
        losses = _losses(run)
        curves.plot([r["step"] for r in run.log.rows], losses, lw=1, label=name)
        if name != "reference":
            gap = smoothed_relative_difference(losses, ref_losses, window) * 100
            gaps.plot(np.arange(gap.size) + window, gap, lw=1, label=name)
    curves.set(xlabel="step", ylabel="train next-token loss (nats/byte)",
               title=f"{args.preset} (hidden {model.hidden_size}), {args.compute_dtype} reference")
    gaps.axhline(0.25, color="grey", ls="--", lw=0.8, label="DeepSeek-V3's 0.25%")
    gaps.axhline(-0.25, color="grey", ls="--", lw=0.8)
    gaps.set(xlabel="step", ylabel=f"loss vs reference, % ({window}-step average)", title="where the FP8 gap comes from")
    curves.legend()
    gaps.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
