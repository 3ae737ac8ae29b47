"""The 3FS fault drill: SIGKILL and SIGSTOP of storage, meta and mgmtd servers during writes.

A ``ProcessCluster`` (3 storage nodes x 2 targets, 3 replicas, 64 KiB chunks, short heartbeat timings)
runs ``--trials`` trials of ``storage.threefs.cluster.fault_drill``: each writes 16 KiB records to a new
file through one client while another handle re-reads them, kills or pauses one server for
``--fault-seconds``, restores it, writes on, and then checks the file. The drill passes when no trial lost
an acknowledged byte, invented a byte (a size past the acknowledged end, or bytes never written) or had a
concurrent read return other bytes than written. Also reported, per (fault, server role): the longest
stall between two acknowledged writes and the time from restoring the server to the next acknowledged
write.

    python benchmarks/threefs_faults.py                 # 60 trials, ~5-8 min on 2 cores
    python benchmarks/threefs_faults.py --trials 12     # one round of every (fault, server)

Writes benchmarks/results/threefs_faults.json; exits 1 if any trial lost or invented a byte.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

from storage.threefs.cluster import ClusterShape, ProcessCluster, ServerTimings  # noqa: E402
from storage.threefs.cluster.fault_drill import run_drill  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHAPE = ClusterShape(nodes=3, targets_per_node=2, replicas=3, chunk_size=64 << 10, stripe=2)
TIMINGS = ServerTimings(heartbeat_interval=0.1, heartbeat_timeout=1.0, session_lease=5.0)


def summary(results) -> Table:
    table = Table(title="3FS fault drill")
    for column in ("fault", "server", "trials", "ok", "records", "write retries", "read errors",
                   "max stall s", "recovery s (max)"):
        table.add_column(column, justify="right")
    groups = collections.defaultdict(list)
    for r in results:
        groups[(r.fault, r.server.split("-")[0])].append(r)
    for (fault, role), rs in sorted(groups.items()):
        table.add_row(fault, role, str(len(rs)), str(sum(r.ok for r in rs)), str(sum(r.records for r in rs)),
                      str(sum(r.write_retries for r in rs)), str(sum(r.read_errors for r in rs)),
                      f"{max(r.max_write_stall_s for r in rs):.2f}", f"{max(r.recovery_s for r in rs):.2f}")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--fault-seconds", type=float, default=1.5, help="how long a server stays dead or paused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "threefs_faults.json")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    console = Console()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="3fs-drill-") as tmp, \
            ProcessCluster(pathlib.Path(tmp) / "cluster", SHAPE, TIMINGS) as cluster, \
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     console=console) as progress:
        task = progress.add_task("fault trials", total=args.trials)

        def on_trial(result) -> None:
            progress.advance(task)
            if not result.ok:
                progress.console.print(f"[red]trial {result.trial} FAILED: {result}")

        results = run_drill(cluster, args.trials, seed=args.seed, on_trial=on_trial,
                            fault_seconds=args.fault_seconds)
    console.print(summary(results))
    failed = [r for r in results if not r.ok]
    report = {
        "command": "python benchmarks/threefs_faults.py " + " ".join(sys.argv[1:]),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "shape": dataclasses.asdict(SHAPE), "timings": dataclasses.asdict(TIMINGS),
        "seconds": round(time.monotonic() - started, 1), "trials": len(results), "failed": len(failed),
        "lost_bytes": sum(r.lost_bytes for r in results), "invented_bytes": sum(r.invented_bytes for r in results),
        "bad_reads": sum(r.bad_reads for r in results),
        "results": [dataclasses.asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    console.print(f"{len(results) - len(failed)}/{len(results)} trials kept every byte; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
