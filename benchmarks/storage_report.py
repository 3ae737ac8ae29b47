"""The storage benchmark's tables: medians over rounds, ratios to plain file IO, notes per row."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sqlite3
import statistics

from rich.table import Table

from storage_backends import MIB

LABELS = {"plain": "plain os.pread/pwrite", "plain-cold": "plain, page cache dropped",
          "embedded": "3FS embedded", "processes": "3FS processes (TCP)", "fuse": "3FS FUSE mount (embedded)"}

# ----------------------------------------------------------------------------- reporting


DATA_NOTES = {
    ("plain", "seq write 1 MiB"): "page cache, one fsync at the end; 1 copy",
    ("plain", "seq read 1 MiB"): "warm page cache: memory speed",
    ("plain", "rand read 4 KiB"): "warm page cache: one syscall per read",
    ("plain", "rand write 4 KiB"): "page cache, one fsync at the end; 1 copy",
    ("plain-cold", "seq read 1 MiB"): "after fsync + POSIX_FADV_DONTNEED (VM disk: host may still cache)",
    ("plain-cold", "rand read 4 KiB"): "after fsync + POSIX_FADV_DONTNEED",
    ("3fs", "seq write 1 MiB"): "3 replicas (CRAQ head->tail); per write and replica: the chunk's spare slot "
                                "file written in place + 1 SQLite statement; fsync on close",
    ("3fs", "seq read 1 MiB"): "1 replica; preadv into the caller's buffer + CRC32C per 4 KiB block",
    ("3fs", "rand read 4 KiB"): "one preadv + CRC32C of the 4 KiB block(s) read",
    ("3fs", "rand write 4 KiB"): "copy-on-write per 4 KiB block into the spare slot, on 3 replicas",
}
RPC_NOTE = "; an RPC (codec frames, HMAC-authenticated connection) over loopback per chunk request and per chain hop"


def median_rows(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per op, the median of every numeric field over rounds (plus the spread of seconds)."""
    merged = {}
    for op in rounds[0]:
        values = [r[op] for r in rounds]
        row = {}
        for key in values[0]:
            numbers = [v[key] for v in values if v[key] is not None]
            row[key] = statistics.median(numbers) if numbers else None
        for key in ("seconds", "loop_seconds", "ring_seconds"):
            if key in values[0]:
                row[f"{key}_all"] = [v[key] for v in values]
        merged[op] = row
    return merged


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{max(digits, 1 if abs(value) >= 10 else 2)}f}"


def data_table(results: dict[str, dict[str, dict]]) -> tuple[Table, list[dict]]:
    table = Table(title="Data IO (median of rounds; ratio = this row / plain, warm cache)")
    for column in ("backend", "op", "requests", "MiB/s", "IOPS", "vs plain", "dirtied B / B", "notes"):
        table.add_column(column, justify="right" if column in ("requests", "MiB/s", "IOPS", "vs plain",
                                                               "dirtied B / B") else "left")
    flat = []
    plain = results.get("plain", {})
    order = ["plain", "plain-cold", "embedded", "processes", "fuse"]
    for backend in [b for b in order if b in results]:
        for op, row in results[backend].items():
            mib_s = row["bytes"] / MIB / row["seconds"]
            iops = row["requests"] / row["seconds"]
            base = plain.get(op)
            ratio = (mib_s / (base["bytes"] / MIB / base["seconds"])) if base and backend != "plain" else None
            amplification = row["dirtied"] / row["bytes"] if row.get("dirtied") is not None else None
            kind = "3fs" if backend in ("embedded", "processes") else backend
            note = DATA_NOTES.get((kind, op), "") + (RPC_NOTE if backend == "processes" else "")
            if backend == "fuse":
                note = "os calls on the mount: kernel FUSE -> the mount process's 3FS client (its own cluster)"
            flat.append({"backend": backend, "op": op, "requests": row["requests"], "bytes": row["bytes"],
                         "seconds": row["seconds"], "seconds_all_rounds": row["seconds_all"],
                         "mib_per_s": mib_s, "iops": iops, "ratio_to_plain": ratio,
                         "dirtied_bytes_per_logical_byte": amplification, "notes": note})
            table.add_row(LABELS[backend], op, str(row["requests"]), fmt(mib_s), fmt(iops),
                          f"{ratio:.3g}x" if ratio is not None else "", fmt(amplification, 1), note)
        table.add_section()
    return table, flat


