"""storage.threefs: a compact Python 3FS (see README.md in this directory).

``connect(url)`` is the entry point; ``EmbeddedCluster`` runs a whole cluster in this process,
``ProcessCluster`` as server processes on loopback; ``IoVec`` / ``IoRing`` are USRBIO-style batched IO.
"""

from storage.threefs.client.client import Client
from storage.threefs.cluster import ClusterShape, EmbeddedCluster
from storage.threefs.connect import connect
from storage.threefs.client.file_api import FileStat
from storage.threefs.client.usrbio import IoRing, IoVec

__all__ = ["Client", "ClusterShape", "EmbeddedCluster", "FileStat", "IoRing", "IoVec", "connect"]
