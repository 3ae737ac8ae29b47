"""Where a run keeps its checkpoints and training data: a storage URL recorded in the run directory.

A run directory (``jaxseek train --out``) holds the configs, metrics and plots as local files; its
checkpoints (``checkpoints/``) and prepared training records (``data/``) live at the run's *storage*,
any URL ``storage.location.open_location`` takes. The first process that writes the run records the URL
in ``storage.json``; later commands (``--resume``, ``generate``, ``convert``) read it from there, so a
run is always found where it was written. The default is an embedded 3FS under the run directory
(``3fs+embedded://RUN/3fs``); a multi-process run defaults to the run directory itself (an embedded
3FS belongs to one process; give ``--storage 3fs+tcp:///...`` or a mount to share a 3FS). A run
directory without ``storage.json`` (made before storage was configurable) keeps its checkpoints in place.
"""

from __future__ import annotations

import json
import pathlib

from storage.location import Location, open_location

STORAGE_FILE = "storage.json"


def default_storage_url(run_dir: str | pathlib.Path, process_count: int = 1) -> str:
    run_dir = pathlib.Path(run_dir).absolute()
    return str(run_dir) if process_count > 1 else f"3fs+embedded://{run_dir / '3fs'}"


def recorded_storage_url(run_dir: str | pathlib.Path) -> str | None:
    """The URL in ``run_dir/storage.json``, or None if the run has not recorded one."""
    path = pathlib.Path(run_dir) / STORAGE_FILE
    return json.loads(path.read_text())["url"] if path.exists() else None


def run_storage_url(run_dir: str | pathlib.Path, requested: str | None = None, *, process_count: int = 1,
                    record: bool = False) -> str:
    """The storage URL of the run in ``run_dir``: the recorded one, else ``requested`` or the default.

    Raises ValueError if ``requested`` differs from the recorded URL (a run's checkpoints would be lost
    from view). With ``record`` a run without a recorded URL records the chosen one.
    """
    run_dir = pathlib.Path(run_dir).absolute()
    recorded = recorded_storage_url(run_dir)
    if recorded is not None:
        if requested is not None and requested != recorded:
            raise ValueError(f"storage: the run in {run_dir} keeps its checkpoints at {recorded!r}, "
                             f"not {requested!r}; pass that URL or none")
        return recorded
    if requested is None and (run_dir / "checkpoints").is_dir():
        return str(run_dir)  # a run made before storage.json: its checkpoints are in place
    url = requested or default_storage_url(run_dir, process_count)
    if record:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STORAGE_FILE).write_text(json.dumps({"url": url}, indent=2) + "\n")
    return url


def open_run_storage(run_dir: str | pathlib.Path, requested: str | None = None, *, process_count: int = 1,
                     record: bool = False) -> Location:
    """The run's storage ``Location`` (created if missing); the caller closes it."""
    return open_location(run_storage_url(run_dir, requested, process_count=process_count, record=record),
                         create=True)
