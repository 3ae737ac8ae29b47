"""GraySort on one machine: this repository's DataFrame (local processes, and Ray when installed) beside
DuckDB, sorting the same gensort records in the same run.

    python benchmarks/graysort.py --size 2GB [--executor process|ray ...] [--partitions N] [--root DIR]

1. Generates ``--size`` of gensort-compatible records (100 bytes each; ``storage.graysort.gensort``) as
   ``--partitions`` parquet files (columns key binary(10), record binary(100)), in parallel; the input's
   CRC32 sum and count are taken while generating (``gensort -c``).
2. For each executor: ``storage.dataframe`` reads the partitions, range-repartitions them by key prefix
   into ``--partitions`` ranges, sorts inside each, and writes one parquet file per range
   (``storage.graysort.sort.sort_pipeline``).
3. DuckDB: ``COPY (SELECT * FROM read_parquet([...]) ORDER BY key) TO 'sorted.parquet'`` on all threads.
4. Every output is validated valsort-style (order, count, checksum equal to the input's) before its
   throughput counts. GB/min = input bytes (records x 100, 1 GB = 10**9 B) / sort wall time.

A rich table is printed and the rows written to benchmarks/results/graysort.json. The sort times
cover reading the input and writing the output files; session start (the process pool, Ray) and
DuckDB's connection are excluded and reported separately. duckdb is in the ``bench`` extra, ray in ``ray``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "graysort.json"
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in '2GB', '500MB', '1.5GiB' (decimal units are powers of 10)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        units = ", ".join(u for u in UNITS if u)
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected a number and one of {units}")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def gb_per_min(num_bytes: int, seconds: float) -> float:
    return num_bytes / 1e9 / (seconds / 60)


def run_dataframe(executor: str, input_url: str, output_url: str, jobs_url: str, partitions: int,
                  key_mode: str, workers: int | None) -> dict:
    """Sorts with ``storage.dataframe`` on ``executor``; returns the timings (the output is validated later)."""
    import storage.dataframe as spd
    from storage.graysort.sort import sort_pipeline

    start = time.perf_counter()
    session = spd.init(data_root=jobs_url, num_executors=workers, executor=executor)
    started = time.perf_counter()
    try:
        frame = sort_pipeline(session, input_url, output_url, partitions, key_mode=key_mode)
        seconds = time.perf_counter() - started
        plan = frame.explain()
    finally:
        session.shutdown()
    return {"seconds": seconds, "session_start_s": started - start, "plan": plan}


def validate(url: str, expected, workers: int) -> tuple[list[str], object]:
    from storage.graysort.valsort import compare, summarize_parquet

    summary = summarize_parquet(url, workers=workers)
    return compare(summary, expected), summary


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from storage.graysort.partitions import write_input
    from storage.graysort.valsort import parquet_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("2GB"), help="input bytes (default 2GB)")
    parser.add_argument("--executor", action="append", choices=("process", "ray", "inprocess"),
                        help="DataFrame executor(s) to run (repeatable; default: process, and ray when installed)")
    parser.add_argument("--partitions", type=int, default=None,
                        help="input files and output ranges (default: 4 per core, at least 4)")
    parser.add_argument("--workers", type=int, default=None, help="DataFrame executors (default: all cores)")
    parser.add_argument("--key-mode", choices=("integer", "binary"), default="integer",
                        help="sort on the key as integers (default) or as the 10-byte binary (storage.graysort.sort)")
    parser.add_argument("--root", default=None,
                        help="a directory for input, outputs and job data (default: a temp dir)")
    parser.add_argument("--no-duckdb", action="store_true", help="skip DuckDB")
    parser.add_argument("--keep", action="store_true", help="keep the data under --root")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args()
    console = Console()
    cores = os.cpu_count() or 1
    partitions = args.partitions or max(4, 4 * cores)
    records = args.size // 100
    executors = args.executor
    if executors is None:
        executors = ["process"]
        if importlib.util.find_spec("ray") is not None:
            executors.append("ray")
        else:
            console.print("[yellow]ray is not installed: the Ray executor is skipped (pip install 'jaxseek[ray]')[/]")
    root = pathlib.Path(args.root or tempfile.mkdtemp(prefix="graysort-", dir="/tmp")).absolute()
    root.mkdir(parents=True, exist_ok=True)
    data_bytes = records * 100
    rows: list[dict] = []
    console.print(f"[bold]GraySort[/] {records:,} records ({data_bytes / 1e9:.2f} GB), {partitions} partitions, "
                  f"{cores} cores, root {root}")
    try:
        start = time.perf_counter()
        expected = write_input(str(root / "input"), records, partitions, workers=cores)
        generate_s = time.perf_counter() - start
        console.print(f"generated in {generate_s:.1f} s ({gb_per_min(data_bytes, generate_s):.2f} GB/min); "
                      f"checksum {expected.checksum:x}")
        for executor in executors:
            output = root / f"sorted-{executor}"
            console.print(f"sorting with storage.dataframe ({executor}) ...")
            try:
                run = run_dataframe(executor, str(root / "input"), str(output), str(root / f"jobs-{executor}"),
                                    partitions, args.key_mode, args.workers)
            except Exception as error:  # one engine failing must not hide the others' numbers
                console.print(f"[red]storage.dataframe ({executor}) failed:[/] {type(error).__name__}: {error}")
                rows.append({"engine": f"storage.dataframe ({executor})", "error": f"{type(error).__name__}: {error}"})
                continue
            problems, summary = validate(str(output), expected, cores)
            rows.append({"engine": f"storage.dataframe ({executor})", "seconds": run["seconds"],
                         "gb_per_min": gb_per_min(data_bytes, run["seconds"]), "valid": not problems,
                         "problems": problems, "checksum": f"{summary.checksum:x}", "records": summary.records,
                         "output_files": partitions, "session_start_s": run["session_start_s"], "plan": run["plan"],
                         "key_mode": args.key_mode})
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(root / f"jobs-{executor}", ignore_errors=True)
        if not args.no_duckdb:
            try:
                from storage.graysort.duckdb_sort import duckdb_sort
                console.print("sorting with DuckDB ...")
                duck = duckdb_sort(str(root / "input"), parquet_names(str(root / "input")), str(root / "sorted-duckdb"),
                                   threads=cores, temp_directory=str(root / "duckdb-tmp"))
                problems, summary = validate(str(root / "sorted-duckdb"), expected, cores)
                rows.append({"engine": f"DuckDB {duck.version} ({duck.threads} threads)", "seconds": duck.seconds,
                             "gb_per_min": gb_per_min(data_bytes, duck.seconds), "valid": not problems,
                             "problems": problems, "checksum": f"{summary.checksum:x}", "records": summary.records,
                             "output_files": 1})
            except ImportError as error:
                console.print(f"[yellow]{error}: DuckDB is skipped[/]")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    table = Table(title=f"GraySort {data_bytes / 1e9:.2f} GB ({records:,} x 100-byte records), {cores} cores")
    for column in ("engine", "sort s", "GB/min", "valid (valsort)", "checksum"):
        table.add_column(column, justify="left" if column in ("engine", "checksum") else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["engine"], "-", "-", f"[red]{row['error'][:60]}[/]", "-")
        else:
            table.add_row(row["engine"], f"{row['seconds']:.1f}", f"{row['gb_per_min']:.2f}",
                          "yes" if row["valid"] else f"[red]NO: {'; '.join(row['problems'])}[/]", row["checksum"])
    console.print(table)
    import polars

    result = {"size_bytes": data_bytes, "records": records, "partitions": partitions, "cores": cores,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "python": platform.python_version(),
              "polars": polars.__version__, "generate_s": generate_s, "input_checksum": f"{expected.checksum:x}",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


def _repository_on_path() -> None:
    """``python benchmarks/graysort.py`` puts benchmarks/ first on sys.path: put the repository root there
    instead, so this checkout's ``storage`` package is the one imported."""
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))


if __name__ == "__main__":
    _repository_on_path()
    main()
