"""cluster: running a whole 3FS: in this process (`EmbeddedCluster`) or as server processes (`ProcessCluster`).

Roles: `shape.py` (`ClusterShape`, `ServerTimings`, directory locks), `embedded.py` (every service in one
process, heartbeats on a thread), `servers.py` (`python -m storage.threefs serve`: one server process),
`processes.py` (`ProcessCluster`: start, kill, pause, resume and restart server processes; their clients),
`deadlines.py` (`RequestDeadlines`: how long a data-path, peer or bulk request may wait, from the timings).
"""

from storage.threefs.cluster.embedded import EmbeddedCluster
from storage.threefs.cluster.processes import ProcessCluster
from storage.threefs.cluster.shape import ClusterShape, ServerTimings, lock_directory, target_dir

__all__ = ["ClusterShape", "EmbeddedCluster", "ProcessCluster", "ServerTimings", "lock_directory", "target_dir"]
