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


def test_fsspec_finds_the_3fs_protocol_through_the_installed_entry_point():
    """A fresh interpreter that never imported storage.threefs gets "3fs" from the package metadata."""
    import subprocess
    import sys
    code = "import fsspec; cls = fsspec.get_filesystem_class('3fs'); print(cls.__module__ + '.' + cls.__name__)"
    result = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True)
    assert result.stdout.strip() == "storage.threefs.client.fsspec_fs.ThreeFSFileSystem"
