"""``jaxseek`` command line: ``train`` (the main job), ``generate`` (text from a trained run), ``eplb``
(expert placement from recorded loads), ``schedule`` (a pipeline schedule drawn and accounted) and
``info`` (sizes and FLOPs of a preset)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from rich.console import Console
from rich.table import Table

from jaxseek import prepare_data, profile_run
from jaxseek.presets import PRESET_BUILDERS, get_preset


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a preset on the standard library's source bytes (no network)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESET_BUILDERS))
    p.add_argument("--steps", type=int, help="total optimizer steps (default: the preset's)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--storage", metavar="URL",
                   help="where checkpoints and training records live: 3fs+embedded:///DIR, 3fs+tcp:///DIR, "
                        "3fs:///MOUNT/PATH or a directory (default: an embedded 3FS in OUT/3fs; a multi-process run: OUT)")
    p.add_argument("--stop-after", type=int, help="stop after this many total steps, as if preempted")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--bf16", action="store_true", help="bf16 compute with fp32 master parameters")
    p.add_argument("--fp8", nargs="?", const="forward,dgrad,wgrad", metavar="GEMMS",
                   help="DeepSeek-V3 FP8 GEMMs (1x128 / 128x128 scaling) in every linear layer and expert; GEMMS "
                        "(default forward,dgrad,wgrad) keeps the others in the compute dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eplb-replicas", type=int, help="EPLB: physical expert slots per MoE layer (redundant replicas)")
    p.add_argument("--eplb-gpus", type=int, default=1, help="EPLB: expert-parallel ranks the slots are placed on")
    p.add_argument("--eplb-every", type=int, default=50, help="EPLB: rebalance every N steps")
    _add_mesh_arguments(p, default_rules="dp")
    p.add_argument("--schedule", help="pipeline schedule with --pp > 1: 1f1b, zb1p, dualpipe or dualpipev "
                                      "(default: the run's, 1f1b)")
    p.add_argument("--micro-batches", type=int, help="micro-batches per step with --pp > 1 (default 2 x pp)")
    p.add_argument("--layers", type=int, help="total transformer layers (default: the preset's); the MoE layers "
                                              "must split evenly into the schedule's stages")
    p.add_argument("--remat", choices=("none", "block", "attention"),
                   help="recompute activations in backward: whole blocks, or attention only (default: the preset's)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="several processes (jax.distributed): process 0's address and a free port, the same on every "
                        "process; 'auto' lets jax detect a SLURM / Open MPI / TPU cluster (env JAXSEEK_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="processes in the run (env JAXSEEK_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="this process, 0 .. num-processes - 1 (env JAXSEEK_PROCESS_ID)")
    p.add_argument("--local-devices", type=int,
                   help="fake CPU devices for this process (CPU only; env JAXSEEK_LOCAL_DEVICES)")


def _add_mesh_arguments(p, *, default_rules: str) -> None:
    from sharding.rules import RULE_SETS
    p.add_argument("--ep", type=int, default=1, help="expert-parallel mesh axis size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel mesh axis size (ranks of the schedule); "
                                                     "layer stacks are split over it")
    p.add_argument("--dp", type=int, default=None, help="data-parallel mesh axis size (default: the devices left)")
    p.add_argument("--rules", choices=sorted(RULE_SETS), default=default_rules,
                   help="how parameters and optimizer moments are laid out over the mesh (sharding/rules.py)")


def _train(args, console: Console) -> int:
    import pathlib

    from jaxseek.distributed import initialize

    # Before anything asks jax for devices: fake CPU devices and jax.distributed are set up at backend start.
    processes = initialize(args.coordinator, args.num_processes, args.process_id, args.local_devices)
    if not processes.is_main:  # every process computes; process 0 alone reports
        console = Console(quiet=True)

    from jaxseek.checkpoint import CONFIG_FILE, load_configs
    from jaxseek.train import train

    out = args.out or f"runs/{args.preset}"
    # A run directory carries its configs: resuming takes them from there (e.g. a `jaxseek convert` run).
    resuming_a_run = args.resume and (pathlib.Path(out) / CONFIG_FILE).exists()
    mc, tc = load_configs(out) if resuming_a_run else get_preset(args.preset)
    overrides = {name: getattr(args, name) for name in
                 ("steps", "batch_size", "seq_len", "learning_rate", "checkpoint_every", "eval_every", "seed")
                 if getattr(args, name) is not None}
    if "steps" in overrides:
        overrides.setdefault("warmup_steps", min(tc.warmup_steps, max(overrides["steps"] // 10, 0)))
    tc = tc.replace(**overrides)
    if args.schedule is not None or args.micro_batches is not None:
        tc = tc.replace(pipeline=dataclasses.replace(
            tc.pipeline, **{name: value for name, value in (("schedule", args.schedule),
                                                            ("micro_batches", args.micro_batches)) if value is not None}))
    if args.layers is not None:
        mc = mc.replace(num_layers=args.layers)
    if args.bf16:
        mc = mc.replace(compute_dtype="bfloat16")
    if args.remat:
        mc = mc.replace(remat=args.remat)
    if args.fp8:
        mc = mc.with_fp8(args.fp8)
    if args.eplb_replicas:
        mc = mc.replace(moe=dataclasses.replace(mc.moe, num_physical_experts=args.eplb_replicas,
                                                eplb_gpus=args.eplb_gpus))
        tc = tc.replace(eplb=dataclasses.replace(tc.eplb, every=args.eplb_every))
    import jax

    from sharding.mesh import make_mesh

    mesh = make_mesh(dp=args.dp, ep=args.ep, pp=args.pp)
    pipeline = (f" pp={args.pp} schedule={tc.pipeline.schedule} micro_batches={tc.pipeline.chunks(args.pp)}"
                if args.pp > 1 else "")
    console.print(f"[bold]jaxseek train[/] {'run config' if resuming_a_run else 'preset=' + args.preset} fp8={mc.fp8} steps={tc.steps} batch={tc.batch_size}x{tc.seq_len} "
                  f"devices={jax.device_count()} ({jax.devices()[0].platform}) mesh dp={mesh.shape['dp']} "
                  f"ep={mesh.shape['ep']}{pipeline} rules={args.rules} out={out}"
                  + (f" processes={processes.process_count}" if processes.process_count > 1 else ""))
    result = train(mc, tc, out, resume=args.resume, stop_after=args.stop_after, mesh=mesh, rules=args.rules,
                   console=console, show_progress=not args.no_progress and processes.is_main, storage=args.storage)
    table = Table(title="run summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    last = result.log.rows[-1]
    table.add_row("steps", str(last["step"]))
    table.add_row("train next-token loss (nats/byte)", f"{last['ce_loss']:.3f}")
    table.add_row("validation loss (nats/byte)", f"{result.valid_loss:.3f}")
    table.add_row("unigram entropy of the bytes", f"{result.unigram_entropy:.3f}")
    table.add_row("tokens/s (median step, compilation excluded)", f"{result.tokens_per_s:,.0f}")
    table.add_row("train step compilation (s)", f"{result.compile_s:.1f}")
    table.add_row("expert balance max/mean (last step)", f"{last['expert_balance_mean']:.2f}")
    rebalances = [r for r in result.log.rows if r.get("eplb_moved_slots") is not None]
    if rebalances:
        r = rebalances[-1]
        table.add_row(f"EPLB GPU balancedness at step {r['step']} (mean/max)",
                      f"{r['eplb_balancedness_before']:.3f} -> {r['eplb_balancedness_after']:.3f}")
    console.print(table)
    from jaxseek.run_storage import recorded_storage_url

    console.print(f"wrote {result.out_dir}/metrics.parquet, {result.out_dir}/training.png; checkpoints and "
                  f"training records in {recorded_storage_url(result.out_dir) or result.out_dir}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with a trained run's latest checkpoint (paged MLA decode)")
    p.add_argument("--checkpoint", required=True, help="a `jaxseek train --out` directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mla-implementation", choices=("xla", "mosaic_gpu", "interpret"), default=None,
                   help="MLA decoding: xla (default), the Mosaic GPU kernel (Hopper, bf16 models), or that "
                        "kernel in the CPU interpreter (slow)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks: experts split over them, DeepEP's normal mode in prefill and its "
                        "low-latency mode in decode (the other devices form dp)")
    p.add_argument("--kv-cache", choices=("model", "fp8"), default="model",
                   help="cache rows in the model's dtype (default) or FlashMLA's FP8 format (656 bytes a token "
                        "for DeepSeek-V3; needs kv_lora_rank %% 128 == 0)")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--kv-store", metavar="URL",
                       help="keep prompts' KV-cache pages at this storage URL (3fs+embedded:///..., 3fs+tcp:///..., "
                            "a 3FS mount or a directory) so a later run skips their prefill (default: the run's "
                            "storage, under kvcache/)")
    store.add_argument("--no-kv-store", action="store_true", help="keep prefixes in memory only (this process)")
    p.add_argument("--kv-store-capacity", type=_byte_size, default=4 << 30, metavar="SIZE",
                   help="bound on the KV store's size, LRU eviction beyond it (bytes, or with K/M/G; default 4G)")


def _byte_size(text: str) -> int:
    """'4096', '512M', '4G' -> bytes (argparse type)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4096, 512M or 4G, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def _open_kv_location(args):
    """Where ``generate`` keeps KV-cache pages: None (in memory) with --no-kv-store, else the location of
    --kv-store or the run's storage's ``kvcache/`` (opened before the model loads: a bad URL fails at once)."""
    if args.no_kv_store:
        return None
    from jaxseek.run_storage import open_run_storage
    from storage.location import open_location

    if args.kv_store is not None:
        return open_location(args.kv_store, create=True)
    return open_run_storage(args.checkpoint).child("kvcache")


