"""``ThreeFSCheckpointHandler``: an Orbax ``CheckpointHandler`` that keeps pytrees of (sharded) arrays on a
3FS client, and its args ``ThreeFSSave(item)`` / ``ThreeFSRestore(target)``.

Orbax's own array handlers write through TensorStore, which reaches only POSIX and cloud paths; this one
writes through a ``FileClient`` (``storage/threefs/client/file_api.py``), so it runs on the embedded 3FS,
the TCP cluster and a FUSE mount alike. Directories are *client* paths (``/ckpt/7``), not OS paths.

Orbax's calling convention, which ``ThreeFSCheckpointManager`` follows (any process-coordinating caller can):

    handler.save(tmp_dir, args=ThreeFSSave(tree))    # every process: its shards (data-P.bin, shards-P.json)
    # barrier: every process has written
    handler.finalize(tmp_dir)                         # process 0: manifest.json, last
    # process 0 renames tmp_dir to the step's name: the commit
    handler.restore(step_dir, args=ThreeFSRestore(target))

``save`` is ``stage`` (device -> host, synchronous) followed by ``write`` (host -> storage), which the
manager runs in a background thread. The format is in ``manifest.py``.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import orbax.checkpoint as ocp

from storage.checkpoint.manifest import (DEFAULT_BLOCK_SIZE, MANIFEST, CheckpointCorruptionError, LeafEntry, Manifest,
                                         encode_json, manifest_body, shard_file)
from storage.checkpoint.restore import read_manifest, restore_tree
from storage.checkpoint.staging import Staged, stage, write_staged
from storage.checkpoint.tree import flatten, nested
from storage.threefs.client.file_api import FileClient
from storage.threefs.client.usrbio import default_workers
from storage.threefs.storage.crc32c import crc32c


class ThreeFSCheckpointHandler(ocp.CheckpointHandler):
    """Saves and restores one pytree per directory through ``client``.

    Args:
      client: the file client (a ``Location``'s ``client``).
      block_size: bytes per CRC32C of the shard data (a partial restore reads whole blocks).
      workers: threads for positional writes, reads and checksums (default: about the core count).
    """

    def __init__(self, client: FileClient, *, block_size: int = DEFAULT_BLOCK_SIZE, workers: int | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size={block_size}: expected a positive byte count")
        self.client = client
        self.block_size = block_size
        self._pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="3fs-checkpoint")
        self._entries: dict[str, tuple[LeafEntry, ...]] = {}  # directory -> leaves, from write to finalize
        self._spare = None  # a staging buffer a finished write gave back

    # ----------------------------------------------------------------------------- save

    def stage(self, item: Any) -> Staged:
        """This process's shards of ``item``, copied to host memory (synchronous)."""
        entries, leaves = flatten(item)
        buffer, self._spare = self._spare, None
        return stage(entries, leaves, process=jax.process_index(), buffer=buffer)

    def write(self, directory: Any, staged: Staged) -> None:
        """Writes a staged save into ``directory`` (it must exist); thread-safe against other handlers only."""
        directory = str(directory)
        write_staged(self.client, directory, staged, block_size=self.block_size, pool=self._pool)
        if staged.process == 0:  # the process that finalizes
            self._entries[directory] = staged.entries
        self._spare = staged.buffer

    def save(self, directory: Any, args: "ThreeFSSave") -> None:
        """``stage`` then ``write``: this process's part of a save, synchronously."""
        self.write(directory, self.stage(args.item))

    def finalize(self, directory: Any, process_count: int | None = None) -> None:
        """Process 0, after every process wrote: ``manifest.json`` listing each process's shard index with
        its CRC32C. Raises FileNotFoundError naming an index that is missing."""
        directory = str(directory)
        process_count = jax.process_count() if process_count is None else process_count
        entries = self._entries.pop(directory, None)
        if entries is None:
            raise ValueError(f"checkpoint: finalize({directory!r}) without a write by this handler")
        indexes = {}
        for process in range(process_count):
            name = shard_file("shards", process)
            with self.client.open(f"{directory}/{name}", "rb") as file:
                indexes[name] = crc32c(file.read())
        with self.client.open(f"{directory}/{MANIFEST}", "wb") as file:
            file.write(encode_json(manifest_body(Manifest(entries, self.block_size, indexes))))
            file.fsync()

    # ----------------------------------------------------------------------------- restore

    def restore(self, directory: Any, args: "ThreeFSRestore | None" = None) -> Any:
        """The saved tree (see ``restore.restore_tree``: in ``args.target``'s structure, shardings and
        dtypes, or as nested dicts of numpy arrays without a target). Checksums are verified; damage
        raises ``CheckpointCorruptionError`` naming the file."""
        return restore_tree(self.client, str(directory), None if args is None else args.target, self._pool)

    def metadata(self, directory: Any) -> Any:
        """The saved tree as nested dicts of ``jax.ShapeDtypeStruct`` (scalars as their values)."""
        manifest, _ = read_manifest(self.client, str(directory))
        return nested(list(manifest.leaves), [e.value if e.kind == "scalar" else jax.ShapeDtypeStruct(e.shape, e.dtype)
                                              for e in manifest.leaves])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._spare = None


@ocp.args.register_with_handler(ThreeFSCheckpointHandler, for_save=True)
@dataclasses.dataclass
class ThreeFSSave(ocp.args.CheckpointArgs):
    """Save ``item``: a pytree of ``jax.Array`` (any sharding), numpy arrays and Python scalars."""

    item: Any


@ocp.args.register_with_handler(ThreeFSCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class ThreeFSRestore(ocp.args.CheckpointArgs):
    """Restore into ``target``'s structure: leaves ``jax.ShapeDtypeStruct`` (with the wanted sharding) or
    ``jax.Array``, numpy arrays, scalars. None: nested dicts of numpy arrays."""

    target: Any = None


__all__ = ["CheckpointCorruptionError", "ThreeFSCheckpointHandler", "ThreeFSRestore", "ThreeFSSave"]
