"""``python -m storage.threefs serve --root DIR --role mgmtd|meta|storage [--node N] [--name NAME]``: one 3FS server."""

from __future__ import annotations

import argparse
from pathlib import Path

from storage.threefs.cluster.servers import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m storage.threefs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run one server until SIGTERM")
    serve_parser.add_argument("--root", type=Path, required=True, help="the cluster's directory")
    serve_parser.add_argument("--role", choices=("mgmtd", "meta", "storage"), required=True)
    serve_parser.add_argument("--node", type=int, help="storage node id (storage servers)")
    serve_parser.add_argument("--name", help="a mgmtd's name: mgmtd (default), mgmtd-2, ... (one leads, the "
                                             "others stand by)")
    args = parser.parse_args(argv)
    serve(args.root, args.role, args.node, args.name)


if __name__ == "__main__":
    main()