BATCH_NOTES = {
    "plain": "a thread hand-off per IO vs one page-cache pread syscall",
    "embedded": "client and storage in one process: the ring's threads share one GIL",
    "processes": "a connection per ring worker and storage process; all processes share the cores",
}


def batched_table(results: dict[str, dict[str, dict]], batch: int) -> tuple[Table, list[dict]]:
    table = Table(title=f"Batched (IoRing, {batch} per batch, io_depth 0, default workers) vs a loop of pread_into")
    for column in ("backend", "op", "requests", "loop MiB/s", "loop IOPS", "ring MiB/s", "ring IOPS",
                   "speedup", "notes"):
        table.add_column(column, justify="left" if column in ("backend", "op", "notes") else "right")
    flat = []
    for backend in [b for b in ("plain", "embedded", "processes") if b in results]:
        for op, row in results[backend].items():
            loop_iops, ring_iops = row["requests"] / row["loop_seconds"], row["requests"] / row["ring_seconds"]
            loop_mib, ring_mib = row["bytes"] / MIB / row["loop_seconds"], row["bytes"] / MIB / row["ring_seconds"]
            speedup = row["loop_seconds"] / row["ring_seconds"]
            flat.append({"backend": backend, "op": op, "requests": row["requests"], "bytes": row["bytes"],
                         "loop_seconds": row["loop_seconds"], "ring_seconds": row["ring_seconds"],
                         "loop_seconds_all_rounds": row["loop_seconds_all"],
                         "ring_seconds_all_rounds": row["ring_seconds_all"],
                         "loop_iops": loop_iops, "ring_iops": ring_iops, "loop_mib_per_s": loop_mib,
                         "ring_mib_per_s": ring_mib, "speedup": speedup, "notes": BATCH_NOTES[backend]})
            table.add_row(LABELS[backend] + (" (MountClient)" if backend == "plain" else ""), op,
                          str(row["requests"]), fmt(loop_mib), fmt(loop_iops), fmt(ring_mib), fmt(ring_iops),
                          f"{speedup:.2f}x", BATCH_NOTES[backend])
        table.add_section()
    return table, flat


META_NOTES = {
    "embedded": "in-process SQLite KV (WAL, synchronous=NORMAL); create = stat + create txn + close txn",
    "processes": "3 RPCs to the meta server (one thread and SQLite connection per client connection)",
    "plain": "kernel VFS (dentry cache)",
}


def metadata_table(results: dict[str, dict[str, dict]]) -> tuple[Table, list[dict]]:
    table = Table(title="Metadata operations (median of rounds)")
    for column in ("backend", "op", "ops", "ops/s", "us/op", "vs plain", "notes"):
        table.add_column(column, justify="left" if column in ("backend", "op", "notes") else "right")
    flat = []
    plain = results.get("plain", {})
    for backend in [b for b in ("plain", "embedded", "processes") if b in results]:
        for op, row in results[backend].items():
            rate = row["ops"] / row["seconds"]
            base = plain.get(op)
            ratio = rate / (base["ops"] / base["seconds"]) if base and backend != "plain" else None
            note = META_NOTES[backend] if op.startswith("create") else ""
            if op.startswith("listdir"):
                note = f"{row['entries'] / row['seconds']:,.0f} entries/s"
            if op == "remove" and backend != "plain":
                note = "one unlink transaction; the chunks are collected in the background"
            flat.append({"backend": backend, "op": op, "ops": row["ops"], "seconds": row["seconds"],
                         "seconds_all_rounds": row["seconds_all"], "ops_per_s": rate,
                         "ratio_to_plain": ratio, "notes": note})
            table.add_row(LABELS[backend], op, str(row["ops"]), fmt(rate), fmt(1e6 / rate, 1),
                          f"{ratio:.3g}x" if ratio is not None else "", note)
        table.add_section()
    return table, flat