def _generate(args, console: Console) -> int:
    from jaxseek.generate import SamplingConfig, cache_fingerprint, load_model
    from storage.kvcache import ThreeFSPrefixStore

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    location = _open_kv_location(args)
    try:
        model = load_model(args.checkpoint)
        store = None if location is None else ThreeFSPrefixStore(
            location, capacity_bytes=args.kv_store_capacity, fingerprint=cache_fingerprint(model, args.kv_cache))
        return _run_generation(args, console, model, store, sampling)
    finally:
        if location is not None:
            location.close()


def _run_generation(args, console: Console, model, store, sampling) -> int:
    import codecs
    import time

    from jaxseek.generate import Generator
    from sharding.mesh import make_mesh

    generator = Generator(model, max_blocks_per_seq=-(-(max(len(p.encode()) for p in args.prompt)
                                                        + sampling.max_new_tokens) // 64),
                          implementation=args.mla_implementation, kv_cache=args.kv_cache,
                          mesh=make_mesh(ep=args.ep) if args.ep > 1 else None, prefix_store=store)
    prompts = [list(p.encode()) for p in args.prompt]
    stream = len(prompts) == 1
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if stream:
        console.print(args.prompt[0], end="", style="bold", highlight=False)

    def on_tokens(tokens):
        if stream:
            console.print(decoder.decode(bytes([int(tokens[0])])), end="", highlight=False, markup=False)
            console.file.flush()

    start = time.perf_counter()
    outputs = generator.generate(prompts, sampling, on_tokens=on_tokens)
    elapsed = time.perf_counter() - start
    if stream:
        console.print(decoder.decode(b"", final=True), highlight=False, markup=False)
    else:
        for prompt, output in zip(args.prompt, outputs):
            console.print(f"[bold]{prompt}[/]" + bytes(output).decode("utf-8", errors="replace"), highlight=False)
    total = sum(len(o) for o in outputs)
    console.print(f"[dim]{total} tokens in {elapsed:.2f} s ({total / elapsed:,.1f} tokens/s, "
                  f"prefill and compilation included)[/]")
    where = "in memory" if store is None else f"from the KV store at {store.location.url}"
    console.print(f"[dim]prefill: {generator.prefill_tokens_computed} tokens computed, "
                  f"{generator.prefill_tokens_reused} reused {where}[/]", highlight=False, soft_wrap=True)
    return 0


def _add_eplb(sub) -> None:
    p = sub.add_parser("eplb", help="an expert placement (EPLB) from recorded loads, with a GPU-load heat map")
    p.add_argument("--loads", required=True,
                   help="parquet: a run's metrics.parquet, or columns layer, expert, load")
    p.add_argument("--replicas", type=int, required=True, help="physical experts per layer")
    p.add_argument("--groups", type=int, default=1, help="expert groups (hierarchical policy if nodes divide it)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--last-steps", type=int, help="average only the last N steps of a metrics file")
    p.add_argument("--out", default="eplb", help="directory for placement.parquet, placement.json, gpu_load.png")


def _eplb(args, console: Console) -> int:
    from jaxseek.placement_report import placement_from_file

    summary = placement_from_file(args.loads, replicas=args.replicas, groups=args.groups, nodes=args.nodes,
                                  gpus=args.gpus, out_dir=args.out, last_steps=args.last_steps)
    before = summary["balancedness_before_mean"]
    console.print(f"{summary['layers']} layers x {summary['experts']} experts -> {summary['replicas']} slots on "
                  f"{summary['gpus']} GPUs; balancedness (mean / max GPU load) "
                  f"{'n/a' if before is None else f'{before:.3f}'} -> {summary['balancedness_after_mean']:.3f}")
    console.print(f"wrote {args.out}/placement.parquet, {args.out}/placement.json, {args.out}/gpu_load.png")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face DeepSeek-V3 checkpoints <-> jaxseek run directories")
    p.add_argument("--hf", help="a HF checkpoint directory (config.json + safetensors, FP8 or not) to import")
    p.add_argument("--out", help="the run directory to create from --hf (for `generate` and `train --resume`)")
    p.add_argument("--storage", metavar="URL", help="where --out keeps its checkpoint (as `train --storage`; "
                                                     "default: an embedded 3FS in OUT/3fs)")
    p.add_argument("--run", help="a jaxseek run directory to export")
    p.add_argument("--hf-out", help="where to write --run's latest checkpoint in the HF layout (bf16)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), help="compute dtype of the imported model "
                   "(default: the checkpoint's torch_dtype)")


def _convert(args, console: Console) -> int:
    from jaxseek.convert import load_hf, save_hf, save_run
    from jaxseek.generate import load_model

    if bool(args.hf) == bool(args.run) or (args.hf and not args.out) or (args.run and not args.hf_out):
        raise ValueError("convert: give --hf DIR --out RUN_DIR (import) or --run RUN_DIR --hf-out DIR (export)")
    if args.hf:
        model = load_hf(args.hf, compute_dtype=args.compute_dtype)
        save_run(model, args.out, storage=args.storage)
        console.print(f"wrote {args.out}: {model.config.num_layers} layers, step 0 (`jaxseek generate --checkpoint "
                      f"{args.out}` or `jaxseek train --resume --out {args.out}`)")
    else:
        save_hf(load_model(args.run), args.hf_out)
        console.print(f"wrote {args.hf_out} (config.json, safetensors shards, index)")
    return 0


def _add_schedule(sub) -> None:
    from sharding.dualpipe import KINDS

    p = sub.add_parser("schedule", help="a pipeline schedule (1F1B, ZB1P, DualPipe, DualPipeV) drawn as a figure, "
                                        "with its bubble and memory against the DualPipe README's table")
    p.add_argument("--kind", default="dualpipe", help=f"one of {', '.join(KINDS)}")
    p.add_argument("--ranks", type=int, default=8, help="pipeline ranks (DualPipeV: 2 stages per rank)")
    p.add_argument("--chunks", type=int, default=20, help="micro-batches (DualPipe: both directions together)")
    p.add_argument("--costs", default=None, metavar="F=1,B=2,W=1,F&B=3",
                   help="time of a forward, a whole backward, its weight part and an overlapped F&B "
                        "(default: the README's setting F=1,B=2,W=1,F&B=3)")
    p.add_argument("--out", default="schedule.png", help="the PNG figure to write")


def _parse_costs(text: str | None) -> dict | None:
    """``"F=1,B=2,W=1,F&B=3"`` -> {"F": 1.0, ...}; ValueError naming ``costs`` on a malformed entry."""
    if text is None:
        return None
    costs = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key, sep, value = entry.partition("=")
        try:
            number = float(value) if sep else None
        except ValueError:
            number = None
        if number is None:
            raise ValueError(f"costs: expected KEY=NUMBER entries like F=1,B=2,W=1,F&B=3, got {entry!r}")
        costs[key.strip()] = number
    return costs


def _schedule(args, console: Console) -> int:
    from sharding.dualpipe import account, build_schedule, published_bubble
    from sharding.schedule_plot import plot_schedule

    costs = _parse_costs(args.costs)
    schedule = build_schedule(args.kind, args.ranks, args.chunks)
    timeline = plot_schedule(schedule, args.out, costs)
    row = account(schedule, costs)
    table = Table(title=f"{row.kind}: {row.num_ranks} ranks, {row.num_stages} stages (PP), "
                        f"{schedule.num_chunks} micro-batches")
    for column in ("bubble (simulated)", "published bubble", "peak activations per rank", "parameters per rank",
                   "copies per stage", "makespan"):
        table.add_column(column, justify="right")
    table.add_row(f"{row.bubble:g}", f"{published_bubble(row.kind, row.num_stages, costs):g}",
                  str(row.peak_activations), f"{row.parameters_per_rank}x", str(row.copies_per_stage),
                  f"{timeline.makespan:g}")
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0


def _info(args, console: Console) -> int:
    from jaxseek.model.accounting import count_parameters, flops_per_token, parameter_shapes
    from jaxseek.train_state import abstract_train_state, bytes_per_device
    from sharding.rules import get_rules

    mc, tc = get_preset(args.preset)
    counts = count_parameters(mc)
    flops = flops_per_token(mc, tc.seq_len)
    summary = Table(title=f"{args.preset}: parameters and FLOPs")
    summary.add_column("quantity")
    summary.add_column("value", justify="right")
    summary.add_row("total parameters (main model)", f"{counts.total:,} ({counts.total / 1e9:.2f} B)")
    summary.add_row("activated per token (no embedding table)", f"{counts.activated:,} ({counts.activated / 1e9:.2f} B)")
    summary.add_row("embedding table", f"{counts.embedding:,}")
    summary.add_row(f"MTP modules (depth {mc.mtp_depth}) total / activated",
                    f"{counts.mtp_total:,} / {counts.mtp_activated:,}")
    summary.add_row(f"forward FLOPs per token (context {tc.seq_len})", f"{flops.forward:.3e}")
    summary.add_row("training FLOPs per token (3x forward)", f"{flops.training:.3e}")
    if args.ep < 1 or (args.dp or 1) < 1 or args.pp < 1:
        raise ValueError(f"ep, dp, pp: mesh axes must be >= 1, got ep={args.ep} dp={args.dp} pp={args.pp}")
    mesh_shape = {"pp": args.pp, "dp": args.dp or 1, "ep": args.ep}
    held = bytes_per_device(abstract_train_state(mc, tc)[1], get_rules(args.rules), mesh_shape)
    pipeline = f"pp={args.pp}, " if args.pp > 1 else ""
    where = f"per device ({pipeline}dp={mesh_shape['dp']}, ep={args.ep}, rules {args.rules})"
    summary.add_row(f"parameter bytes {where}", f"{held.params / 2**30:,.2f} GiB of {held.params_total / 2**30:,.2f}")
    summary.add_row(f"optimizer bytes {where}",
                    f"{held.optimizer / 2**30:,.2f} GiB of {held.optimizer_total / 2**30:,.2f}")
    console.print(summary)
    shapes = parameter_shapes(mc)
    layers = Table(title="parameter shapes (stacked blocks lead with their layer count)")
    layers.add_column("parameter")
    layers.add_column("shape", justify="right")
    for name, shape in shapes.items():
        layers.add_row(name, "x".join(map(str, shape)))
    console.print(layers)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_generate(sub)
    _add_eplb(sub)
    _add_convert(sub)
    _add_schedule(sub)
    prepare_data.register(sub)
    profile_run.register(sub)
    info = sub.add_parser("info", help="parameter counts, per-layer shapes and FLOPs of a preset (abstract)")
    info.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESET_BUILDERS))
    _add_mesh_arguments(info, default_rules="ep+zero1")
    args = parser.parse_args(argv)
    console = Console()
    try:
        commands = {"train": _train, "generate": _generate, "eplb": _eplb, "convert": _convert,
                    "schedule": _schedule, "info": _info, "prepare-data": prepare_data.run,
                    "profile": profile_run.run}
        return commands[args.command](args, console)
    except ValueError as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
