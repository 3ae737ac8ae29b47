"""The fault drill (``cluster/fault_drill.py``) once per fault kind: SIGKILL and SIGSTOP of a storage server,
the meta server and the mgmtd leader while a client writes and re-reads; nothing acknowledged is lost and
nothing is invented. ``benchmarks/threefs_faults.py`` runs the same drill for 60 trials."""

from __future__ import annotations

from storage.threefs.cluster import ClusterShape, ProcessCluster, ServerTimings
from storage.threefs.cluster.fault_drill import FAULTS, LEADER, run_drill

SHAPE = ClusterShape(nodes=3, targets_per_node=1, replicas=3, chunk_size=64 << 10, stripe=1)
TIMINGS = ServerTimings(heartbeat_interval=0.1, heartbeat_timeout=1.0, session_lease=5.0)


def test_kills_and_pauses_of_storage_meta_and_mgmtd_lose_and_invent_nothing(tmp_path):
    servers = ["storage-2", "meta", LEADER]
    with ProcessCluster(tmp_path / "cluster", SHAPE, TIMINGS) as cluster:
        results = run_drill(cluster, len(servers) * len(FAULTS), servers=servers, fault_seconds=1.0,
                            warmup_records=4, records_after_fault=4)
    assert {(r.fault, r.server.split("-")[0]) for r in results} == {
        (fault, role) for fault in FAULTS for role in ("storage", "meta", "mgmtd")}
    for r in results:
        assert r.ok, r
        assert r.records >= 8, r  # writes went on after the fault
