"""Training across two real processes on jax.distributed (4 fake CPU devices each, a coordinator on
loopback, gloo collectives) computes the losses of one process on 8 devices, and resumes from its own
multi-process checkpoint."""

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from jaxseek.cli import main
from jaxseek.distributed import initialize, resolve_settings

RUN = ["train", "--preset", "tiny", "--steps", "3", "--batch-size", "8", "--seq-len", "32", "--eval-every", "3",
       "--checkpoint-every", "3", "--no-progress"]
LOSSES = ("loss", "ce_loss", "mtp_loss", "balance_loss", "grad_norm")
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(tmp_path) -> dict[str, str]:
    """The parent's environment without its 8-device flag (conftest) or any JAXSEEK_* setting, plus a
    persistent compilation cache shared by the test's runs (the resumed run loads what the first compiled)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSEEK_")}
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _start_processes(args: list[str], tmp_path, tag: str) -> list[tuple[subprocess.Popen, object, object]]:
    port, env, started = _free_port(), _child_env(tmp_path), []
    for i in range(2):
        out, err = open(tmp_path / f"{tag}{i}.out", "w+"), open(tmp_path / f"{tag}{i}.err", "w+")
        command = [sys.executable, "-m", "jaxseek", *args, "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", str(i), "--local-devices", "4"]
        started.append((subprocess.Popen(command, env=env, stdout=out, stderr=err), out, err))
    return started


def _wait(started, deadline: float) -> list[str]:
    """Waits for every process; on a failure or the deadline, kills the rest. Returns their stdouts."""
    try:
        while any(p.poll() is None for p, _, _ in started):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p, _, _ in started):
                break
            time.sleep(0.2)
    finally:
        for p, _, _ in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = []
    for p, out, err in started:
        for file in (out, err):
            file.seek(0)
        logs.append((p.returncode, out.read(), err.read()))
        for file in (out, err):
            file.close()
    report = "\n".join(f"--- process {i} exit {rc}\nstdout:\n{o[-3000:]}\nstderr:\n{e[-3000:]}"
                       for i, (rc, o, e) in enumerate(logs))
    assert all(rc == 0 for rc, _, _ in logs), f"a process failed or timed out after {TIMEOUT_S} s\n{report}"
    return [o for _, o, _ in logs]


def _two_processes(args: list[str], tmp_path, tag: str) -> list[str]:
    return _wait(_start_processes(args, tmp_path, tag), time.monotonic() + TIMEOUT_S)


def _assert_same_losses(multi: pl.DataFrame, single: pl.DataFrame) -> None:
    assert multi["step"].to_list() == single["step"].to_list() == [1, 2, 3]
    for name in LOSSES:
        np.testing.assert_allclose(multi[name].to_numpy(), single[name].to_numpy(), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(multi["valid_loss"][-1], single["valid_loss"][-1], rtol=1e-5, err_msg="valid_loss")
    assert multi["expert_load"].to_list() == single["expert_load"].to_list()  # every token routed alike


@pytest.mark.slow
def test_two_processes_train_expert_parallel_like_one_and_resume(tmp_path, devices):
    """`jaxseek train --ep 8` as 2 processes x 4 devices: preempted after step 2 (a multi-process save), then
    resumed (a multi-process restore); the losses equal one process on 8 devices. (The dp layout takes the
    same path through the loop; one case keeps the suite's time.)"""
    run = RUN + ["--ep", "8", "--rules", "ep"]
    start = time.perf_counter()
    multi = tmp_path / "multi"
    _two_processes(run + ["--out", str(multi), "--stop-after", "2"], tmp_path, "first")
    outs = _two_processes(run + ["--out", str(multi), "--resume"], tmp_path, "resumed")
    assert "resuming" in outs[0]
    multi_s = time.perf_counter() - start
    assert "devices=8" in outs[0] and "processes=2" in outs[0] and "run summary" in outs[0]
    assert "run summary" not in outs[1] and "jaxseek train" not in outs[1]  # process 1 computes in silence

    start = time.perf_counter()
    assert main(run + ["--out", str(tmp_path / "single")]) == 0  # this process: 8 fake devices, no coordinator
    single_s = time.perf_counter() - start
    print(f"two processes {multi_s:.1f} s, one process {single_s:.1f} s")
    _assert_same_losses(pl.read_parquet(multi / "metrics.parquet"), pl.read_parquet(tmp_path / "single" / "metrics.parquet"))
    assert (multi / "training.png").exists() and (multi / "checkpoints" / "3").is_dir()


def test_process_id_must_be_below_num_processes(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"process_id: must be in \[0, num_processes\) = \[0, 2\), got 2"):
        initialize("127.0.0.1:9911", 2, 2)  # fails before jax.distributed is touched
    assert main(RUN + ["--out", str(tmp_path), "--coordinator", "127.0.0.1:9911", "--num-processes", "2",
                       "--process-id", "2"]) == 2
    assert "process_id" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, environ, named", [
    (("localhost", 2, 0, None), {}, "coordinator: must be host:port"),
    (("127.0.0.1:99999", 2, 0, None), {}, "coordinator: must be host:port"),
    ((None, 2, 0, None), {}, "coordinator: num_processes / process_id need a coordinator"),
    (("127.0.0.1:9911", None, 0, None), {}, "num_processes: required"),
    (("127.0.0.1:9911", 2, None, None), {}, "process_id: required"),
    (("127.0.0.1:9911", 0, 0, None), {}, "num_processes: must be an integer >= 1"),
    (("127.0.0.1:9911", 2, -1, None), {}, r"process_id: must be in \[0"),
    ((None, None, None, 0), {}, "local_device_count: must be an integer >= 1"),
    ((None, None, None, None), {"JAXSEEK_NUM_PROCESSES": "two"}, "JAXSEEK_NUM_PROCESSES: must be an integer"),
    ((None, None, None, None), {"JAXSEEK_COORDINATOR": "h:1", "JAXSEEK_NUM_PROCESSES": "2",
                                "JAXSEEK_PROCESS_ID": "5"}, "process_id: must be in"),
])
def test_bad_settings_name_the_argument(arguments, environ, named):
    with pytest.raises(ValueError, match=named):
        resolve_settings(*arguments, environ=environ)


def test_settings_fall_back_to_the_environment_and_arguments_win():
    environ = {"JAXSEEK_COORDINATOR": "10.0.0.1:1234", "JAXSEEK_NUM_PROCESSES": "4", "JAXSEEK_PROCESS_ID": "3",
               "JAXSEEK_LOCAL_DEVICES": "2"}
    assert resolve_settings(environ=environ) == ("10.0.0.1:1234", 4, 3, 2)
    assert resolve_settings(None, None, 1, None, environ=environ) == ("10.0.0.1:1234", 4, 1, 2)
    assert resolve_settings(environ={}) == (None, None, None, None) and not resolve_settings(environ={}).multi_process
    assert resolve_settings("auto", environ={}).multi_process  # jax detects SLURM / Open MPI / TPU clusters


def test_one_process_needs_no_coordinator_and_late_devices_are_refused(devices):
    info = initialize(None, None, None, None)
    assert (info.process_index, info.process_count, info.device_count, info.is_main) == (0, 1, 8, True)
    with pytest.raises(ValueError, match="local_device_count: jax's devices are already in use"):
        initialize(local_device_count=4)  # this process's backend started with 8 (conftest)
