"""A fault drill: servers of a ``ProcessCluster`` killed (SIGKILL) or hung (SIGSTOP) while a client writes.

Each trial opens a new file, writes fixed-size records back to back (a record never spans two chunks, so
each write is one CRAQ chunk update) (with an fsync every few) while a second handle re-reads the fsynced ones, injects one
fault into one server (a storage node, the meta server or mgmtd), restores the server after
`fault_seconds` (restart after a kill, SIGCONT after a pause), keeps writing until
`records_after_fault` more records were acknowledged, closes the file and checks it: its size is exactly
the acknowledged records and every byte of it is what was written. A write that fails (the client gave
up) is retried at the same offset, as an application would; a read that fails or ends early (the length
other handles see lags the writer's) is counted, a read that returns other bytes is a defect. Nothing here mocks a service: the servers are real processes and the
faults real signals.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from storage.threefs.mgmtd.routing import TargetState

FAULTS = ("kill", "pause")
SYNC_EVERY = 4  # records between fsyncs (after which a second handle sees them)


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """What one trial saw. `lost_bytes` (acknowledged bytes that read back otherwise) and `invented_bytes`
    (bytes in the file that were never written, or a size past the acknowledged end) must be 0."""

    trial: int
    fault: str                # "kill" | "pause"
    server: str               # "storage-2", "meta", "mgmtd" or "mgmtd-2" (the leader when faulted)
    records: int              # acknowledged records
    write_retries: int        # writes that failed and were sent again
    sync_errors: int          # fsyncs that failed (allowed while the meta server is down)
    read_errors: int          # concurrent reads that raised (allowed while a server is down)
    short_reads: int          # concurrent reads that ended early (the file's length as others see it lags)
    bad_reads: int            # concurrent reads that returned other bytes than written (a defect)
    lost_bytes: int
    invented_bytes: int
    max_write_stall_s: float  # longest time between two acknowledged writes
    recovery_s: float         # from restoring the server until a write was acknowledged again

    @property
    def ok(self) -> bool:
        return self.lost_bytes == 0 and self.invented_bytes == 0 and self.bad_reads == 0


def record(trial: int, seq: int, size: int) -> bytes:
    """[size] bytes, distinct for every (trial, seq): a header then seeded random bytes."""
    header = f"trial={trial} seq={seq};".encode()
    body = np.random.default_rng([trial, seq]).integers(0, 256, size=size - len(header), dtype=np.uint8)
    return header + body.tobytes()


def wait_until_serving(client, timeout: float = 60.0) -> None:
    """Blocks until every target is serving in mgmtd's routing (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.routing.invalidate()
            states = client.routing.get().target_states
            if all(state is TargetState.SERVING for state in states.values()):
                return
        except OSError:
            pass  # mgmtd restarting
        if time.monotonic() > deadline:
            raise TimeoutError(f"targets not all serving after {timeout} s")
        time.sleep(0.05)


class _Writer(threading.Thread):
    """Writes records back to back at offsets seq * size, retrying a failed write at the same offset."""

    def __init__(self, file, trial: int, size: int) -> None:
        super().__init__(name=f"drill-writer-{trial}", daemon=True)
        self.file, self.trial, self.size = file, trial, size
        self.acked = 0
        self.ack_times: list[float] = []
        self.retries = self.sync_errors = self.synced = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                data = record(self.trial, self.acked, self.size)
                try:
                    self.file.pwrite(data, self.acked * self.size)
                except OSError:
                    self.retries += 1
                    time.sleep(0.01)  # the client gave up after its retry window; a short pause, then again
                    continue
                self.acked += 1
                self.ack_times.append(time.monotonic())
                if self.acked % SYNC_EVERY == 0:
                    try:
                        self.file.fsync()  # makes the length other handles see cover these records
                        self.synced = self.acked
                    except OSError:
                        self.sync_errors += 1  # the meta server is down: the next fsync reports it
        except BaseException as exc:  # noqa: BLE001 - reported by the trial
            self.error = exc


class _Reader(threading.Thread):
    """Re-reads random acknowledged records through a second handle while the writer runs."""

    def __init__(self, file, writer: _Writer, seed: int) -> None:
        super().__init__(name=f"drill-reader-{writer.trial}", daemon=True)
        self.file, self.writer = file, writer
        self.rng = np.random.default_rng(seed)
        self.errors = self.bad = self.short = 0

    def run(self) -> None:
        while not self.writer.stop.is_set():
            if self.writer.synced == 0:
                time.sleep(0.01)
                continue
            seq = int(self.rng.integers(0, self.writer.synced))
            size = self.writer.size
            try:
                data = self.file.pread(size, seq * size)
            except OSError:
                self.errors += 1
                time.sleep(0.02)
                continue
            expected = record(self.writer.trial, seq, size)
            if data != expected[:len(data)]:
                self.bad += 1
            elif len(data) < size:
                self.short += 1  # the length this handle sees lags the writer's (reported on fsync/close)


