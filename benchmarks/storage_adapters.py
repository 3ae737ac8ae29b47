"""jaxseek's storage adapters on 3FS against their plain peers, in one run.

* **checkpoint** (``adapters_checkpoint.py``): save and restore GB/s of a pytree through
  ``storage.checkpoint`` on an embedded 3FS (3 replicas on one disk) against plain Orbax to a local
  directory; the crash-injection trials (SIGKILL of the saving process at random moments).
* **data** (``adapters_data.py``): loader samples/s through ``storage.loader.RecordSource``'s batched
  reads against reading the same records one by one; polars tables on 3FS against a local directory.
* **kvcache** (``adapters_kvcache.py``): time to first token with and without a prefix hit in the
  ``storage.kvcache`` store; page store/lookup MB/s.

Every row names its peer, measured in the same run, and the ratio to it.

    python benchmarks/storage_adapters.py            # writes benchmarks/results/storage_adapters.json
    python benchmarks/storage_adapters.py --quick    # small sizes
    python benchmarks/storage_adapters.py --only checkpoint kvcache
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SECTIONS = ("checkpoint", "data", "kvcache")


def run_section(name: str, work_dir: pathlib.Path, quick: bool, console: Console) -> list[dict]:
    module = __import__(f"adapters_{name}")
    return getattr(module, f"bench_{name}")(work_dir, quick=quick, console=console)


def print_rows(console: Console, section: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=section)
    for column in columns:
        table.add_column(column, justify="left" if column in ("operation", "adapter", "peer") else "right")
    for row in rows:
        table.add_row(*(f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--root", type=pathlib.Path, help="directory for all data (default: a temp dir)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "storage_adapters.json")
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))
    report = {"command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "host": platform.node(),
              "cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "quick": args.quick, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="adapters-bench-", dir=args.root) as tmp:
        for section in args.only:
            started = time.perf_counter()
            console.print(f"[bold]{section}[/]")
            work_dir = pathlib.Path(tmp) / section
            work_dir.mkdir()
            rows = run_section(section, work_dir, args.quick, console)
            print_rows(console, section, rows)
            report["sections"][section] = {"rows": rows, "seconds": time.perf_counter() - started}
    report["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
