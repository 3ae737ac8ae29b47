"""jaxseek.run_storage: a run finds its checkpoints where it wrote them."""

import json

import pytest

from jaxseek.run_storage import STORAGE_FILE, open_run_storage, recorded_storage_url, run_storage_url


def test_default_is_an_embedded_3fs_recorded_in_the_run(tmp_path):
    run = tmp_path / "run"
    assert run_storage_url(run) == f"3fs+embedded://{run / '3fs'}"
    assert not (run / STORAGE_FILE).exists()  # not recorded unless asked
    with open_run_storage(run, record=True) as location:
        assert location.path == "/" and location.os_path is None
    assert recorded_storage_url(run) == f"3fs+embedded://{run / '3fs'}"
    assert run_storage_url(run) == recorded_storage_url(run)


def test_a_recorded_url_wins_and_another_is_refused(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "plain"
    assert run_storage_url(run, str(elsewhere), record=True) == str(elsewhere)
    assert json.loads((run / STORAGE_FILE).read_text()) == {"url": str(elsewhere)}
    assert run_storage_url(run) == str(elsewhere)
    assert run_storage_url(run, str(elsewhere)) == str(elsewhere)
    with pytest.raises(ValueError, match="keeps its checkpoints at"):
        run_storage_url(run, f"3fs+embedded://{tmp_path}/other")


def test_multi_process_runs_default_to_the_run_directory(tmp_path):
    assert run_storage_url(tmp_path / "run", process_count=2) == str((tmp_path / "run").absolute())


def test_a_run_made_before_storage_json_keeps_its_checkpoints_in_place(tmp_path):
    run = tmp_path / "old"
    (run / "checkpoints" / "5").mkdir(parents=True)
    assert run_storage_url(run) == str(run.absolute())
    with open_run_storage(run) as location:
        assert location.child("checkpoints").os_path == str(run.absolute() / "checkpoints")
