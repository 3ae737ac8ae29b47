"""storage.threefs against plain file IO, on one disk, in one run.

Three sections, each over the embedded 3FS client (``EmbeddedCluster``: every service in this process),
the process-cluster client (``ProcessCluster``: mgmtd, meta and 3 storage servers as child processes on
loopback TCP; ``--no-processes`` skips it) and plain Python file IO in a sibling directory:

* **data**: a sequential write and read of one file (``--size``, 1 MiB requests), random 4 KiB reads
  (``--requests``) and random 4 KiB writes (``--writes``). MiB/s, IOPS, the ratio to plain file IO, and
  the bytes the processes dirtied in the page cache per logical byte written (``/proc/<pid>/io``
  ``write_bytes``, this process plus the server processes): 3FS writes go to 3 replicas, and a write
  smaller than a chunk rewrites the whole chunk (copy-on-write) on each of them.
* **batched**: USRBIO-style ``IoRing`` batches (``--batch`` IOs, ``io_depth`` 0, workers ~ the cores) against a loop
  of ``pread_into`` calls, for random 4 KiB reads and 1 MiB reads; plain files (through ``MountClient``,
  the same ``File`` API) as the reference.
* **metadata**: create (open ``wb`` + close of an empty file), stat, listdir of the directory holding
  the ``--files`` files, and remove, against the same calls on plain ``os``.

Every number is the median over ``--repeats`` rounds; backends take turns within a round. Reads are
checked against what was written (outside the timed region). All data lives under ``--root`` (default:
a temporary directory, removed at the end).

The backends and measuring helpers are in ``storage_backends.py``, the tables in ``storage_report.py``.

    python benchmarks/threefs_storage.py            # ~2-4 min on 2 cores; writes benchmarks/results/storage.json
    python benchmarks/threefs_storage.py --quick    # small sizes, < 30 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

from storage.threefs.cluster import ClusterShape, EmbeddedCluster  # noqa: E402
from storage.threefs.cluster.processes import ProcessCluster  # noqa: E402
from storage.threefs.client.usrbio import IoRing, IoVec, default_workers  # noqa: E402
from storage.threefs.fuse.mount import fuse_unavailable_reason  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the sibling modules below
from storage_backends import MIB, SMALL, FuseMount, Plain, ThreeFS, aligned_offsets, timed  # noqa: E402
from storage_report import (batched_table, data_table, goals_table, median_rows, metadata_table, summary_table,  # noqa: E402
                            versions)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHAPE = ClusterShape(nodes=3, targets_per_node=4, replicas=3, chunk_size=MIB, stripe=4)  # the default: 4 chains


# ----------------------------------------------------------------------------- the sections


def data_round(backend, args, rng: random.Random, round_index: int) -> dict[str, dict]:
    """One round of the data section on one backend: {op: {seconds, bytes, requests, dirtied}}."""
    path = f"/data/seq-{round_index}.bin"
    source = bytearray(rng.randbytes(args.size))
    out = bytearray(args.size)
    rows: dict[str, dict] = {}

    def record(op: str, seconds: float, nbytes: int, requests: int, dirtied: int | None = None) -> None:
        rows[op] = {"seconds": seconds, "bytes": nbytes, "requests": requests, "dirtied": dirtied}

    backend.makedirs("/data")
    seconds, dirtied = timed(lambda: backend.write_sequential(path, memoryview(source), MIB), backend.pids)
    record("seq write 1 MiB", seconds, args.size, args.size // MIB, dirtied)

    seconds, _ = timed(lambda: backend.read_sequential(path, out, MIB))
    assert out == source, f"{backend.name}: sequential read differs from what was written"
    record("seq read 1 MiB", seconds, args.size, args.size // MIB)

    offsets = aligned_offsets(rng, args.requests, args.size, SMALL)
    small = bytearray(args.requests * SMALL)
    seconds, _ = timed(lambda: backend.read_random(path, small, offsets, SMALL))
    for i, offset in enumerate(offsets):
        assert small[i * SMALL:(i + 1) * SMALL] == source[offset:offset + SMALL], f"{backend.name}: random read"
    record("rand read 4 KiB", seconds, len(small), args.requests)

    if getattr(backend, "cold_reads", False):  # the same reads with the file's pages evicted first
        backend.drop_cache(path)
        seconds, _ = timed(lambda: backend.read_sequential(path, out, MIB))
        record("cold seq read 1 MiB", seconds, args.size, args.size // MIB)
        backend.drop_cache(path)
        seconds, _ = timed(lambda: backend.read_random(path, small, offsets, SMALL))
        record("cold rand read 4 KiB", seconds, len(small), args.requests)

    write_offsets = aligned_offsets(rng, args.writes, args.size, SMALL)
    payload = rng.randbytes(args.writes * SMALL)
    seconds, dirtied = timed(lambda: backend.write_random(path, memoryview(payload), write_offsets, SMALL),
                             backend.pids)
    record("rand write 4 KiB", seconds, len(payload), args.writes, dirtied)
    for i, offset in enumerate(write_offsets):
        source[offset:offset + SMALL] = payload[i * SMALL:(i + 1) * SMALL]
    backend.read_sequential(path, out, MIB)
    assert out == source, f"{backend.name}: file content after random writes differs"
    backend.remove(path)
    return rows


def ring_reads(file, iov: IoVec, ring: IoRing, offsets: list[int], size: int, batch: int) -> None:
    for start in range(0, len(offsets), batch):
        chunk = offsets[start:start + batch]
        for i, offset in enumerate(chunk):
            ring.prepare(iov[i * size:(i + 1) * size], True, file, offset, i)
        ring.submit()
        done = ring.wait(min_results=len(chunk))
        if len(done) != len(chunk) or any(c.result != size for c in done):
            raise RuntimeError(f"IoRing: {len(done)} of {len(chunk)} reads done, results "
                               f"{sorted({c.result for c in done})} (expected {size} each)")


def loop_reads(file, out: bytearray, offsets: list[int], size: int) -> None:
    view = memoryview(out)
    for offset in offsets:
        file.pread_into(view[:size], offset)


def batched_round(backend, args, source: bytes, path: str, rng: random.Random, iov: IoVec,
                  ring: IoRing) -> dict[str, dict]:
    """Loop of pread_into vs IoRing batches for random 4 KiB reads and 1 MiB reads."""
    rows = {}
    cases = (("rand read 4 KiB", SMALL, aligned_offsets(rng, args.requests, args.size, SMALL)),
             ("read 1 MiB", MIB, list(range(0, args.size, MIB))))
    scratch = bytearray(MIB)
    with memoryview(iov) as whole:  # fault the shared memory in once, as a reused Iov would be
        whole[:] = bytes(len(whole))
    with backend.open_file(path) as file:
        ring_reads(file, iov, ring, cases[0][2][:args.batch], SMALL, args.batch)  # start the ring's threads
        loop_reads(file, scratch, cases[0][2][:args.batch], SMALL)  # and warm the loop path alike
        for op, size, offsets in cases:
            loop_s, _ = timed(lambda: loop_reads(file, scratch, offsets, size))
            ring_s, _ = timed(lambda: ring_reads(file, iov, ring, offsets, size, args.batch))
            last = offsets[(len(offsets) - 1) // args.batch * args.batch:]
            with memoryview(iov) as whole:  # the last batch landed in the IoVec
                for i, offset in enumerate(last):
                    assert whole[i * size:(i + 1) * size] == source[offset:offset + size], f"{backend.name}: {op}"
            rows[op] = {"loop_seconds": loop_s, "ring_seconds": ring_s, "requests": len(offsets),
                        "bytes": len(offsets) * size}
    return rows


def metadata_round(backend, args, round_index: int) -> dict[str, dict]:
    directory = f"/meta/round-{round_index}"
    backend.makedirs(directory)
    paths = [f"{directory}/f{i:06d}" for i in range(args.files)]
    rows = {}
    seconds, _ = timed(lambda: backend.create_empty(paths))
    rows["create (open wb + close)"] = {"seconds": seconds, "ops": len(paths)}
    seconds, _ = timed(lambda: backend.stat_all(paths))
    rows["stat"] = {"seconds": seconds, "ops": len(paths)}
    listed: list[list[str]] = []
    seconds, _ = timed(lambda: listed.extend(backend.listdir(directory) for _ in range(args.listdirs)))
    assert all(len(names) == args.files for names in listed), f"{backend.name}: listdir lost entries"
    rows[f"listdir ({args.files} entries)"] = {"seconds": seconds, "ops": args.listdirs,
                                               "entries": args.listdirs * args.files}
    seconds, _ = timed(lambda: backend.remove_all(paths))
    rows["remove"] = {"seconds": seconds, "ops": len(paths)}
    backend.remove(directory)
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round (< 30 s)")
    parser.add_argument("--size", type=int, help="file size in MiB (default 64; quick 8)")
    parser.add_argument("--requests", type=int, help="random 4 KiB reads (default 2000; quick 300)")
    parser.add_argument("--writes", type=int, help="random 4 KiB writes (default 500; quick 60)")
    parser.add_argument("--files", type=int, help="files for the metadata section (default 1000; quick 150)")
    parser.add_argument("--listdirs", type=int, help="listdir calls per round (default 20; quick 5)")
    parser.add_argument("--batch", type=int, default=64, help="IOs per IoRing batch (default 64)")
    parser.add_argument("--repeats", type=int, help="rounds; every number is their median (default 5; quick 1)")
    parser.add_argument("--root", type=pathlib.Path, help="directory for all data (default: a temp dir)")
    parser.add_argument("--no-processes", action="store_true", help="skip the process cluster")
    parser.add_argument("--no-fuse", action="store_true", help="skip the FUSE mount's data rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "storage.json")
    args = parser.parse_args()
    quick = args.quick
    args.size = (args.size or (8 if quick else 64)) * MIB
    args.requests = args.requests or (300 if quick else 2000)
    args.writes = args.writes or (60 if quick else 500)
    args.files = args.files or (150 if quick else 1000)
    args.listdirs = args.listdirs or (5 if quick else 20)
    args.repeats = args.repeats or (1 if quick else 5)

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: wide enough for one line per row
        console = Console(width=max(console.width, 200))
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    started, load_before = time.perf_counter(), os.getloadavg()
    with contextlib.ExitStack() as stack:
        if args.root is None:
            root = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="threefs-bench-")))
        else:
            root = args.root.resolve()
            root.mkdir(parents=True, exist_ok=True)
        for sub in ("embedded", "processes", "plain", "fuse-cluster", "fuse-mount"):
            if (root / sub).exists():
                raise SystemExit(f"{root / sub} exists: give an empty --root (clusters start fresh)")
        console.print(f"[bold]storage.threefs benchmark[/] on {root} ({shutil.disk_usage(root).free / 2**30:.0f} "
                      f"GiB free), {os.cpu_count()} CPUs, load {load_before[0]:.2f}; {SHAPE}")

        embedded = stack.enter_context(EmbeddedCluster(root / "embedded", SHAPE, heartbeat_interval=0.2))
        backends: list = [Plain(root / "plain"),
                          ThreeFS("embedded", stack.enter_context(embedded.client()), [os.getpid()])]
        if not args.no_processes:
            processes = stack.enter_context(ProcessCluster(root / "processes", SHAPE))
            client = stack.enter_context(processes.client())
            backends.append(ThreeFS("processes", client,
                                    [os.getpid(), *(p.pid for p in processes.processes.values())]))
        mounted = []  # the FUSE mount: data rows only
        if not args.no_fuse:
            reason = fuse_unavailable_reason()
            if reason is None:
                stack.enter_context(FuseMount(root / "fuse-cluster", root / "fuse-mount"))
                mounted.append(Plain(root / "fuse-mount", name="fuse"))
            else:
                console.print(f"FUSE mount rows skipped: {reason}")
        for backend in backends + mounted:  # connections, routing caches
            backend.makedirs("/warmup")
            backend.listdir("/")
        rng = random.Random(args.seed)

        steps = args.repeats * (len(backends) * 3 + len(mounted))
        data_rounds = {b.name: [] for b in backends + mounted}
        batched_rounds = {b.name: [] for b in backends}
        meta_rounds = {b.name: [] for b in backends}
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("starting", total=steps)

            def step(text: str) -> None:
                progress.update(task, description=text)

            for round_index in range(args.repeats):
                for backend in backends + mounted:
                    step(f"round {round_index + 1}/{args.repeats}: data IO, {backend.name}")
                    data_rounds[backend.name].append(data_round(backend, args, rng, round_index))
                    progress.advance(task)
                for backend in backends:
                    step(f"round {round_index + 1}/{args.repeats}: IoRing vs loop, {backend.name}")
                    source = rng.randbytes(args.size)
                    path = f"/batched/file-{round_index}.bin"
                    backend.makedirs("/batched")
                    backend.write_sequential(path, memoryview(source), MIB)
                    with IoVec(args.batch * MIB) as iov, IoRing(args.batch, for_read=True, io_depth=0) as ring:
                        batched_rounds[backend.name].append(
                            batched_round(backend, args, source, path, rng, iov, ring))
                    backend.remove(path)
                    progress.advance(task)
                for backend in backends:
                    step(f"round {round_index + 1}/{args.repeats}: metadata, {backend.name}")
                    meta_rounds[backend.name].append(metadata_round(backend, args, round_index))
                    progress.advance(task)
            step("done")

        data = {name: median_rows(rounds) for name, rounds in data_rounds.items()}
        cold = {op.removeprefix("cold "): row for op, row in data["plain"].items() if op.startswith("cold ")}
        data["plain"] = {op: row for op, row in data["plain"].items() if not op.startswith("cold ")}
        data = {"plain": data["plain"], "plain-cold": cold, **{k: v for k, v in data.items() if k != "plain"}}
        batched = {name: median_rows(rounds) for name, rounds in batched_rounds.items()}
        meta = {name: median_rows(rounds) for name, rounds in meta_rounds.items()}

        tables = [data_table(data), batched_table(batched, args.batch), metadata_table(meta)]
        for table, _ in tables:
            console.print(table)
        summary, summary_json = summary_table(tables[0][1], tables[1][1], tables[2][1])
        console.print(summary)
        goals, goals_json = goals_table(tables[0][1], tables[1][1], tables[2][1])
        console.print(goals)

    wall = time.perf_counter() - started
    report = {
        "benchmark": "storage.threefs vs plain file IO",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": versions(),
        "config": {"quick": quick, "file_bytes": args.size, "request_bytes": MIB, "small_bytes": SMALL,
                   "random_reads": args.requests, "random_writes": args.writes, "files": args.files,
                   "listdirs": args.listdirs, "batch": args.batch, "io_depth": 0, "ring_workers": default_workers(),
                   "client_io_threads": 8, "repeats": args.repeats, "seed": args.seed,
                   "root": "temporary directory" if args.root is None else str(args.root),
                   "cluster_shape": {"nodes": SHAPE.nodes, "targets_per_node": SHAPE.targets_per_node,
                                     "replicas": SHAPE.replicas, "chunk_size": SHAPE.chunk_size,
                                     "stripe": SHAPE.stripe},
                   "processes": not args.no_processes, "fuse_mount": bool(mounted)},
        "notes": ["Every figure is the median over rounds; *_all_rounds lists each round.",
                  "3FS writes are acknowledged after all 3 replicas (CRAQ) committed: each replica writes the "
                  "changed 4 KiB blocks into the chunk's spare slot file (copy-on-write per block) and commits "
                  "with one SQLite statement; storage fsyncs in groups (every 50 ms) and on the client's "
                  "fsync/close. Plain writes go once to the page cache, one fsync at the end.",
                  "dirtied_bytes_per_logical_byte: /proc/<pid>/io write_bytes - cancelled_write_bytes of this "
                  "process (and the server processes) during the timed writes, over the bytes written.",
                  "Reads of every backend come from a warm page cache (plain-cold rows: after "
                  "POSIX_FADV_DONTNEED). A 3FS read preadv's and CRC32C-checks only the 4 KiB blocks it overlaps.",
                  "Everything is Python: per-request costs (codec RPC, SQLite, thread hand-offs) dominate small IO.",
                  "The machine was shared with other jobs; see loadavg."],
        "data": tables[0][1], "batched": tables[1][1], "metadata": tables[2][1], "summary": summary_json, "goals": goals_json,
        "wall_seconds": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    console.print(f"wall time {wall:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
