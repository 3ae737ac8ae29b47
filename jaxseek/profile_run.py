"""``jaxseek profile``: a ``jax.profiler`` trace of a few training / prefill / decode steps, and its analysis.

    jaxseek profile train --preset tiny --steps 2 --out prof/          # also --ep, --pp, --dp, --rules
    jaxseek profile prefill --preset tiny --batch-size 2 --seq-len 64 --out prof/
    jaxseek profile decode --preset tiny --ep 4 --out prof/
    jaxseek profile analyze prof/train.p0.trace.json.gz --json a.json --png step.png

A capture compiles the step, runs ``--warmup`` steps untraced, then traces ``--steps`` steps, each under a
``jax.profiler.StepTraceAnnotation`` (the analyzer's step windows). The model runs on random weights and
random tokens (no data, no checkpoint). Under ``--out`` each process ``i`` writes:

* ``xplane/p<i>/plugins/profile/<time>/``: jax's own files (``*.xplane.pb`` for XProf / TensorBoard,
  ``perfetto_trace.json.gz``), in a directory of its own so processes on one host never collide;
* ``<mode>.p<i>.trace.json.gz``: that Perfetto trace (Chrome JSON: ui.perfetto.dev, chrome://tracing);
* ``<mode>.p<i>.scopes.json``: ``{hlo_module: {hlo_op: op_name}}`` from the compiled step, the named
  scopes of every op (CPU traces carry none; the analyzer reads this file beside the trace).

The model's scopes (``attention``, ``moe`` / ``mlp``, ``gate``, ``shared_experts``, ``dispatch``, ``experts``,
``combine``; ``pipeline_forward`` / ``_backward`` / ``_weight_grad`` = F / B / W of a chunk with ``--pp``) are
listed in ``jaxseek.trace_analysis.TRACKED_SCOPES``.
"""

from __future__ import annotations

import json
import pathlib
import shutil

MODES = ("train", "prefill", "decode")


def register(subparsers) -> None:
    """Adds ``profile`` (``train`` | ``prefill`` | ``decode`` | ``analyze``) to ``jaxseek``'s subcommands."""
    from jaxseek.cli import _add_mesh_arguments
    from jaxseek.presets import PRESET_BUILDERS

    p = subparsers.add_parser("profile", help="trace a few train / prefill / decode steps (Perfetto + xplane), "
                                              "or analyze a trace: scope times and communication overlap")
    modes = p.add_subparsers(dest="profile_command", required=True)
    for mode in MODES:
        m = modes.add_parser(mode, help=f"trace {mode} steps of a preset on random weights and tokens")
        m.add_argument("--preset", default="tiny", choices=sorted(PRESET_BUILDERS))
        m.add_argument("--steps", type=int, default=3, help="traced steps (after the warm-up)")
        m.add_argument("--warmup", type=int, default=1, help="untraced steps first (compilation is separate)")
        m.add_argument("--out", default="profile", help="directory for the traces")
        m.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's; decode: 8)")
        m.add_argument("--seq-len", type=int, help="tokens per sequence (prefill: the prompt; decode: the "
                                                   "context; default: the preset's)")
        m.add_argument("--layers", type=int, help="total transformer layers (default: the preset's)")
        m.add_argument("--seed", type=int, default=0)
        _add_mesh_arguments(m, default_rules="dp")
        m.add_argument("--coordinator", metavar="HOST:PORT", help="several processes, as `jaxseek train`")
        m.add_argument("--num-processes", type=int)
        m.add_argument("--process-id", type=int)
        m.add_argument("--local-devices", type=int, help="fake CPU devices for this process (CPU only)")
    a = modes.add_parser("analyze", help="per-scope time and computation/communication overlap of a trace")
    a.add_argument("trace", help="a Chrome/Perfetto trace (.json or .json.gz); NAME.scopes.json beside it is used")
    a.add_argument("--json", help="write the analysis here")
    a.add_argument("--png", help="draw one step's timeline here")
    a.add_argument("--step", type=int, default=0, help="which traced step to draw")
    p.set_defaults(handler=run)


def run(args, console) -> int:
    """The ``profile`` handler: a capture (then its analysis, printed) or ``analyze``."""
    from jaxseek import trace_analysis

    if args.profile_command == "analyze":
        result = trace_analysis.analyze(args.trace)
        trace_analysis.print_report(result, console)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
            console.print(f"wrote {args.json}")
        if args.png:
            trace_analysis.plot_step(args.trace, args.png, step=args.step)
            console.print(f"wrote {args.png}")
        return 0
    from jaxseek.distributed import initialize

    processes = initialize(args.coordinator, args.num_processes, args.process_id, args.local_devices)
    trace = capture(args.profile_command, args)
    if processes.is_main:
        trace_analysis.print_report(trace_analysis.analyze(trace), console)
        console.print(f"wrote {trace} (open in ui.perfetto.dev) and the xplane under "
                      f"{pathlib.Path(args.out) / 'xplane'}; `jaxseek profile analyze {trace} --png step.png`")
    return 0


