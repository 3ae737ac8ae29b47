"""mgmtd: the cluster manager (chain table, target states, heartbeats, node addresses) and routing.

`routing.py` holds the immutable snapshot every other service routes by (`RoutingInfo`); `manager.py`
holds `Manager`, which owns it: storage nodes heartbeat to it, it moves target states with 3FS's
transition table and bumps chain versions. `state.py` keeps its persistent state in the cluster's KV
store (``MGMT/state``); `election.py` elects one leader among any number of mgmtd servers through KV
transactions (a lease under ``MGMT/leader``), the others stand by and answer ``NotPrimary``.
Contract: mgmtd is off the data path; clients and storage servers act on the last routing they were
handed (storage only while its heartbeat lease holds); only the lease holder serves or writes state.
"""

from storage.threefs.mgmtd.manager import Manager
from storage.threefs.mgmtd.routing import Chain, ChainTable, LocalState, RoutingInfo, TargetState

__all__ = ["Chain", "ChainTable", "LocalState", "Manager", "RoutingInfo", "TargetState"]
