"""Training throughput of a preset (default ``tiny``): tokens/s of the jit-compiled train step.

Reports model TFLOP/s from ``jaxseek.model.accounting.flops_per_token`` and its ratio to a dense f32
(CPU) or bf16 (GPU) matmul measured in the same run. Writes ``benchmarks/results/train_<preset>.json``.

    python benchmarks/train_tiny.py [--preset tiny] [--steps 30] [--devices 1]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def measure(preset: str, steps: int, bf16: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from timing import matmul_tflops, median_seconds

    from jaxseek.data import SequenceBatches, load_stdlib_corpus
    from jaxseek.model.accounting import flops_per_token
    from jaxseek.presets import get_preset
    from jaxseek.train_state import init_train_state
    from jaxseek.train_step import make_train_step
    from sharding.mesh import batch_sharding, make_mesh

    mc, tc = get_preset(preset)
    if bf16:
        mc = mc.replace(compute_dtype="bfloat16")
    mesh = make_mesh()
    corpus = load_stdlib_corpus(max_bytes=4_000_000)
    batches = SequenceBatches(corpus.train, batch_size=tc.batch_size, window=tc.seq_len + 1 + mc.mtp_depth, seed=0)
    graphdef, state = init_train_state(mc, tc, mesh)
    step = make_train_step(graphdef, mc, tc, mesh=mesh)
    batch = jax.device_put(batches.batch(0), batch_sharding(mesh))
    holder = {"state": state}

    def one_step(tokens):
        holder["state"], metrics = step(holder["state"], tokens)
        return metrics["loss"]

    seconds = median_seconds(one_step, batch, warmup=3, repeats=steps)
    tokens = tc.batch_size * tc.seq_len
    model_tflops = flops_per_token(mc, tc.seq_len).training * tokens / seconds / 1e12
    on_gpu = jax.devices()[0].platform == "gpu"
    peer = matmul_tflops(8192 if on_gpu else 1024, jnp.bfloat16 if on_gpu else jnp.float32)
    return {"preset": preset, "compute_dtype": mc.compute_dtype, "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__, "batch": f"{tc.batch_size}x{tc.seq_len}", "step_ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds, "model_tflops": model_tflops, "matmul_peer_tflops": peer,
            "fraction_of_matmul_peer": model_tflops / peer, "finite": bool(np.isfinite(float(one_step(batch))))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (data parallel)")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    result = measure(args.preset, args.steps, args.bf16)
    for key, value in result.items():
        print(f"{key:>24}: {value:,.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    out = pathlib.Path(__file__).resolve().parent / "results" / f"train_{args.preset}_{result['platform']}_{result['devices']}dev.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
