"""The training loop behind ``jaxseek train``: data, data parallelism, checkpoints, metrics, progress.

The step itself is ``train_step.make_train_step``; this file only feeds it. Batches are sharded over
the mesh's ``dp`` x ``ep`` devices (``sharding.mesh``); the state is laid out by a rule set
(``sharding.rules``: "dp" replicates it, "zero1" splits the optimizer moments over ``dp``, "ep" the expert
weights and their moments over ``ep``). The step is compiled before the first timed step, so every
logged tokens/s is a step's own.

Several processes (``jaxseek.distributed``) run this same loop: each computes the same global batch and
hands jax the rows of its own devices, the step's metrics come back replicated so every process reads
them, every process takes part in each Orbax save and restore, and process 0 alone writes the configs,
``metrics.parquet`` and ``training.png``.
"""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import NamedTuple

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxseek.checkpoint import Checkpointer
from jaxseek.config import ModelConfig, TrainConfig
from jaxseek.distributed import barrier
from jaxseek.data import ByteCorpus, StoredBatches, unigram_entropy
from jaxseek.expert_placement import current_placements, placement_balancedness, rebalance
from jaxseek.metrics import MetricsLog, plot_training
from jaxseek.model.experts import check_expert_parallel
from jaxseek.pipeline_model import pipeline_schedule
from jaxseek.prepare_data import ensure_prepared
from jaxseek.run_storage import open_run_storage
from jaxseek.train_state import (TrainState, abstract_train_state, init_train_state, sharded_abstract_state,
                                  state_shardings)
from jaxseek.train_step import make_eval_step, make_train_step
from sharding.mesh import batch_shards, batch_sharding, make_mesh
from sharding.rules import get_rules
from storage.location import Location

METRICS_FILE = "metrics.parquet"
PLOT_FILE = "training.png"


class TrainResult(NamedTuple):
    out_dir: pathlib.Path
    log: MetricsLog
    state: TrainState
    valid_loss: float  # validation next-token CE (nats/byte) at the last step
    unigram_entropy: float  # of the training bytes, nats
    tokens_per_s: float  # median over this run's steps (compilation excluded)
    compile_s: float  # seconds spent compiling the train step


