"""Round-trip latencies of this 3FS's RPC: an empty call (client and server in this process) and, on a
``ProcessCluster`` (servers as child processes on loopback TCP), a ``stat``, a 4 KiB and a 1 MiB read and a
1 MiB write. Medians of ``timeit`` repeats, in microseconds; run the same script on two checkouts back to
back to compare them.

    python benchmarks/threefs_rpc.py
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import tempfile
import timeit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from storage.threefs.cluster.processes import ProcessCluster  # noqa: E402
from storage.threefs.net.codec import Codec  # noqa: E402
from storage.threefs.net.transport import RpcClient, RpcServer  # noqa: E402

MIB = 1 << 20


class Empty:
    def ping(self) -> None:
        return None


def median_us(fn, number: int, repeat: int = 7) -> float:
    return statistics.median(t / number for t in timeit.repeat(fn, number=number, repeat=repeat)) * 1e6


def main() -> None:
    out = {}
    secret = os.urandom(32)
    with RpcServer(Empty(), codec=Codec(), secret=secret).serve_in_thread() as server:
        client = RpcClient(server.address, codec=Codec(), secret=secret)
        client.ping()
        out["empty_rpc_in_process_us"] = median_us(client.ping, 500)
        client.disconnect()
    with tempfile.TemporaryDirectory(prefix="threefs-rpc-") as root:
        with ProcessCluster(os.path.join(root, "cluster")) as cluster, cluster.client() as c:
            data = os.urandom(MIB)
            with c.open("/f.bin", "wb") as f:
                f.pwrite(data, 0)
            out["stat_us"] = median_us(lambda: c.stat("/f.bin"), 200)
            whole, small = bytearray(MIB), bytearray(4096)
            with c.open("/f.bin", "rb") as f:
                out["read_4k_us"] = median_us(lambda: f.pread_into(small, 8192), 200)
                out["read_1mib_us"] = median_us(lambda: f.pread_into(whole, 0), 20)
                assert bytes(whole) == data
            with c.open("/w.bin", "wb") as w:
                out["write_1mib_us"] = median_us(lambda: w.pwrite(data, 0), 10)
    print(json.dumps({key: round(value, 1) for key, value in out.items()}))


if __name__ == "__main__":
    main()
