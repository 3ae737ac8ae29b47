"""Every notebook runs top to bottom on a real Jupyter kernel (``nbclient`` + ``ipykernel``), so display
calls, magics and kernel state behave as in Jupyter; notebooks are kept with their outputs stripped.

``run_notebook`` is the runner: one fresh ``python3`` kernel on this interpreter (``sys.executable``, the
venv's python, whatever kernel specs are installed elsewhere), a temporary working directory, a per-cell
timeout, and a failing cell raised as ``NotebookCellError`` naming the notebook, the cell index and the
cell's first source line.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 240
COLAB_INSTALL = 'if "google.colab" in sys.modules'


class NotebookCellError(AssertionError):
    """A notebook cell failed: ``notebook``, ``cell_index`` (0-based, markdown cells counted) and
    ``first_line`` (the cell's first source line) say where; the message adds the kernel's error."""

    def __init__(self, notebook: str, cell_index: int, first_line: str, detail: str):
        self.notebook, self.cell_index, self.first_line = notebook, cell_index, first_line
        super().__init__(f"{notebook}: cell {cell_index} ({first_line!r}) failed:\n{detail}")


def _kernel_manager(spec_root: pathlib.Path) -> AsyncKernelManager:
    """A ``python3`` kernel whose argv runs this interpreter, from a kernel spec written under ``spec_root``."""
    spec_dir = spec_root / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jaxseek venv)", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def kernel_env() -> dict[str, str]:
    """The kernel's environment: this checkout's packages first (not an installed copy), CPU, short runs
    (``NOTEBOOK_STEPS``), Jupyter's inline plots, and no XLA_FLAGS: each notebook sets its own device
    count (the suite's 8 fake devices are not inherited)."""
    path = os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "PYTHONPATH": path, "NOTEBOOK_STEPS": "4", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.pop("MPLBACKEND", None)  # ipykernel picks matplotlib's inline backend, as in Jupyter
    return env


def run_notebook(path: pathlib.Path, workdir: pathlib.Path, *, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Executes every code cell of ``path`` in order on a fresh kernel started in ``workdir``.

    Returns the executed notebook (outputs filled in; the file is not written). Raises NotebookCellError on
    the first cell that raises, times out (``timeout`` seconds a cell) or kills the kernel.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=_kernel_manager(workdir / ".kernelspec"), timeout=timeout,
                            allow_errors=False, resources={"metadata": {"path": str(workdir)}})
    with client.setup_kernel(env=kernel_env(), cwd=str(workdir), cleanup_kc=True):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as error:
                raise NotebookCellError(path.name, index, first_line, f"{error.ename}: {error.evalue}\n"
                                        f"{str(error)[-3000:]}") from None
            except (CellTimeoutError, DeadKernelError) as error:
                raise NotebookCellError(path.name, index, first_line, f"{type(error).__name__}: {error}") from None
    return nb


# The model tour trains for a few steps (~25 s): slow; every other notebook runs in <= ~15 s on 2 cores.
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if "model" in p.name else p
                                  for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    run_notebook(path, tmp_path)


def test_runner_is_a_jupyter_kernel_and_names_the_failing_cell(tmp_path):
    """Magics, display and kernel state work as in Jupyter; a failing cell is named by notebook, index and
    first line, and later cells do not run."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# a title"),
        nbformat.v4.new_code_cell("%config InlineBackend.figure_format = 'png'\nx = 41"),
        nbformat.v4.new_code_cell("%%capture captured\nprint('inside')"),
        nbformat.v4.new_code_cell("import sys, jaxseek\nfrom IPython.display import display\n"
                                  "display({'x': x + 1, 'py': sys.executable, 'pkg': jaxseek.__file__})"),
        nbformat.v4.new_code_cell("\n# where it breaks\nraise ValueError(f'boom {x}')"),
        nbformat.v4.new_code_cell("print('never')"),
    ])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(NotebookCellError) as caught:
        run_notebook(path, tmp_path, timeout=60)
    error = caught.value
    assert (error.notebook, error.cell_index, error.first_line) == ("broken.ipynb", 4, "# where it breaks")
    assert "broken.ipynb: cell 4 ('# where it breaks')" in str(error) and "ValueError: boom 41" in str(error)
    assert all(not c.get("outputs") for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    nb.cells = nb.cells[:4]
    nbformat.write(nb, path)
    cells = run_notebook(path, tmp_path, timeout=60).cells
    assert cells[2].outputs == []  # %%capture swallowed the print
    shown = cells[3].outputs[0]["data"]["text/plain"]
    assert "'x': 42" in shown and repr(sys.executable) in shown  # the kernel runs this interpreter
    assert repr(str(REPO_ROOT / "jaxseek" / "__init__.py")) in shown  # and this checkout's packages
    assert cells[1].execution_count == 1 and cells[3].execution_count == 3  # one kernel, in order


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_colab_ready(path):
    """No outputs or execution counts in the repository; the first code cell installs the repo on Colab."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} keep outputs or execution counts (strip them)"
    assert code and COLAB_INSTALL in code[0].source and "pip" in code[0].source, \
        f"{path.name}: the first code cell must pip-install the repo when running on Colab"
