"""Orbax checkpoints on the 3FS client: pytrees of sharded ``jax.Array``s saved through a ``FileClient``.

Roles: ``manifest.py`` (the on-storage format: manifest, shard indexes, CRC32C per block, boxes),
``tree.py`` (pytrees <-> named leaves), ``staging.py`` (device -> host copy, then positional writes),
``restore.py`` (reads of only the overlapping byte ranges onto any target sharding, verified),
``handler.py`` (``ThreeFSCheckpointHandler``, an Orbax ``CheckpointHandler``, with its args
``ThreeFSSave``/``ThreeFSRestore``), ``manager.py`` (``ThreeFSCheckpointManager``: steps, asynchronous
saves, atomic commits by rename, ``max_to_keep``), ``crash_drill.py`` (SIGKILL a saving process, check
what stays visible).
"""

from storage.checkpoint.handler import ThreeFSCheckpointHandler, ThreeFSRestore, ThreeFSSave
from storage.checkpoint.manager import ThreeFSCheckpointManager
from storage.checkpoint.manifest import CheckpointCorruptionError

__all__ = ["CheckpointCorruptionError", "ThreeFSCheckpointHandler", "ThreeFSCheckpointManager", "ThreeFSRestore",
           "ThreeFSSave"]