def run_trial(cluster, client, trial: int, fault: str, server: str, *, record_size: int = 16384,
              warmup_records: int = 8, fault_seconds: float = 1.5, records_after_fault: int = 8,
              timeout: float = 120.0) -> TrialResult:
    """One trial (see the module docstring) on `cluster` (a ProcessCluster) through `client`."""
    if fault not in FAULTS:
        raise ValueError(f"fault: expected one of {FAULTS}, got {fault!r}")
    if cluster.shape.chunk_size % record_size:
        raise ValueError(f"record_size {record_size} must divide the chunk size {cluster.shape.chunk_size}")
    if server == LEADER:
        server = cluster.mgmtd_leader()
        if server is None:
            raise RuntimeError(f"trial {trial}: no mgmtd leader is published")
    path = f"/drill/trial-{trial:04d}.bin"
    client.makedirs("/drill")
    deadline = time.monotonic() + timeout

    def wait(condition: Callable[[], bool], what: str) -> None:
        while not condition():
            if writer.error is not None:
                raise RuntimeError(f"trial {trial}: the writer failed while waiting for {what}") from writer.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"trial {trial} ({fault} {server}): no {what} within {timeout} s")
            time.sleep(0.01)

    with client.open(path, "wb") as out, client.open(path, "rb") as back:
        writer = _Writer(out, trial, record_size)
        reader = _Reader(back, writer, seed=trial)
        writer.start()
        reader.start()
        try:
            wait(lambda: writer.acked >= warmup_records, "warm-up writes")
            (cluster.kill if fault == "kill" else cluster.pause)(server)
            time.sleep(fault_seconds)
            (cluster.start if fault == "kill" else cluster.resume)(server)
            restored, acked_then = time.monotonic(), writer.acked
            wait(lambda: writer.acked >= acked_then + records_after_fault, "writes after the fault")
            recovery = next(t for t in writer.ack_times[acked_then:]) - restored
        finally:
            writer.stop.set()
            writer.join(timeout)
            reader.join(timeout)
        if writer.error is not None:
            raise RuntimeError(f"trial {trial}: the writer failed") from writer.error
    size = client.stat(path).size
    expected_size = writer.acked * record_size
    with client.open(path, "rb") as check:
        content = check.pread(max(size, expected_size), 0)
    expected = b"".join(record(trial, seq, record_size) for seq in range(writer.acked))
    got = np.frombuffer(content[:expected_size], np.uint8)
    lost = int(np.count_nonzero(got != np.frombuffer(expected[:len(got)], np.uint8))) + expected_size - len(got)
    invented = max(0, size - expected_size)
    times = [0.0] + list(np.diff(writer.ack_times))
    return TrialResult(trial, fault, server, writer.acked, writer.retries, writer.sync_errors, reader.errors, reader.short, reader.bad, lost,
                       invented, float(max(times)), max(0.0, float(recovery)))


LEADER = "mgmtd-leader"  # a drill's name for whichever mgmtd leads when the trial starts


def servers_of(cluster) -> list[str]:
    """What a drill faults: every meta and storage server, and the mgmtd leader (a standby's death
    changes nothing until it is needed)."""
    return sorted([name for name in cluster.processes if not name.startswith("mgmtd")] + [LEADER])


def run_drill(cluster, trials: int, seed: int = 0, on_trial: Callable[[TrialResult], None] | None = None,
              servers: list[str] | None = None, **trial_kwargs) -> list[TrialResult]:
    """`trials` trials over random (fault, server) pairs, cycling so every server (default
    ``servers_of(cluster)``) gets each fault; waits for every target to serve again between trials."""
    rng = np.random.default_rng(seed)
    plan = [(fault, server) for server in servers or servers_of(cluster) for fault in FAULTS]
    results = []
    with cluster.client() as client:
        for trial in range(trials):
            if trial % len(plan) == 0:
                rng.shuffle(plan)
            fault, server = plan[trial % len(plan)]
            wait_until_serving(client)
            result = run_trial(cluster, client, trial, fault, server, **trial_kwargs)
            results.append(result)
            if on_trial is not None:
                on_trial(result)
    return results
