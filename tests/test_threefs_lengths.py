"""Exact file lengths and appends (issue 14, part B), on an EmbeddedCluster.

A file's length in metadata comes from its writers' reports (periodic, fsync, close) and, on close and
when a dead writer's session is pruned, from storage itself (the last chunk holding bytes on each chain).
A storage length never brings back bytes a truncate or a ``wb`` reopen removed. ``ab`` appends of several
clients reserve disjoint ranges in the meta service, so none overwrites another's records.
"""

from __future__ import annotations

import threading
import time

import pytest

from storage.threefs.cluster import ClusterShape, EmbeddedCluster
from storage.threefs.kv import open_kv
from storage.threefs.meta.layout import LayoutPolicy
from storage.threefs.meta.service import MetaService

CHUNK = 4096
SHAPE = ClusterShape(nodes=3, targets_per_node=2, replicas=3, chunk_size=CHUNK, stripe=3)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def read_all(client, path: str) -> bytes:
    with client.open(path, "rb") as f:
        return f.read()


def closing_clients(cluster: EmbeddedCluster):
    """`cluster`, whose clients are closed with it (also when a test fails half-way)."""
    made, make = [], cluster.client

    def client(**kwargs):
        made.append(make(**kwargs))
        return made[-1]

    cluster.client = client
    yield cluster
    for c in made:
        c.close()


@pytest.fixture
def cluster(tmp_path):
    with EmbeddedCluster(tmp_path / "c", SHAPE, heartbeat_interval=0.05, heartbeat_timeout=1.0,
                         session_lease=0.6) as c:
        yield from closing_clients(c)


@pytest.fixture
def quiet_cluster(tmp_path):
    """No heartbeat thread: sessions end only when a test prunes them."""
    with EmbeddedCluster(tmp_path / "q", SHAPE, heartbeat_interval=None) as c:
        yield from closing_clients(c)


def racing_meta(cluster, during_query):
    """A second meta service on the cluster's KV whose storage-length query runs `during_query()` once,
    after storage answered and before the meta transaction commits (the race with a truncate)."""
    io = cluster.client(session_renew_interval=None).chunk_io
    calls = []

    def storage_length(inode):
        length = io.file_length(inode.layout, inode.inode_id)
        if not calls:
            calls.append(length)
            during_query()
        return length

    meta = MetaService(open_kv(f"sqlite:///{cluster.root / 'meta.sqlite'}"), lambda: cluster.manager.routing().chain_table,
                       LayoutPolicy(CHUNK, SHAPE.stripe), storage_length=storage_length)
    return meta, calls


