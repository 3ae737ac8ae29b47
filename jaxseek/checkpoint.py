"""Orbax checkpoints of the training state, plus the configs that built it.

``Checkpointer`` saves every ``checkpoint_every`` steps and at the end; each step is written to a
temporary directory and renamed when complete, so an interrupted save never reads as a checkpoint.
Where the steps live: ``directory/checkpoints`` (plain Orbax) without a ``location``; at a location with
an OS path (a plain directory or a 3FS mount), plain Orbax there; at any other location (an embedded or
TCP 3FS), ``storage.checkpoint.ThreeFSCheckpointManager`` through the 3FS client (asynchronous saves,
atomic commits, checksums verified on restore). The configs stay in the local run directory.
``config.json`` beside the steps records the model and training configs; resuming with different
model shapes fails with a clear error instead of a shape mismatch deep inside Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxseek.config import EPLBConfig, MLAConfig, ModelConfig, MoEConfig, PipelineConfig, TrainConfig
from storage.checkpoint import ThreeFSCheckpointManager, ThreeFSRestore, ThreeFSSave
from jaxseek.run_storage import open_run_storage
from storage.location import Location

CONFIG_FILE = "config.json"


def configs_to_json(mc: ModelConfig, tc: TrainConfig) -> str:
    return json.dumps({"model": dataclasses.asdict(mc), "train": dataclasses.asdict(tc)}, indent=2, sort_keys=True)


def configs_from_json(text: str) -> tuple[ModelConfig, TrainConfig]:
    raw = json.loads(text)
    model = dict(raw["model"])
    model["mla"], model["moe"] = MLAConfig(**model["mla"]), MoEConfig(**model["moe"])
    train = dict(raw["train"])
    train["eplb"] = EPLBConfig(**train.get("eplb", {}))
    train["pipeline"] = PipelineConfig(**train.get("pipeline", {}))
    return ModelConfig(**model), TrainConfig(**train)


def load_configs(directory: str | pathlib.Path) -> tuple[ModelConfig, TrainConfig]:
    """The (model, train) configs a run in ``directory`` was started with."""
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"checkpoint: {path} does not exist; is {directory} a jaxseek run directory?")
    return configs_from_json(path.read_text())


class Checkpointer:
    """Saves and restores a training-state pytree: under ``directory/checkpoints`` (``location`` None), or at
    ``location`` (see the module docstring; the caller keeps and closes the location). ``directory`` is
    the run directory, where the configs are."""

    def __init__(self, directory: str | pathlib.Path, *, save_every: int, max_to_keep: int = 2,
                 location: Location | None = None):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=max_to_keep, create=True)
        self._threefs = location is not None and location.os_path is None
        if self._threefs:
            self._manager = ThreeFSCheckpointManager(location, options)
        else:
            steps = self.directory / "checkpoints" if location is None else pathlib.Path(location.os_path)
            self._manager = ocp.CheckpointManager(steps.absolute(), options=options)
        self._owned: Location | None = None

    @classmethod
    def for_run(cls, run_dir: str | pathlib.Path, *, save_every: int, storage: str | None = None,
                record: bool = False) -> "Checkpointer":
        """The checkpointer of the run in ``run_dir``, on the storage it recorded (``jaxseek.run_storage``;
        ``storage`` and ``record`` as there); it closes that storage when it closes."""
        location = open_run_storage(run_dir, storage, record=record)
        try:
            checkpointer = cls(run_dir, save_every=save_every, location=location.child("checkpoints"))
        except BaseException:
            location.close()
            raise
        checkpointer._owned = location
        return checkpointer

    def write_configs(self, mc: ModelConfig, tc: TrainConfig) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / CONFIG_FILE).write_text(configs_to_json(mc, tc))

    def check_configs(self, mc: ModelConfig, tc: TrainConfig | None) -> None:
        """Raises ValueError if the run in this directory was started with other configs (an exact resume
        needs the same model and the same schedule, data order and checkpoint cadence). ``tc=None`` checks
        the model only (a run at step 0, e.g. a converted checkpoint, may start any schedule)."""
        saved_model, saved_train = load_configs(self.directory)
        pairs = (("model", saved_model, mc),) + ((("training", saved_train, tc),) if tc is not None else ())
        for kind, saved, given in pairs:
            changed = [f.name for f in dataclasses.fields(given) if getattr(saved, f.name) != getattr(given, f.name)]
            if changed:
                raise ValueError(f"resume: the {kind} config differs from the run's in {changed}; "
                                 "resume with the settings the run was started with")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves ``state`` at ``step`` if the interval says so (or ``force``); returns whether it saved."""
        if self._threefs:
            return self._manager.save(step, args=ThreeFSSave(state), force=force)
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, step: int, like: Any) -> Any:
        """Restores the state saved at ``step`` with the structure, dtypes and shardings of ``like``."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        if self._threefs:
            return self._manager.restore(step, args=ThreeFSRestore(target))
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
        if self._owned is not None:
            self._owned.close()
