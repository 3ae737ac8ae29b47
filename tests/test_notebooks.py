"""Every notebook's code cells run top to bottom in a fresh process (outputs are not checked in)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


# The model tour trains for a few steps (~25 s): slow; the 3FS tour takes seconds.
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if "model" in p.name else p for p in NOTEBOOKS],
                         ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    cells = json.loads(path.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "notebook.py"
    # Colab's last-expression display and IPython's Image are not needed to check the code runs.
    script.write_text(code.replace("from IPython.display import Image", "Image = lambda path: path"))
    env = {**os.environ, "NOTEBOOK_STEPS": "4", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