def _configs(args):
    from jaxseek.presets import get_preset

    mc, tc = get_preset(args.preset)
    overrides = {name: getattr(args, name) for name in ("batch_size", "seq_len") if getattr(args, name) is not None}
    tc = tc.replace(seed=args.seed, **overrides)
    if args.layers is not None:
        mc = mc.replace(num_layers=args.layers)
    return mc, tc


def capture(mode: str, args, mesh=None) -> pathlib.Path:
    """Compiles ``mode``'s step, warms up, traces ``args.steps`` steps; returns this process's trace path.
    ``mesh`` (default: ``make_mesh`` of ``args.dp``, ``args.ep``, ``args.pp``) may be given to trace a subset
    of the devices."""
    import jax

    from sharding.mesh import make_mesh

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode != "train" and args.pp > 1:
        raise ValueError("pp: pipeline parallelism is a training schedule; prefill and decode take --ep only")
    mc, tc = _configs(args)
    mesh = mesh if mesh is not None else make_mesh(dp=args.dp, ep=args.ep, pp=args.pp)
    step, hlo_text = (_train_step if mode == "train" else _serving_step)(mode, mc, tc, mesh, args)
    out = pathlib.Path(args.out)
    index = jax.process_index()
    name = f"{mode}.p{index}"
    out.mkdir(parents=True, exist_ok=True)
    from jaxseek.trace_analysis import hlo_scope_map

    (out / f"{name}.scopes.json").write_text(json.dumps(hlo_scope_map(name, hlo_text)))
    for _ in range(args.warmup):
        jax.block_until_ready(step())
    log_dir = out / "xplane" / f"p{index}"
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        for i in range(args.steps):
            with jax.profiler.StepTraceAnnotation(mode, step_num=i):
                jax.block_until_ready(step())
    written = sorted(log_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not written:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {log_dir}")
    trace = out / f"{name}.trace.json.gz"
    shutil.copyfile(written[-1], trace)
    return trace


def _train_step(mode, mc, tc, mesh, args):
    """A closure running one optimizer step on a fixed random batch (state carried), and its HLO text."""
    import numpy as np

    from jaxseek.train import place_batch
    from jaxseek.train_state import init_train_state
    from jaxseek.train_step import make_train_step
    from sharding.mesh import batch_sharding

    graphdef, state = init_train_state(mc, tc, mesh, args.rules)
    tokens = np.random.default_rng(tc.seed).integers(0, mc.vocab_size, (tc.batch_size, tc.seq_len + 1 + mc.mtp_depth),
                                                     dtype=np.int32)
    batch = place_batch(tokens, batch_sharding(mesh))
    compiled = make_train_step(graphdef, mc, tc, mesh=mesh, rules=args.rules).lower(state, batch).compile()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    return step, compiled.as_text()


def _serving_step(mode, mc, tc, mesh, args):
    """A closure running one paged forward: the whole prompts (prefill) or one new token per sequence
    after a cached context (decode), rewriting the same cache rows each time; and its HLO text."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxseek.decode import paged_forward_jit
    from jaxseek.generate import Generator
    from jaxseek.kv_cache import BLOCK_SIZE
    from jaxseek.model.transformer import Transformer

    batch = args.batch_size or (tc.batch_size if mode == "prefill" else 8)
    context = tc.seq_len
    model = Transformer(mc, rngs=nnx.Rngs(tc.seed))
    generator = Generator(model, num_blocks=batch * (-(-(context + 1) // BLOCK_SIZE)) + 1,
                          max_blocks_per_seq=-(-(context + 1) // BLOCK_SIZE), mesh=mesh if args.ep > 1 else None)
    seq_ids = list(range(batch))
    for seq_id in seq_ids:
        generator.allocator.reserve(seq_id, context + 1)
    rng = np.random.default_rng(tc.seed)
    table = jnp.asarray(generator.allocator.block_table(seq_ids))
    if mode == "prefill":
        tokens = jnp.asarray(rng.integers(0, mc.vocab_size, (batch, context), dtype=np.int32))
        start, new = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), context, jnp.int32)
    else:
        tokens = jnp.asarray(rng.integers(0, mc.vocab_size, (batch, 1), dtype=np.int32))
        start, new = jnp.full((batch,), context, jnp.int32), jnp.ones((batch,), jnp.int32)
    compiled = paged_forward_jit.lower(generator.graphdef, generator.state, tokens, start, new, generator.pages, table,
                                       implementation=None, mesh=generator.mesh).compile()

    def step():
        logits, generator.pages = compiled(generator.state, tokens, start, new, generator.pages, table)
        return logits

    return step, compiled.as_text()
