"""``ThreeFSCheckpointManager``: Orbax's ``CheckpointManager`` habits over a 3FS location.

    manager = ThreeFSCheckpointManager("3fs+embedded:///runs/a/3fs/checkpoints",
                                       ocp.CheckpointManagerOptions(save_interval_steps=100, max_to_keep=3))
    manager.save(step, args=ThreeFSSave(state))       # returns once the state is copied to host memory
    ...                                               # training goes on while a thread writes it
    manager.wait_until_finished()                      # joins the write; re-raises its error
    state = manager.restore(manager.latest_step(), args=ThreeFSRestore(abstract_state_with_shardings))

Steps are directories named by the step number. A save writes into ``.tmp-STEP`` (every process its
shards, fsynced; after a barrier process 0 writes the manifest, fsynced), then process 0 renames
``.tmp-STEP`` to ``STEP`` in one metadata transaction: that rename is the commit. A crash at any moment
leaves either the old set of steps or the new one; an unfinished ``.tmp-*`` is never listed, and the next
manager to start removes it. ``max_to_keep`` removes the oldest steps after a commit, each by a rename to
``.deleting-STEP`` (it leaves the listing atomically) and then a recursive removal.

Options (``ocp.CheckpointManagerOptions``): ``save_interval_steps``, ``save_on_steps``, ``max_to_keep``,
``create``, ``enable_async_checkpointing``, ``read_only``; other retention policies raise ValueError.
Like Orbax, ``should_save`` is true for the first save of a run, for a step on the interval (or in
``save_on_steps``), and never for a step at or before the last one saved. ``latest_step``/``all_steps``
list committed steps only (``wait_until_finished`` first to include the one being written).

Processes: every process of a multi-process run makes its own manager on the same location (a shared
3FS: ``3fs+tcp://`` or a mount) and calls ``save`` with the same step; the barriers go through JAX's
coordination service (``wait_at_barrier``, what Orbax's own async saves use), which a background thread
may call; a device collective (``sync_global_devices``) could not run there without racing the training
steps' collectives.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from storage.checkpoint.handler import ThreeFSCheckpointHandler, ThreeFSRestore
from storage.checkpoint.manifest import DEFAULT_BLOCK_SIZE
from storage.checkpoint.staging import Staged
from storage.location import Location, open_location

TMP_PREFIX = ".tmp-"
DELETING_PREFIX = ".deleting-"
_UNSUPPORTED = ("keep_time_interval", "keep_period", "best_fn", "should_save_fn", "todelete_subdir",
                "save_decision_policy", "preservation_policy", "step_prefix", "step_name_format")
BARRIER_TIMEOUT_S = 1800.0


def sync_processes(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Blocks until every JAX process reached the barrier ``name`` (a no-op in a single process)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination service's client; Orbax's barriers use it too
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("checkpoint: several JAX processes but no coordination service "
                           "(jax.distributed.initialize was not called)")
    client.wait_at_barrier(name, int(timeout_s * 1000))


class ThreeFSCheckpointManager:
    """Numbered, atomically committed, asynchronously written checkpoints at a ``Location`` (or a URL,
    opened with ``create=options.create`` and closed by ``close``). See the module docstring."""

    def __init__(self, location: Location | str | os.PathLike, options: ocp.CheckpointManagerOptions | None = None,
                 *, block_size: int = DEFAULT_BLOCK_SIZE, workers: int | None = None):
        self._options = options or ocp.CheckpointManagerOptions()
        for name in _UNSUPPORTED:
            if getattr(self._options, name, None) is not None:
                raise ValueError(f"ThreeFSCheckpointManager: option {name} is not supported")
        self._owns_location = not isinstance(location, Location)
        self.location = open_location(location, create=self._options.create) if self._owns_location else location
        self.directory = self.location.url
        self._handler = ThreeFSCheckpointHandler(self.location.client, block_size=block_size, workers=workers)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_step: int | None = None
        client, root = self.location.client, self.location.path
        if jax.process_index() == 0 and not self._options.read_only:
            if self._options.create:
                client.makedirs(root, exist_ok=True)
            for name in client.listdir(root) if client.exists(root) else ():
                if name.startswith((TMP_PREFIX, DELETING_PREFIX)):
                    client.remove(self.location.join(name), recursive=True)  # a crashed save or deletion
        sync_processes(f"3fs-checkpoint {root}: opened")
        if not client.exists(root):
            raise FileNotFoundError(f"checkpoint: {self.directory} does not exist (create=False)")
        self._steps = self._scan()
        self._last_saved = self._steps[-1] if self._steps else None

    # ----------------------------------------------------------------------------- listing

    def _scan(self) -> list[int]:
        return sorted(int(name) for name in self.location.client.listdir(self.location.path) if name.isdigit())

    def reload(self) -> None:
        """Lists the steps again (another process or manager may have saved or removed some)."""
        with self._lock:
            self._steps = self._scan()

    def all_steps(self) -> list[int]:
        with self._lock:
            return list(self._steps)

    def latest_step(self) -> int | None:
        with self._lock:
            return self._steps[-1] if self._steps else None

    def should_save(self, step: int) -> bool:
        if self._options.read_only or (self._last_saved is not None and step <= self._last_saved):
            return False
        on_steps = self._options.save_on_steps
        interval = self._options.save_interval_steps
        return (self._last_saved is None or bool(interval and step % interval == 0)
                or bool(on_steps and step in on_steps))

    # ----------------------------------------------------------------------------- save

    def save(self, step: int, args: Any = None, *, force: bool = False) -> bool:
        """Saves ``args.item`` (``ThreeFSSave`` or ``ocp.args.StandardSave``) as ``step`` if ``should_save``
        says so, or ``force``; returns whether it saved. Joins the previous save first (re-raising its
        error), copies this process's shards to host memory, and returns while a thread writes them
        (unless ``enable_async_checkpointing`` is False)."""
        self.wait_until_finished()
        if self._options.read_only:
            raise ValueError(f"checkpoint: {self.directory} was opened read_only")
        if not (force or self.should_save(step)):
            return False
        if step in self.all_steps():
            raise ValueError(f"checkpoint: step {step} already exists at {self.directory}")
        item = getattr(args, "item", None)
        if item is None:
            raise TypeError(f"save: expected args=ThreeFSSave(item), got {args!r}")
        staged = self._handler.stage(item)
        self._last_saved, self._pending_step = step, step
        if not self._options.enable_async_checkpointing:
            self._commit(step, staged)
            self.wait_until_finished()
            return True
        self._thread = threading.Thread(target=self._commit, args=(step, staged), daemon=True,
                                        name=f"3fs-checkpoint-{step}")
        self._thread.start()
        return True

    def _commit(self, step: int, staged: Staged) -> None:
        """Writes, finalizes and commits one step; records an error for ``wait_until_finished``."""
        client = self.location.client
        tmp, final = self.location.join(f"{TMP_PREFIX}{step}"), self.location.join(str(step))
        barrier = f"3fs-checkpoint {self.location.path} step {step}"
        process = jax.process_index()
        try:
            if process == 0:
                if client.exists(tmp):
                    client.remove(tmp, recursive=True)
                client.makedirs(tmp, exist_ok=False)
            sync_processes(barrier + ": created")
            self._handler.write(tmp, staged)
            sync_processes(barrier + ": written")
            if process == 0:
                self._handler.finalize(tmp)
                client.rename(tmp, final, replace=False)  # the commit
            sync_processes(barrier + ": committed")
            with self._lock:
                self._steps = sorted(set(self._steps) | {step})
            self._prune()
        except BaseException as error:  # noqa: BLE001 - handed to the thread that waits
            self._error = error
            if jax.process_count() == 1 and client.exists(tmp):
                try:
                    client.remove(tmp, recursive=True)
                except OSError:
                    pass  # the next manager start removes it

    def _prune(self) -> None:
        keep = self._options.max_to_keep
        while keep is not None and len(self.all_steps()) > keep:
            self.delete(self.all_steps()[0])

    def delete(self, step: int) -> None:
        """Removes a committed step: out of the listing in one rename, then its files."""
        with self._lock:
            self._steps = [s for s in self._steps if s != step]
        if jax.process_index() == 0:
            doomed = self.location.join(f"{DELETING_PREFIX}{step}")
            self.location.client.rename(self.location.join(str(step)), doomed, replace=False)
            self.location.client.remove(doomed, recursive=True)

    def wait_until_finished(self) -> None:
        """Joins the save in flight; raises its error (once)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._pending_step = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def check_for_errors(self) -> None:
        """Raises a finished background save's error without waiting for one in flight."""
        if self._thread is None or not self._thread.is_alive():
            self.wait_until_finished()

    # ----------------------------------------------------------------------------- restore

    def restore(self, step: int | None = None, args: Any = None) -> Any:
        """The tree saved at ``step`` (default: the latest), in the structure and shardings of
        ``args.target`` (``ThreeFSRestore``; ``ocp.args.StandardRestore``'s ``item`` works too; None: nested
        dicts of numpy arrays). FileNotFoundError for a step that was not committed."""
        if step is not None and step == self._pending_step:
            self.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None or not self.location.client.exists(self.location.join(str(step))):
            raise FileNotFoundError(f"checkpoint: no step {step} at {self.directory} (steps: {self.all_steps()})")
        target = getattr(args, "target", getattr(args, "item", None))
        return self._handler.restore(self.location.join(str(step)), ThreeFSRestore(target))

    def item_metadata(self, step: int) -> Any:
        return self._handler.metadata(self.location.join(str(step)))

    def close(self) -> None:
        """Waits for the save in flight (raising its error), stops the IO threads, and closes a location
        this manager opened."""
        try:
            self.wait_until_finished()
        finally:
            self._handler.close()
            if self._owns_location:
                self.location.close()

    def __enter__(self) -> "ThreeFSCheckpointManager":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

