import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["jaxseek", "pallas_kernels", "sharding", "storage", "jaxseek.model"])
def test_top_level_packages_are_ours_and_documented(name):
    module = importlib.import_module(name)
    assert pathlib.Path(module.__file__).resolve().is_relative_to(ROOT)
    assert module.__doc__ and len(module.__doc__) > 40


def test_pallas_kernels_imports_without_polars():
    import subprocess
    import sys
    code = ("import sys; sys.modules['polars'] = None; sys.modules['grain'] = None; "
            "import pallas_kernels, sharding.mesh, jaxseek.train_step")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
