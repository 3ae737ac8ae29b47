"""Crash drill: SIGKILL a process that is saving checkpoints, then check what a new process sees.

Each trial forks a child (from a ``forkserver`` that has imported this module, so a child starts in
milliseconds) that opens the embedded 3FS under ``work_dir/cluster``, starts a ``ThreeFSCheckpointManager``
on ``/ckpt`` (``max_to_keep=2``: deletions happen too) and saves steps ``latest + 1, latest + 2, ...``
back to back, publishing each step once ``wait_until_finished`` returned (committed). The parent kills
it at a random moment (mostly while it saves; some trials during its start-up, while it removes
leftovers), then opens the cluster itself and checks:

* the leftovers of the killed save (``.tmp-*``, ``.deleting-*``) are not listed as steps, and a new
  manager removes them;
* ``latest_step()`` is the last step the child published, or the one after it (killed between the
  commit and the publication); with nothing published, the latest before the trial or the one after;
* every listed step restores, checksums verified, to exactly the values ``drill_tree(step)`` saved.

``crash_trials(n, work_dir)`` runs ``n`` trials and returns a ``CrashReport``; the slow test runs 30,
the benchmark more.
"""

from __future__ import annotations

import multiprocessing
import pathlib
import random
import time
from typing import NamedTuple

import numpy as np
import orbax.checkpoint as ocp

from storage.checkpoint.manager import DELETING_PREFIX, TMP_PREFIX, ThreeFSCheckpointManager
from storage.checkpoint.handler import ThreeFSSave
from storage.location import open_location

OPTIONS = dict(max_to_keep=2, save_interval_steps=1)
START_UP_KILLS = 0.15  # share of trials killed before the child reported ready


def drill_tree(step: int) -> dict:
    """What the drill saves at ``step`` (~2.4 MiB; every leaf depends on the step)."""
    return {"a": np.full((256, 1024), step, np.float32),
            "b": {"c": np.arange(300_000, dtype=np.int32) + step, "d": np.arange(1000, dtype=np.float64) * step},
            "step": step}


def _open(work_dir: str):
    return open_location(f"3fs+embedded://{work_dir}/cluster", create=True).child("ckpt")


def _child(work_dir: str, ready, committed) -> None:
    """Runs in the forked child until killed: saves consecutive steps, publishing each committed one."""
    location = _open(work_dir)
    manager = ThreeFSCheckpointManager(location, ocp.CheckpointManagerOptions(**OPTIONS))
    step = (manager.latest_step() or 0) + 1
    ready.set()
    while True:
        manager.save(step, args=ThreeFSSave(drill_tree(step)))
        manager.wait_until_finished()
        committed.value = step
        step += 1


class CrashReport(NamedTuple):
    """trials run; partial: trials whose kill left a partial save or deletion behind; steps: the latest
    step after each trial; failures: every broken invariant (empty when the drill passed); seconds."""

    trials: int
    partial: int
    steps: list[int]
    failures: list[str]
    seconds: float


def _equal(restored, expected) -> bool:
    if isinstance(expected, dict):
        return isinstance(restored, dict) and restored.keys() == expected.keys() and all(
            _equal(restored[k], expected[k]) for k in expected)
    if isinstance(expected, np.ndarray):
        return (isinstance(restored, np.ndarray) and restored.dtype == expected.dtype
                and np.array_equal(restored, expected))
    return type(restored) is type(expected) and restored == expected


def check_after_kill(work_dir: str, allowed: set[int | None] | None, trial: int) -> tuple[int | None, bool, list[str]]:
    """(latest step, whether leftovers were found, failures) after a kill, checked in this process;
    ``allowed``: the steps that may be the latest (None: any)."""
    failures = []
    location = _open(work_dir)
    try:
        client = location.client
        names = client.listdir(location.path) if client.exists(location.path) else []
        partial = any(name.startswith((TMP_PREFIX, DELETING_PREFIX)) for name in names)
        manager = ThreeFSCheckpointManager(location, ocp.CheckpointManagerOptions(**OPTIONS))
        try:
            left = [n for n in client.listdir(location.path) if not n.isdigit()]
            if left:
                failures.append(f"trial {trial}: leftovers {left} after a manager started")
            steps, latest = manager.all_steps(), manager.latest_step()
            if allowed is not None and latest not in allowed:
                failures.append(f"trial {trial}: latest step {latest}, expected one of {sorted(allowed, key=str)}")
            for step in steps:
                try:
                    if not _equal(manager.restore(step), drill_tree(step)):
                        failures.append(f"trial {trial}: step {step} restored other values")
                except Exception as error:  # noqa: BLE001 - a failed restore is what the drill looks for
                    failures.append(f"trial {trial}: step {step} does not restore: {error!r}")
        finally:
            manager.close()
    finally:
        location.close()
    return latest, partial, failures


def crash_trials(n: int, work_dir: str | pathlib.Path, *, seed: int = 0, max_delay: float = 0.5) -> CrashReport:
    """Runs ``n`` kill-and-check trials under ``work_dir`` (see the module docstring); the children are
    killed ``uniform(0, max_delay)`` seconds after they report ready (or during start-up). The children
    come from a ``forkserver``, which imports the caller's main module: call this from a test, or from
    a script under ``if __name__ == "__main__":``."""
    work_dir = str(pathlib.Path(work_dir).absolute())
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["storage.checkpoint.crash_drill"])
    rng = random.Random(seed)
    start, steps, failures, partial = time.perf_counter(), [], [], 0
    latest = check_after_kill(work_dir, None, -1)[0]  # creates the cluster; a reused work_dir continues
    for trial in range(n):
        ready, committed = context.Event(), context.Value("q", -1, lock=False)
        child = context.Process(target=_child, args=(work_dir, ready, committed), daemon=True)
        child.start()
        if rng.random() < START_UP_KILLS:
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            if not ready.wait(60):
                child.kill()
                raise RuntimeError(f"crash drill: the child of trial {trial} did not start (exit {child.exitcode})")
            time.sleep(rng.uniform(0.0, max_delay))
        child.kill()
        child.join()
        published = committed.value
        allowed = {published, published + 1} if published >= 0 else {latest, (latest or 0) + 1}
        latest, left_partial, found = check_after_kill(work_dir, allowed, trial)
        partial += left_partial
        steps.append(latest)
        failures += found
    return CrashReport(n, partial, steps, failures, time.perf_counter() - start)