def place_batch(batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """[batch, window] int32, the same global batch on every process -> a global array laid out by ``sharding``.

    Each process fills only its own devices' rows, so this works with one process or many."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def _evaluate(evaluate, state: TrainState, batches: list[np.ndarray], sharding) -> float:
    return float(np.mean([float(evaluate(state, place_batch(b, sharding))) for b in batches]))


def check_drops(mc: ModelConfig, step: int, dropped: int, last_checkpoint: int | None) -> None:
    """Applies ``moe.drop_policy`` to a step's dropped (token, expert) copies: "raise" stops the run."""
    if dropped and mc.moe.drop_policy == "raise":
        raise RuntimeError(
            f"step {step}: expert parallelism dropped {dropped} (token, expert) copies over "
            f"moe.capacity_factor={mc.moe.capacity_factor}; raise it, set it to 0 (dropless), or set "
            f"moe.drop_policy='drop' to train on with the drops counted (checkpoints up to step {last_checkpoint} "
            "are kept)")


def _training_data(data: Location, corpus: ByteCorpus | None, tc: TrainConfig, window: int,
                   out_dir: pathlib.Path, show_progress: bool) -> tuple[StoredBatches, StoredBatches, float]:
    """(train batches, validation records, unigram entropy of the train bytes), read from records at ``data``:
    the prepared standard library (process 0 prepares it, the others wait and read its manifest), or
    ``corpus`` written as records."""
    batching = dict(batch_size=tc.batch_size, seed=tc.seed)
    if corpus is not None:
        return (StoredBatches.prepare(data, corpus.train, window=window, **batching),
                StoredBatches.prepare(data, corpus.valid, window=window, **batching),
                unigram_entropy(corpus.train))
    prepared = None
    if jax.process_index() == 0:
        prepared = ensure_prepared(data, "stdlib", window=window, progress=show_progress)
    barrier(f"jaxseek train {out_dir.absolute()}: data prepared")
    if prepared is None:
        prepared = ensure_prepared(data, "stdlib", window=window)  # reads the manifest process 0 published
    return (StoredBatches.open(data, prepared.train, **batching), StoredBatches.open(data, prepared.valid, **batching),
            prepared.unigram_entropy())


def train(mc: ModelConfig, tc: TrainConfig, out_dir: str | pathlib.Path, *, resume: bool = False,
          stop_after: int | None = None, corpus: ByteCorpus | None = None, mesh: jax.sharding.Mesh | None = None,
          rules: str = "dp", console: Console | None = None, show_progress: bool = True,
          storage: str | None = None) -> TrainResult:
    """Trains ``mc`` with ``tc``; writes ``metrics.parquet`` and ``training.png`` to ``out_dir``, and the
    checkpoints and the prepared training records to the run's storage.

    Args:
      resume: continue from the latest checkpoint in ``out_dir``; the continued run computes exactly
        the steps, batches and losses an uninterrupted run would.
      stop_after: stop (with a checkpoint) after this many total steps, as a preempted job would.
      corpus: the byte data (default: the standard library's source, tokenized and packed by
        ``jaxseek prepare-data``'s DataFrame job into the run's storage the first time).
      mesh: devices to train on (default: a data-parallel mesh over all of them).
      rules: the state's layout over the mesh, a ``sharding.rules`` rule set ("dp", "zero1", "ep", "ep+zero1").
      storage: where checkpoints (``checkpoints/``) and training records (``data/``) live, any
        ``storage.location`` URL; default: the URL the run recorded, else an embedded 3FS under ``out_dir``
        (``jaxseek.run_storage``). Batches are read from the records, not from memory.

    After ``jaxseek.distributed.initialize``, every process calls this with the same arguments and an
    ``out_dir`` they all see; process 0 prints and writes the files, Orbax coordinates the checkpoints.
    """
    out_dir = pathlib.Path(out_dir)
    console = console or Console()
    writes_files = jax.process_index() == 0  # one writer for a run directory all processes share
    if not writes_files:  # and one voice: the other processes compute in silence
        console, show_progress = Console(quiet=True), False
    mesh = mesh or make_mesh()
    if tc.batch_size % batch_shards(mesh):
        raise ValueError(f"batch_size: {tc.batch_size} must be a multiple of the {batch_shards(mesh)} data shards")
    end = tc.steps if stop_after is None else min(stop_after, tc.steps)
    window = tc.seq_len + 1 + mc.mtp_depth
    get_rules(rules)  # a bad name fails before any work
    check_expert_parallel(mc.moe, mesh)
    if mesh.shape.get("pp", 1) > 1:
        pipeline_schedule(mc, tc, mesh)  # the schedule, layers and batch fit, before any work
    location = open_run_storage(out_dir, storage, process_count=jax.process_count(), record=writes_files)
    try:
        train_batches, valid_records, entropy = _training_data(location.child("data"), corpus, tc, window, out_dir,
                                                                   show_progress)
        valid_batches = valid_records.first(tc.eval_batches)
        valid_records.close()

        checkpointer = Checkpointer(out_dir, save_every=tc.checkpoint_every, location=location.child("checkpoints"))
        log, start = MetricsLog(), 0
        if resume:
            start = checkpointer.latest_step()
            if start is None:
                raise ValueError(f"resume: no checkpoint under {out_dir}")
            if start == 0:  # nothing trained yet (a converted checkpoint): any schedule may start from it
                checkpointer.check_configs(mc, None)
                if writes_files:
                    checkpointer.write_configs(mc, tc)
            else:
                checkpointer.check_configs(mc, tc)
            graphdef = abstract_train_state(mc, tc)[0]
            state = checkpointer.restore(start, sharded_abstract_state(mc, tc, mesh, rules))  # restored in its layout
            if (out_dir / METRICS_FILE).exists():
                log = MetricsLog.read_parquet(out_dir / METRICS_FILE, up_to_step=start)
            console.print(f"[bold]resuming[/] {out_dir} at step {start}")
        elif checkpointer.latest_step() is not None:
            raise ValueError(f"out: {out_dir} already holds a run (checkpoint at step {checkpointer.latest_step()}); "
                             "pass --resume to continue it or choose another --out")
        else:
            if writes_files:
                checkpointer.write_configs(mc, tc)
            graphdef, state = init_train_state(mc, tc, mesh, rules)
        shardings = state_shardings(abstract_train_state(mc, tc)[1], mesh, get_rules(rules))

        evaluate = make_eval_step(graphdef, mesh=mesh)
        data_sharding = batch_sharding(mesh)
        compile_start = time.perf_counter()
        step_fn = make_train_step(graphdef, mc, tc, mesh=mesh, rules=rules).lower(
            state, place_batch(train_batches.batch(start), data_sharding)).compile()
        compile_s = time.perf_counter() - compile_start
        barrier(f"jaxseek train {out_dir.absolute()}: step {start} compiled")  # processes compile at their own pace
        eplb_on = bool(mc.moe.num_physical_experts and tc.eplb.every)
        placements = current_placements(graphdef, state.params, state.model_state) if eplb_on else None
        tokens_per_step = tc.batch_size * tc.seq_len
        step_times = []
        progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[status]}"), console=console, disable=not show_progress)
        with progress:
            task = progress.add_task("train", total=tc.steps, completed=start, status=f"compiled in {compile_s:.1f} s")
            for step in range(start + 1, end + 1):
                batch = place_batch(train_batches.batch(step - 1), data_sharding)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch)
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0
                step_times.append(elapsed)
                row = log.append(step, metrics, step_time_s=elapsed, tokens=tokens_per_step)
                check_drops(mc, step, row["dropped_tokens"], checkpointer.latest_step())
                if eplb_on:
                    row.update(eplb_balancedness=float(placement_balancedness(
                        metrics["expert_load"], placements, mc.moe.num_routed_experts, mc.moe.eplb_gpus).mean()),
                        eplb_balancedness_before=None, eplb_balancedness_after=None, eplb_moved_slots=None)
                    if step % tc.eplb.every == 0 and step < end:
                        state, report = rebalance(state, graphdef, mc, np.asarray(state.load_average), tc.eplb)
                        state = jax.device_put(state, shardings)
                        placements = current_placements(graphdef, state.params, state.model_state)
                        row.update(eplb_balancedness_before=report.balancedness_before,
                                   eplb_balancedness_after=report.balancedness_after, eplb_moved_slots=report.moved_slots)
                if step % tc.eval_every == 0 or step == end:
                    log.set_valid_loss(_evaluate(evaluate, state, valid_batches, data_sharding))
                checkpointer.save(step, state, force=step == end)
                valid = f" valid {row['valid_loss']:.3f}" if row["valid_loss"] is not None else ""
                drops = f" dropped {row['dropped_tokens']}" if row["dropped_tokens"] else ""
                progress.update(task, advance=1, status=f"loss {row['ce_loss']:.3f}{valid}{drops} "
                                f"balance {row['expert_balance_mean']:.2f} {row['tokens_per_s']:,.0f} tok/s")
        checkpointer.wait()
        checkpointer.close()
        train_batches.close()
        if writes_files:
            log.write_parquet(out_dir / METRICS_FILE)
            moe_layer_names = ([f"block {i}" for i in range(mc.first_k_dense, mc.num_layers)]
                               + ([f"MTP {k}" for k in range(1, mc.mtp_depth + 1)] if mc.num_moe_layers else []))
            plot_training(log, out_dir / PLOT_FILE, unigram_entropy=entropy, moe_layer_names=moe_layer_names,
                          title=f"{mc.num_layers}-layer MLA/MoE, {tc.batch_size}x{tc.seq_len} bytes per step")
        tokens_per_s = tokens_per_step / statistics.median(step_times) if step_times else 0.0
        return TrainResult(out_dir, log, state, log.rows[-1]["valid_loss"] if log.rows else float("nan"), entropy,
                           tokens_per_s, compile_s)
    finally:
        location.close()
