"""storage.threefs under real faults: mgmtd, meta and storage servers as separate processes (ProcessCluster),
storage servers killed with SIGKILL while clients write and read.

The cluster: 3 storage nodes x 2 targets, 2 chains of 3 replicas (every node holds a target of each chain,
and each node heads one chain or none), 4 KiB chunks, files striped over both chains. Threads in this
process write and read through RPC clients; the servers are started with subprocess (no fork of this
process). Replicas are compared on disk: each target's chunkmeta.sqlite names the committed content file
of every chunk, whose CRC32C checksums must match.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from storage.threefs.storage.block_checksums import content_checksum
from storage.threefs.storage.chunk_id import ChunkId
from storage.threefs.cluster import ClusterShape, target_dir
from storage.threefs.cluster.processes import ProcessCluster
from storage.threefs.mgmtd.routing import TargetState


CHUNK = 4096
SHAPE = ClusterShape(nodes=3, targets_per_node=2, replicas=3, chunk_size=CHUNK, stripe=2)


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def wait_for(condition, timeout: float, what: str, interval: float = 0.05, workers=()) -> None:
    """Polls `condition`; fails at once when one of `workers` died (with its exception as the cause)."""
    deadline = time.monotonic() + timeout
    while not condition():
        for worker in workers:
            if worker.error is not None:
                raise AssertionError(f"{worker.name} failed after {worker.steps} steps while waiting for "
                                     f"{what}") from worker.error
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def target_states(client) -> dict[int, TargetState]:
    client.routing.invalidate()
    return client.routing.get().target_states


def wait_all_serving(client, timeout: float = 30.0) -> None:
    wait_for(lambda: all(s is TargetState.SERVING for s in target_states(client).values()), timeout,
             "every target to serve again")


def on_disk_chunks(root: Path, node: int, target: int) -> dict[ChunkId, tuple[int, bytes]]:
    """{chunk id: (committed version, committed content)} of one target, from its files on disk (read
    while its server runs: SELECTs on the WAL database only). Checks every committed slot file's length
    and checksum (CRC32C) against the metadata (pending versions live in memory only)."""
    directory = target_dir(root, node, target)
    db = sqlite3.connect(directory / "chunkmeta.sqlite")
    try:
        rows = db.execute("SELECT id, version, slot, length, checksum FROM chunks").fetchall()
    finally:
        db.close()
    out = {}
    for raw_id, version, slot, length, checksum in rows:  # committed versions only (pending ones live in memory)
        chunk_id = ChunkId.from_bytes(raw_id)
        content = (directory / "chunks" / f"{chunk_id.hex()}.{slot}").read_bytes()
        assert len(content) == length and content_checksum(content) == checksum, (target, chunk_id)
        out[chunk_id] = (version, content)
    return out


def assert_replicas_identical(root: Path, client) -> dict[int, dict[ChunkId, tuple[int, bytes]]]:
    """Every target of each chain holds the same chunks, versions and bytes; returns chain -> chunks."""
    routing = client.routing.get()
    per_chain = {}
    for chain in routing.chain_table.chains.values():
        replicas = {t: on_disk_chunks(root, routing.target_node[t], t) for t in chain.targets}
        first, *rest = chain.targets
        for other in rest:
            assert replicas[other].keys() == replicas[first].keys(), (chain, other)
            for chunk_id, (version, content) in replicas[first].items():
                assert replicas[other][chunk_id] == (version, content), (chain, other, chunk_id)
        per_chain[chain.chain_id] = replicas[first]
    return per_chain


def node_of_head(client, chain_id: int) -> int:
    routing = client.routing.get()
    return routing.target_node[routing.write_path(chain_id)[0]]


class Worker(threading.Thread):
    """Runs `step(i)` for i = 0, 1, ... until stopped; keeps the first exception for the test to raise."""

    def __init__(self, name: str, step, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self._step, self._stop_event = step, stop
        self.steps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self._step(self.steps)
                self.steps += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self.error = exc

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not stop within {timeout} s"
        if self.error is not None:
            raise AssertionError(f"{self.name} failed after {self.steps} steps") from self.error


def test_sigkill_of_a_storage_server_loses_no_acknowledged_write_and_tears_no_chunk(tmp_path):
    root = tmp_path / "cluster"
    rng = np.random.default_rng(1)
    with ProcessCluster(root, SHAPE) as cluster:
        writer_client, reader_client = cluster.client(), cluster.client()
        try:
            writer_client.makedirs("/w")
            acked: dict[str, bytearray] = {}  # path -> the bytes of every pwrite that returned

            def write_file(i: int) -> None:
                path = f"/w/f{i}"
                acked[path] = model = bytearray()
                with writer_client.open(path, "wb") as f:
                    for _ in range(int(rng.integers(1, 4))):
                        offset = int(rng.integers(0, 4 * CHUNK))
                        data = random_bytes(rng, int(rng.integers(1, 3 * CHUNK)))
                        f.pwrite(data, offset)
                        if offset + len(data) > len(model):
                            model.extend(bytes(offset + len(data) - len(model)))
                        model[offset:offset + len(data)] = data

            # one chunk overwritten whole with versioned patterns: version v fills it with byte v % 251 + 1
            with writer_client.open("/v", "wb") as f:
                f.write(bytes([1]) * CHUNK)
            versions = writer_client.open("/v", "r+b")
            last_version = [0]

            def overwrite(i: int) -> None:
                versions.pwrite(bytes([(i + 1) % 251 + 1]) * CHUNK, 0)
                last_version[0] = i + 1

            seen: list[int] = []
            reader_file = reader_client.open("/v", "rb")

            def read_chunk(i: int) -> None:
                data = reader_file.pread(CHUNK, 0)
                values = set(data)
                assert len(data) == CHUNK and len(values) == 1, \
                    f"read {i} saw a chunk mixing versions {sorted(values)[:8]}"
                seen.append(data[0])

            stop = threading.Event()
            workers = [Worker("writer", write_file, stop), Worker("versioner", overwrite, stop),
                       Worker("reader", read_chunk, stop)]
            for worker in workers:
                worker.start()
            writer, versioner, reader = workers
            wait_for(lambda: writer.steps >= 3 and versioner.steps >= 10 and reader.steps >= 10, 60,
                     "writes before the kill", workers=workers)
            victim = 2
            cluster.kill(victim)
            killed_at = (writer.steps, versioner.steps, reader.steps)
            wait_for(lambda: all(target_states(writer_client)[t] is TargetState.OFFLINE
                                 for t in SHAPE.targets()[victim]), 30, f"node {victim}'s targets to go offline")
            # writes and reads keep going on the two surviving replicas
            wait_for(lambda: writer.steps >= killed_at[0] + 3 and versioner.steps >= killed_at[1] + 10
                     and reader.steps >= killed_at[2] + 10, 60, "writes while the node is down", workers=workers)
            assert all(w.is_alive() for w in workers), [(w.name, w.error) for w in workers]
            cluster.start(victim)
            wait_all_serving(writer_client)
            restarted_at = (writer.steps, versioner.steps)
            wait_for(lambda: writer.steps >= restarted_at[0] + 2 and versioner.steps >= restarted_at[1] + 5, 60,
                     "writes after the restart", workers=workers)
            stop.set()
            for worker in workers:
                worker.finish()
            versions.close()
            reader_file.close()

            assert len(acked) >= 8
            for path, model in acked.items():
                assert writer_client.stat(path).size == len(model), path
                with reader_client.open(path, "rb") as f:
                    assert f.read() == bytes(model), path
            with reader_client.open("/v", "rb") as f:
                assert f.read() == bytes([(last_version[0]) % 251 + 1]) * CHUNK
            assert len(set(seen)) > 1  # the reader really raced the overwrites
            wait_all_serving(writer_client)
            per_chain = assert_replicas_identical(root, writer_client)
            # every replica, the restarted node's included, holds each acknowledged chunk's bytes
            stored = {chunk_id: content for chunks in per_chain.values() for chunk_id, (_, content) in chunks.items()}
            for path, model in acked.items():
                inode = writer_client.meta.stat(path)
                for index in range(-(-len(model) // CHUNK)):
                    expected = bytes(model[index * CHUNK:(index + 1) * CHUNK])
                    chunk_id = ChunkId(inode.inode_id, index)
                    assert chunk_id in per_chain[inode.layout.chain_of_chunk(index)] or not any(expected), \
                        (path, index)
                    content = stored.get(chunk_id, b"")
                    assert content + bytes(len(expected) - len(content)) == expected, (path, index)
        finally:
            writer_client.close()
            reader_client.close()


def test_whole_process_cluster_restart_keeps_every_byte(tmp_path):
    root = tmp_path / "cluster"
    rng = np.random.default_rng(2)
    files = {f"/r/{i}": random_bytes(rng, int(rng.integers(0, 8 * CHUNK))) for i in range(8)}
    with ProcessCluster(root, SHAPE) as cluster, cluster.client() as client:
        client.makedirs("/r")
        for path, data in files.items():
            with client.open(path, "wb") as f:
                f.write(data)
        with client.open("/r/sparse", "wb") as f:
            f.pwrite(b"end", 11 * CHUNK - 1)
        files["/r/sparse"] = bytes(11 * CHUNK - 1) + b"end"
        with client.open("/r/0", "r+b") as f:
            f.truncate(CHUNK + 3)
        files["/r/0"] = files["/r/0"][:CHUNK + 3]
        removed = client.stat("/r/1").inode_id
        client.remove("/r/1")
        del files["/r/1"]
        prefix = ChunkId(removed, 0).hex()[:24]  # its chunks go in the background: wait for them to
        wait_for(lambda: not list(root.glob(f"node-*/target-*/chunks/{prefix}*")), 15, "/r/1's collection")
        before = assert_replicas_identical(root, client)
    with ProcessCluster(root) as cluster, cluster.client() as client:
        assert cluster.shape == SHAPE
        wait_all_serving(client)
        assert sorted(client.listdir("/r")) == sorted(p.rsplit("/", 1)[1] for p in files)
        for path, data in files.items():
            assert client.stat(path).size == len(data), path
            with client.open(path, "rb") as f:
                assert f.read() == data, path
        assert assert_replicas_identical(root, client) == before
        with client.open("/r/new", "wb") as f:
            f.write(b"after the restart")
        with client.open("/r/new", "rb") as f:
            assert f.read() == b"after the restart"


def test_killing_a_chain_head_mid_write_never_tears_a_chunk(tmp_path):
    """One pwrite covers a whole 32-chunk file, every chunk filled with the generation number g; a
    reader keeps reading it chunk by chunk. The head of chunk 0's chain is killed mid-write. The
    write in flight either completes on the new head or fails naming what it could not write; either
    way each chunk holds exactly one generation, never a mix."""
    root = tmp_path / "cluster"
    chunks = 32
    with ProcessCluster(root, SHAPE) as cluster:
        writer_client, reader_client = cluster.client(), cluster.client()
        try:
            def generation(g: int) -> bytes:
                return bytes([g % 251 + 1]) * (chunks * CHUNK)

            with writer_client.open("/h", "wb") as f:
                f.write(generation(0))
            chain0 = writer_client.meta.stat("/h").layout.chain_of_chunk(0)
            head_node = node_of_head(writer_client, chain0)
            file = writer_client.open("/h", "r+b")
            acked = [0]
            failure: list[BaseException] = []

            def overwrite(i: int) -> None:
                g = acked[0] + 1
                try:
                    file.pwrite(generation(g), 0)
                except (OSError, TimeoutError) as exc:  # a clear failure is allowed; stop writing then
                    failure.append(exc)
                    stop.set()
                    return
                acked[0] = g

            seen: set[int] = set()
            reader_file = reader_client.open("/h", "rb")

            def read_all_chunks(i: int) -> None:
                data = reader_file.pread(chunks * CHUNK, 0)
                assert len(data) == chunks * CHUNK
                for index in range(chunks):
                    values = set(data[index * CHUNK:(index + 1) * CHUNK])
                    assert len(values) == 1, f"read {i}: chunk {index} mixes generations {sorted(values)[:8]}"
                    seen.update(values)

            stop = threading.Event()
            writer = Worker("writer", overwrite, stop)
            reader = Worker("reader", read_all_chunks, stop)
            writer.start()
            reader.start()
            wait_for(lambda: acked[0] >= 2, 60, "two whole-file writes", interval=0.005, workers=(writer, reader))
            cluster.kill(head_node)  # the writer is always mid-write: it writes back to back
            at_kill = acked[0]
            wait_for(lambda: acked[0] >= at_kill + 3 or failure, 60, "writes after the head died",
                     workers=(writer, reader))
            new_head = node_of_head(writer_client, chain0)
            assert new_head != head_node
            cluster.start(head_node)
            wait_all_serving(writer_client)
            if not failure:
                after_restart = acked[0]
                wait_for(lambda: acked[0] >= after_restart + 2 or failure, 60, "writes after the restart",
                         workers=(writer, reader))
            stop.set()
            writer.finish()
            reader.finish()
            file.close()
            reader_file.close()

            assert reader.steps > 0 and len(seen) > 1
            with reader_client.open("/h", "rb") as f:
                data = f.read()
            assert len(data) == chunks * CHUNK
            per_chunk = [set(data[i * CHUNK:(i + 1) * CHUNK]) for i in range(chunks)]
            assert all(len(values) == 1 for values in per_chunk), "a torn chunk"
            last = acked[0]
            if failure:  # the failed write may have reached some chunks, never part of one
                message = str(failure[0])
                assert "chunk" in message and "chain" in message, message
                allowed = {last % 251 + 1, (last + 1) % 251 + 1}
            else:
                allowed = {last % 251 + 1}
            assert {v for values in per_chunk for v in values} <= allowed, (per_chunk, last)
            wait_all_serving(writer_client)
            assert_replicas_identical(root, writer_client)
        finally:
            writer_client.close()
            reader_client.close()
