import os
import subprocess
import sys

import polars as pl
import pytest

from jaxseek.cli import main


def test_info_reports_the_v3_sizes(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03 B" in out and "36.63 B" in out
    assert "moe_blocks.layers.ffn.w_gate" in out and "58x256x7168x2048" in out


def test_bad_cli_values_exit_with_a_named_error(capsys, tmp_path):
    assert main(["train", "--preset", "tiny", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny", "--fp8", "forward,fwd", "--out", str(tmp_path)]) == 2
    assert "fp8_gemms" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_trains_and_resumes_in_a_real_process(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "jaxseek", "train", "--preset", "tiny", "--steps", "4", "--batch-size", "4",
            "--seq-len", "32", "--checkpoint-every", "2", "--eval-every", "2", "--out", str(tmp_path / "run"),
            "--no-progress"]
    first = subprocess.run(base + ["--stop-after", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(base + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout and "devices=2" in second.stdout
    frame = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert frame["step"].to_list() == [1, 2, 3, 4]
