"""Checkpoint adapter benchmark: ``ThreeFSCheckpointManager`` on an embedded 3FS against plain Orbax.

One pytree of float32 arrays (random, so compression cannot help Orbax) of ~256 MiB (``quick``: ~32 MiB),
sharded over every visible device, is saved and restored, in the same run and taking turns:

* **3FS**: ``ThreeFSCheckpointManager`` on an embedded 3FS (3 nodes x 4 targets, 3 replicas, 1 MiB
  chunks) under ``work_dir``: asynchronous save (the time ``save`` blocks is reported too), CRC32C
  per MiB, restore onto the same shardings with every checksum verified.
* **Orbax**: ``ocp.CheckpointManager`` with ``StandardSave``/``StandardRestore`` to a local directory
  beside it (TensorStore, OCDBT).

GB/s = bytes of the tree / (``save`` + ``wait_until_finished``), or / ``restore`` until the arrays are
ready; the median of ``repeats`` rounds. Goals (issue 16): restore >= 0.8x, save >= 0.3x of Orbax. A
last row runs the crash drill (``storage.checkpoint.crash_drill.crash_trials``).

    python benchmarks/adapters_checkpoint.py [--quick]     # prints the rows (the lead's
                                                           # storage_adapters.py records them)
"""

from __future__ import annotations

import pathlib
import shutil
import statistics
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

from storage.checkpoint import ThreeFSCheckpointManager, ThreeFSRestore, ThreeFSSave  # noqa: E402
from storage.checkpoint.crash_drill import crash_trials  # noqa: E402
from storage.location import open_location  # noqa: E402

MIB = 1 << 20
ADAPTER = "3fs checkpoint (embedded, 3 replicas)"
PEER = "plain Orbax (Standard{}), local dir"


def _tree(total_bytes: int) -> dict:
    """8 float32 arrays [rows, 1024] adding up to ``total_bytes``, rows split over all devices."""
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices).reshape(len(devices), 1), ("d", "m"))
    rows = total_bytes // 8 // 4096 // len(devices) * len(devices)
    rng = np.random.default_rng(0)
    return {f"layer{i}": {"w": jax.device_put(rng.standard_normal((rows, 1024), np.float32),
                                              NamedSharding(mesh, P("d", None) if i % 2 else P(None, None)))}
            for i in range(8)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_checkpoint(work_dir: pathlib.Path, *, quick: bool, console=None) -> list[dict]:
    """Rows {"operation", "adapter", "peer", "GB/s", "peer GB/s", "ratio", "goal", ...} plus a crash row."""
    work_dir = pathlib.Path(work_dir)
    tree = _tree((32 if quick else 256) * MIB)
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    repeats = 2 if quick else 3
    say = console.print if console is not None else print
    shutil.rmtree(work_dir / "orbax", ignore_errors=True)
    location = open_location(f"3fs+embedded://{work_dir / '3fs'}", create=True).child("bench-checkpoints")
    location.client.makedirs(location.path)
    threefs = ThreeFSCheckpointManager(location, ocp.CheckpointManagerOptions(max_to_keep=2))
    orbax = ocp.CheckpointManager((work_dir / "orbax").absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2))
    times = {key: [] for key in ("3fs save", "3fs blocking", "orbax save", "orbax blocking", "3fs restore",
                                 "orbax restore")}
    first = (threefs.latest_step() or 0) + 1
    try:
        for step in range(first, first + repeats):
            for name, manager, save in (("3fs", threefs, ThreeFSSave), ("orbax", orbax, ocp.args.StandardSave)):
                start = time.perf_counter()
                manager.save(step, args=save(tree))
                times[f"{name} blocking"].append(time.perf_counter() - start)
                manager.wait_until_finished()
                times[f"{name} save"].append(time.perf_counter() - start)
            for name, manager, restore in (("3fs", threefs, ThreeFSRestore),
                                           ("orbax", orbax, ocp.args.StandardRestore)):
                restored = {}
                times[f"{name} restore"].append(_timed(lambda: restored.update(
                    jax.block_until_ready(manager.restore(step, args=restore(target))))))
                if step == first:
                    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
                        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            say(f"checkpoint round {step - first + 1}/{repeats}: " + ", ".join(
                f"{key} {values[-1]:.2f} s" for key, values in times.items()))
    finally:
        threefs.close()
        orbax.close()
        location.close()
    median = {key: statistics.median(values) for key, values in times.items()}
    rows = []
    for operation, goal in (("save", 0.3), ("restore", 0.8)):
        ours, theirs = nbytes / median[f"3fs {operation}"] / 1e9, nbytes / median[f"orbax {operation}"] / 1e9
        rows.append({"operation": f"checkpoint {operation} ({nbytes / MIB:.0f} MiB, {len(jax.devices())} devices)",
                     "adapter": ADAPTER, "peer": PEER.format(operation.capitalize()),
                     "GB/s": round(ours, 3), "peer GB/s": round(theirs, 3),
                     "ratio": round(ours / theirs, 3), "goal": f">= {goal}x", "met": ours / theirs >= goal,
                     **({"blocking s": round(median["3fs blocking"], 4),
                         "peer blocking s": round(median["orbax blocking"], 4)} if operation == "save" else {})})
    report = crash_trials(10 if quick else 60, work_dir / "crash-drill", seed=1)
    rows.append({"operation": "checkpoint crash drill (SIGKILL while saving)", "adapter": ADAPTER, "peer": "-",
                 "trials": report.trials, "killed mid-save": report.partial, "failures": len(report.failures),
                 "seconds": round(report.seconds, 1), "ratio": None, "goal": "0 failures",
                 "met": not report.failures})
    for failure in report.failures:
        say(f"[red]crash drill: {failure}[/]" if console is not None else f"crash drill: {failure}")
    return rows


if __name__ == "__main__":
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", type=pathlib.Path, help="work directory (default: a temporary one)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=options.root) as scratch:
        for row in bench_checkpoint(pathlib.Path(scratch), quick=options.quick):
            print(json.dumps(row))