def test_a_dead_writer_s_length_comes_from_storage_when_its_session_is_pruned(cluster):
    writer = cluster.client(session_renew_interval=None)  # never renews nor reports: a dead client
    data = bytes(range(1, 256)) * (3 * CHUNK // 255 + 1)
    data = data[:3 * CHUNK + 123]
    f = writer.open("/dead", "wb")
    f.write(data)  # acknowledged by every replica, never closed
    reader = cluster.client()
    assert reader.stat("/dead").size == 0
    wait_for(lambda: reader.stat("/dead").size == len(data), 5, "the pruned session's storage length")
    assert read_all(reader, "/dead") == data
    reader.close()


def test_close_takes_the_length_storage_holds(cluster):
    a, b = cluster.client(), cluster.client()
    fa = a.open("/f", "wb")
    fb = b.open("/f", "r+b")
    fb.pwrite(b"B" * 100, 2 * CHUNK)  # b's write; b's handle never reports it (it stays open)
    fa.pwrite(b"A" * 10, 0)
    fa.close()  # a reports 10; storage says 2 * CHUNK + 100
    assert a.stat("/f").size == 2 * CHUNK + 100
    fb.close()
    a.close(), b.close()


def test_writers_report_their_length_while_they_write(cluster):
    writer, reader = cluster.client(), cluster.client()  # renewal every lease / 3 = 0.2 s
    f = writer.open("/growing", "wb")
    f.write(b"x" * 5000)
    wait_for(lambda: reader.stat("/growing").size == 5000, 3, "a periodic length report")
    assert cluster.meta.renew_sessions(writer.client_id) == 1  # the session is alive: a report, not a prune
    f.close()
    writer.close(), reader.close()


def test_one_file_s_failing_report_does_not_stop_the_others_or_the_renewals(cluster):
    writer, reader = cluster.client(), cluster.client()
    broken, kept = writer.open("/broken", "wb"), writer.open("/kept", "wb")

    def fails():
        raise ValueError("this report fails")

    broken.report_length = fails  # whatever one file raises (a removed inode, a bug), the loop goes on
    broken.write(b"b" * 10)
    kept.write(b"k" * 7000)
    wait_for(lambda: reader.stat("/kept").size == 7000, 3, "the other file's periodic report")
    time.sleep(0.5)  # two more rounds: the renewal thread is still alive
    kept.write(b"k" * 1000)
    wait_for(lambda: reader.stat("/kept").size == 8000, 3, "a report after the failing ones")
    del broken.report_length
    broken.close(), kept.close()
    writer.close(), reader.close()


def test_a_storage_length_never_resurrects_bytes_a_wb_reopen_removed(quiet_cluster):
    cluster = quiet_cluster
    writer = cluster.client(session_renew_interval=None)
    f = writer.open("/r", "wb")
    f.write(b"o" * (3 * CHUNK))  # unreported: metadata says 0, storage 3 chunks
    other = cluster.client()

    def reopen_with_wb():
        with other.open("/r", "wb") as g:
            g.write(b"new")

    meta, calls = racing_meta(cluster, reopen_with_wb)
    meta.close(f.inode_id, f._session_id, None)  # storage answered 3 chunks, then the reopen committed
    assert calls == [3 * CHUNK]
    assert other.stat("/r").size == 3 and read_all(other, "/r") == b"new"
    f.closed = True
    meta.kv.close()
    writer.close(), other.close()


def test_a_storage_length_never_resurrects_bytes_a_truncate_removed_on_prune(quiet_cluster):
    cluster = quiet_cluster
    writer = cluster.client(session_renew_interval=None)
    f = writer.open("/t", "wb")
    f.write(b"o" * (3 * CHUNK))
    other = cluster.client()

    def truncate():
        with other.open("/t", "r+b") as g:
            g.truncate(5)

    meta, calls = racing_meta(cluster, truncate)
    time.sleep(0.2)  # the writer's lease (0.1 s here) ran out
    assert meta.prune_sessions(0.1) == []  # storage answered 3 chunks, then the truncate committed: stale
    assert calls == [3 * CHUNK]
    time.sleep(0.2)
    assert [s.session_id for s in meta.prune_sessions(0.1)] == [f._session_id]  # measured again: 5 bytes
    assert other.stat("/t").size == 5 and read_all(other, "/t") == b"o" * 5
    f.closed = True
    meta.kv.close()
    writer.close(), other.close()


def test_truncate_cuts_bytes_a_writer_has_not_reported(cluster):
    writer, other = cluster.client(session_renew_interval=None), cluster.client()
    f = writer.open("/u", "wb")
    f.write(b"w" * (2 * CHUNK + 7))
    with other.open("/u", "r+b") as g:
        g.truncate(0)
    f.close()  # its storage length must not bring the cut bytes back
    assert other.stat("/u").size == 0 and read_all(other, "/u") == b""
    writer.close(), other.close()


def test_a_length_report_from_before_a_truncate_is_ignored(cluster):
    writer, other = cluster.client(session_renew_interval=None), cluster.client()
    f = writer.open("/v", "wb")
    f.write(b"v" * 1000)
    f.fsync()
    with other.open("/v", "wb") as g:  # the old bytes are gone; the new file is 10 bytes
        g.write(b"n" * 10)
    f.fsync()  # reports 1000 from before the reopen: ignored
    assert other.stat("/v").size == 10
    f.close()
    assert other.stat("/v").size == 10 and read_all(other, "/v") == b"n" * 10
    writer.close(), other.close()


def test_concurrent_appends_keep_every_record_whole(cluster):
    clients = [cluster.client() for _ in range(2)]
    record, count = 100, 20
    with clients[0].open("/log", "wb"):
        pass
    start = threading.Barrier(2)

    def append(c: int) -> None:
        with clients[c].open("/log", "ab") as f:
            start.wait()
            for i in range(count):
                f.write(bytes([c * 64 + i + 1]) * record)

    threads = [threading.Thread(target=append, args=(c,)) for c in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = read_all(clients[0], "/log")
    assert len(data) == 2 * count * record and 0 not in data
    records = [data[i:i + record] for i in range(0, len(data), record)]
    assert all(len(set(r)) == 1 for r in records), "a record was torn or interleaved"
    assert sorted(r[0] for r in records) == sorted(c * 64 + i + 1 for c in range(2) for i in range(count))
    with clients[1].open("/log", "ab") as f:  # a later append lands after everything
        f.write(b"end")
    assert read_all(clients[1], "/log")[-3:] == b"end" and clients[1].stat("/log").size == 4003
    for c in clients:
        c.close()


def test_an_append_after_a_truncate_starts_at_the_new_end(cluster):
    client = cluster.client()
    with client.open("/a", "ab") as f:
        f.write(b"1" * 50)
    with client.open("/a", "r+b") as f:
        f.truncate(10)
    with client.open("/a", "ab") as f:
        f.write(b"2" * 5)
        assert f.tell() == 15
    assert read_all(client, "/a") == b"1" * 10 + b"2" * 5
    client.close()
