"""Benchmark of the data adapters: the Grain record source and polars tables, on 3FS against their peers.

``bench_data(work_dir, quick=..., console=...)`` returns one row per measurement (``storage_adapters.py``
prints and records them; ``python -m benchmarks.adapters_data [--quick] [--dir DIR]`` runs it alone):

* loader: samples/s of ``RecordSource.read_many`` (one IoRing batch per training batch of shuffled keys)
  against reading the same records one by one through the same client (``source[key]``: one positional
  read each), both verifying checksums, on an embedded 3FS and on a plain directory.
* tables: seconds for polars ``read_parquet`` of a whole table, of one column, and a ``scan_parquet``
  with a filter that keeps one row group in ten, through ``storage.tables`` on an embedded 3FS against
  polars' native reader on a local directory (the peer); ratio = peer seconds / adapter seconds.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import polars as pl

from storage import tables
from storage.loader import RecordSource, record_order, write_records
from storage.location import open_location
from storage.threefs.cluster.processes import ProcessCluster


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_loader(location, label: str, *, records: int, window: int, batch: int, batches: int,
                 io_workers: int | None = None) -> dict:
    data = np.random.default_rng(0).integers(0, 256, size=(records, window), dtype=np.uint8)
    write_records(location, "bench", data, records_per_shard=max(1, (64 << 20) // window), replace=True)
    order = record_order(records, seed=0)
    keys = [order.batch(step, batch) for step in range(batches)]  # drawn before timing
    with RecordSource(location, "bench", io_workers=io_workers) as source:
        source.read_many(keys[0])  # opens the shard files, sizes the ring

        def batched():
            for k in keys:
                source.read_many(k)

        def one_by_one():
            for k in keys:
                np.stack([source[int(i)] for i in k])
        assert np.array_equal(source.read_many(keys[1]), data[keys[1]])
        batched_s, single_s = best_of(batched, 3), best_of(one_by_one, 3)
    samples = batch * batches
    return {"operation": f"loader: {batches} shuffled batches of {batch} x {window} B records ({label})",
            "adapter": "RecordSource.read_many " + (f"(IoRing, {io_workers} workers)" if io_workers else "(inline preads)"), "peer": "source[key] one by one",
            "samples/s": samples / batched_s, "peer samples/s": samples / single_s, "ratio": single_s / batched_s}


def bench_tables(location, local: pathlib.Path, *, rows: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(1)
    frame = pl.DataFrame({"k": np.arange(rows)} | {f"c{i}": rng.random(rows) for i in range(15)}
                         | {"s": [f"row {i}" for i in range(rows)]})
    groups = rows // 10
    tables.write_parquet(frame, location.child("wide.parquet"), row_group_size=groups)
    frame.write_parquet(local / "wide.parquet", row_group_size=groups)
    size_mb = local.joinpath("wide.parquet").stat().st_size / 1e6
    cases = {
        "read_parquet (whole table)": (lambda src: tables.read_parquet(src), lambda p: pl.read_parquet(p)),
        "read_parquet (one column of 17)": (lambda src: tables.read_parquet(src, columns=["c7"]),
                                            lambda p: pl.read_parquet(p, columns=["c7"])),
        "scan_parquet + filter (1 row group of 10)": (
            lambda src: tables.scan_parquet(src).filter(pl.col("k") < groups).collect(),
            lambda p: pl.scan_parquet(p).filter(pl.col("k") < groups).collect()),
    }
    out = []
    for name, (ours, peer) in cases.items():
        source = location.child("wide.parquet")
        assert ours(source).equals(peer(local / "wide.parquet"))
        ours_s = best_of(lambda: ours(source), repeats)
        peer_s = best_of(lambda: peer(local / "wide.parquet"), repeats)
        out.append({"operation": f"polars {name}, {rows:,} rows, {size_mb:.1f} MB", "adapter": "storage.tables on 3FS",
                    "peer": "polars on a local directory", "seconds": ours_s, "peer seconds": peer_s,
                    "ratio": peer_s / ours_s})
    return out


def bench_data(work_dir: pathlib.Path, *, quick: bool, console) -> list[dict]:
    """Loader and table rows (see the module docstring); ``work_dir`` holds the clusters and files."""
    work_dir = pathlib.Path(work_dir)
    records, batches, rows = (4000, 20, 100_000) if quick else (20_000, 100, 300_000)
    rows_out = []
    with open_location(f"3fs+embedded://{work_dir}/data3fs", create=True) as fs, \
            open_location(work_dir / "plain", create=True) as plain, \
            ProcessCluster(work_dir / "tcp3fs") as servers, open_location(f"3fs+tcp://{servers.root}") as tcp:
        cases = [(fs, "embedded 3FS", 0), (fs, "embedded 3FS", 2), (tcp, "3FS server processes over TCP", 2),
                 (tcp, "3FS server processes over TCP", 8), (plain, "plain directory", 0), (plain, "plain directory", 2)]
        for location, label, workers in cases:
            rows_out.append(bench_loader(location, label, records=records, window=1025, batch=64, batches=batches,
                                         io_workers=workers))
            console.print(f"  {rows_out[-1]['operation']} {rows_out[-1]['adapter']}: {rows_out[-1]['samples/s']:,.0f}"
                          f" vs {rows_out[-1]['peer samples/s']:,.0f} samples/s")
        local = work_dir / "local"
        local.mkdir(exist_ok=True)
        for row in bench_tables(fs, local, rows=rows, repeats=3):
            rows_out.append(row)
            console.print(f"  {row['operation']}: {row['seconds'] * 1e3:.1f} ms vs {row['peer seconds'] * 1e3:.1f} ms")
    return rows_out


def main() -> None:
    from rich.console import Console
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    console = Console()
    work = args.dir or pathlib.Path(tempfile.mkdtemp(prefix="adapters_data_"))
    try:
        for row in bench_data(work, quick=args.quick, console=console):
            console.print(row)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
