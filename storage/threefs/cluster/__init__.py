"""cluster: running a whole 3FS: in this process (`EmbeddedCluster`) or as server processes (`ProcessCluster`).

Roles: `shape.py` (`ClusterShape`, directory locks), `embedded.py` (every service in one process,
heartbeats on a thread), `processes.py` (`python -m storage.threefs serve`, `ProcessCluster` to start,
kill and restart servers, and clients of it).
"""

from storage.threefs.cluster.embedded import EmbeddedCluster
from storage.threefs.cluster.processes import ProcessCluster
from storage.threefs.cluster.shape import ClusterShape, lock_directory, target_dir

__all__ = ["ClusterShape", "EmbeddedCluster", "ProcessCluster", "lock_directory", "target_dir"]
