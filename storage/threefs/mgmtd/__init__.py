"""mgmtd: the cluster manager (chain table, target states, heartbeats, node addresses) and routing.

`routing.py` holds the immutable snapshot every other service routes by (`RoutingInfo`); `manager.py`
holds `Manager`, which owns it: storage nodes heartbeat to it, it moves target states with 3FS's
transition table and bumps chain versions. Contract: mgmtd is off the data path; clients and storage
servers act on the last routing they were handed.
"""

from storage.threefs.mgmtd.manager import Manager
from storage.threefs.mgmtd.routing import Chain, ChainTable, LocalState, RoutingInfo, TargetState

__all__ = ["Chain", "ChainTable", "LocalState", "Manager", "RoutingInfo", "TargetState"]