def summary_table(data: list[dict], batched: list[dict], meta: list[dict]) -> tuple[Table, dict]:
    def find(rows, backend, op, key):
        return next((r[key] for r in rows if r["backend"] == backend and r["op"] == op), None)

    backends = [b for b in ("plain", "embedded", "processes") if any(r["backend"] == b for r in data)]
    table = Table(title="Summary (3FS columns: value, and ratio to plain)")
    table.add_column("metric")
    for backend in backends:
        table.add_column(LABELS[backend], justify="right")
    metrics = [("seq write MiB/s", data, "seq write 1 MiB", "mib_per_s"),
               ("seq read MiB/s", data, "seq read 1 MiB", "mib_per_s"),
               ("rand read 4 KiB IOPS", data, "rand read 4 KiB", "iops"),
               ("rand write 4 KiB IOPS", data, "rand write 4 KiB", "iops"),
               ("IoRing speedup, 4 KiB reads", batched, "rand read 4 KiB", "speedup"),
               ("IoRing speedup, 1 MiB reads", batched, "read 1 MiB", "speedup"),
               ("create/s", meta, "create (open wb + close)", "ops_per_s"),
               ("stat/s", meta, "stat", "ops_per_s")]
    summary = {}
    for name, rows, op, key in metrics:
        cells = []
        for backend in backends:
            value = find(rows, backend, op, key)
            ratio = find(rows, backend, op, "ratio_to_plain") if key != "speedup" else None
            summary.setdefault(backend, {})[name] = value
            if value is None:
                cells.append("-")
            elif key == "speedup":
                cells.append(f"{value:.2f}x")
            else:
                cells.append(fmt(value) + (f" ({ratio:.2g}x)" if ratio is not None else ""))
        table.add_row(name, *cells)
    return table, summary


# issue 15's goals: (label, backend, table, op, how the ratio is taken, before (2026-11-29), goal)
GOALS = [("embedded sequential 1 MiB read", "embedded", "data", "seq read 1 MiB", "ratio", 0.34, 0.8),
         ("embedded batched 1 MiB reads (IoRing) vs plain", "embedded", "batched", "read 1 MiB", "ring_vs_plain", 0.30,
          0.8),
         ("embedded random 4 KiB read", "embedded", "data", "rand read 4 KiB", "ratio", 0.072, 0.25),
         ("embedded sequential write", "embedded", "data", "seq write 1 MiB", "ratio", 0.10, 0.2),
         ("embedded random 4 KiB write", "embedded", "data", "rand write 4 KiB", "ratio", 0.0008, 0.02),
         ("remove", "embedded", "metadata", "remove", "ratio", 0.015, 0.2),
         ("TCP 1 MiB read", "processes", "data", "seq read 1 MiB", "ratio", 0.12, 0.5),
         ("TCP sequential write", "processes", "data", "seq write 1 MiB", "ratio", 0.065, 0.15)]


def goals_table(data: list[dict], batched: list[dict], meta: list[dict]) -> tuple[Table, list[dict]]:
    """Issue 15's goals: same-run ratios to plain file IO, before and now. The batched row compares the
    3FS ring's MiB/s with plain file IO's best (loop or ring) for the same 1 MiB reads."""
    tables = {"data": data, "batched": batched, "metadata": meta}
    table = Table(title="Goals (same-run ratio to plain file IO)")
    for column in ("operation", "before", "now", "goal", "met"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    out = []
    for label, backend, where, op, how, before, goal in GOALS:
        row = next((r for r in tables[where] if r["backend"] == backend and r["op"] == op), None)
        plain = next((r for r in tables[where] if r["backend"] == "plain" and r["op"] == op), None)
        if row is None:
            continue
        if how == "ring_vs_plain":
            now = row["ring_mib_per_s"] / max(plain["loop_mib_per_s"], plain["ring_mib_per_s"]) if plain else None
        else:
            now = row["ratio_to_plain"]
        met = now is not None and now >= goal
        out.append({"operation": label, "before": before, "now": now, "goal": goal, "met": met})
        table.add_row(label, f"{before:.2g}x", "-" if now is None else f"{now:.2g}x", f">= {goal:g}x",
                      "yes" if met else "no")
    return table, out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for package in ("jaxseek", "rich"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out
