"""``python -m storage.threefs serve --root DIR --role mgmtd|meta|storage [--node N] [--name NAME]``: one 3FS server.

``python -m storage.threefs mount URL MOUNTPOINT [--threads N] [--cache-seconds S]
[--read-ahead-kb K]``: serves the 3FS at URL
(``3fs+embedded:///dir``, ``3fs+tcp:///dir``) as a POSIX directory through FUSE until SIGTERM / SIGINT
(``storage/threefs/fuse/``; needs root and /dev/fuse)."""

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
    mount_parser = commands.add_parser("mount", help="serve a 3FS at a mountpoint through FUSE until SIGTERM")
    mount_parser.add_argument("url", help="3fs+embedded:///dir or 3fs+tcp:///dir")
    mount_parser.add_argument("mountpoint", help="an empty directory")
    mount_parser.add_argument("--threads", type=int, default=4, help="requests served at once (default 4)")
    mount_parser.add_argument("--cache-seconds", type=float, default=0.0,
                              help="how long the kernel may cache names and attributes (default 0: always ask)")
    mount_parser.add_argument("--read-ahead-kb", type=int, default=1024,
                              help="the kernel's read-ahead on the mount (default 1024; the kernel's own is 128)")
    mount_parser.add_argument("--exit-with-parent", action="store_true",
                              help="unmount and exit when the process that started this one dies")
    args = parser.parse_args(argv)
    if args.command == "mount":
        from storage.threefs.fuse.mount import main as mount_main
        raise SystemExit(mount_main(args.url, args.mountpoint, args.threads, args.cache_seconds,
                                    args.read_ahead_kb, args.exit_with_parent))
    serve(args.root, args.role, args.node, args.name)


if __name__ == "__main__":
    main()
