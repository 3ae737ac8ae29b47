"""storage.threefs: what a user of ``Client`` / ``ThreeFSFile`` gets when something is wrong (EmbeddedCluster).

Every error is an ``OSError`` with its errno (the classes live in ``storage.threefs.errors``); internal
retry signals (ChainVersionMismatch, TargetNotServing, ChunkDiverged, ...) never reach the user. A read
never invents zeros: a handle whose file was removed gets ESTALE once the chunks are gone, a handle
whose file shrank (another client's ``wb`` or truncate) reads the current bytes, short at the new end,
and a chunk with no intact replica fails at once with EIO. Fixtures are in threefs_client_fixtures.
"""

from __future__ import annotations

import errno
import time

import numpy as np
import pytest

from storage.threefs import errors
from storage.threefs.storage.chunk_id import ChunkId

from threefs_client_fixtures import CHUNK, SHAPE, chunk_files_on_disk, random_bytes, read_all, write_file
from threefs_client_fixtures import client, cluster  # noqa: F401 - pytest fixtures


def _errno_of(fn) -> tuple[type, int | None]:
    try:
        fn()
    except OSError as exc:
        return type(exc), exc.errno
    raise AssertionError(f"{fn} raised nothing")


def _collect(cluster, client, inode_id: int) -> None:
    """Deletes a removed file's chunks: by an explicit collection where the client has one, then waits
    for the chunks to be gone (a background collector may do it instead)."""
    collect = getattr(client, "collect_garbage", None)
    if collect is not None:
        collect()
    deadline = time.monotonic() + 10
    while chunk_files_on_disk(cluster.root, inode_id):
        assert time.monotonic() < deadline, "the removed file's chunks were not collected"
        time.sleep(0.02)


def _corrupt_every_replica(cluster, chunk_id: ChunkId, chain_id: int) -> None:
    for target in cluster.manager.routing().chain(chain_id).targets:
        path = cluster.services[target // 100].store(target).content_path(chunk_id)
        raw = bytearray(path.read_bytes())
        raw[7] ^= 0xFF
        path.write_bytes(bytes(raw))


def test_every_user_facing_error_is_an_oserror_with_its_errno(cluster, client):
    client.makedirs("/d/sub")
    write_file(client, "/d/f", b"data")
    write_file(client, "/eio", bytes(range(256)) * (CHUNK // 256))
    cases = {
        "open missing": (lambda: client.open("/missing", "rb"), errno.ENOENT),
        "stat missing": (lambda: client.stat("/missing"), errno.ENOENT),
        "remove missing": (lambda: client.remove("/missing"), errno.ENOENT),
        "create exclusive": (lambda: client.open("/d/f", "xb"), errno.EEXIST),
        "makedirs existing": (lambda: client.makedirs("/d", exist_ok=False), errno.EEXIST),
        "rename no-replace": (lambda: client.rename("/d/sub", "/d/f", replace=False), errno.EEXIST),
        "open a directory": (lambda: client.open("/d", "rb"), errno.EISDIR),
        "listdir of a file": (lambda: client.listdir("/d/f"), errno.ENOTDIR),
        "path through a file": (lambda: client.open("/d/f/x", "wb"), errno.ENOTDIR),
        "remove non-empty": (lambda: client.remove("/d"), errno.ENOTEMPTY),
        "rename into itself": (lambda: client.rename("/d", "/d/sub/d"), errno.EINVAL),
    }
    got = {name: _errno_of(fn) for name, (fn, _) in cases.items()}
    assert {name: code for name, (_, code) in got.items()} == {name: code for name, (_, code) in cases.items()}

    # a metadata transaction that kept conflicting reaches a user as a give-up (ETIMEDOUT)
    conflict = errors.TransactionConflict("still conflicted after 3 retries")
    assert isinstance(conflict, TimeoutError) and conflict.errno == errno.ETIMEDOUT

    # EIO: no intact replica of a chunk
    inode = cluster.meta.stat("/eio")
    _corrupt_every_replica(cluster, ChunkId(inode.inode_id, 0), inode.layout.chain_of_chunk(0))
    with client.open("/eio", "rb") as f:
        kind, code = _errno_of(lambda: f.pread(CHUNK, 0))
    assert issubclass(kind, errors.NoIntactReplica) and code == errno.EIO

    # ESTALE: a handle of a removed file whose chunks are gone
    reader = client.open("/d/f", "rb")
    client.remove("/d/f")
    _collect(cluster, client, reader.inode_id)
    kind, code = _errno_of(lambda: reader.pread(4, 0))
    assert issubclass(kind, errors.StaleFileHandle) and code == errno.ESTALE
    reader.close()

    # ETIMEDOUT: no replica answers within the retry window (every node down); no retry signal escapes
    impatient = cluster.client(retry_timeout=0.3)
    try:
        write_file(impatient, "/t", b"x" * CHUNK)
        f = impatient.open("/t", "rb")
        for node in SHAPE.targets():
            cluster.stop_node(node)
        kind, code = _errno_of(lambda: f.pread(CHUNK, 0))
        assert issubclass(kind, TimeoutError) and code == errno.ETIMEDOUT, kind
        f.close()
    finally:
        impatient.close()


def test_a_removed_file_reads_estale_never_zeros(cluster, client):
    data = random_bytes(np.random.default_rng(31), 3 * CHUNK + 5)
    write_file(client, "/gone", data)
    other = cluster.client()
    try:
        reader = other.open("/gone", "rb")
        early = other.open("/gone", "rb")
        assert early.pread(CHUNK, 0) == data[:CHUNK]
        client.remove("/gone")
        _collect(cluster, client, reader.inode_id)
        for read in (lambda: reader.pread(len(data), 0), lambda: reader.read(), lambda: reader.read(10),
                     lambda: reader.readinto(bytearray(CHUNK)), lambda: early.pread(CHUNK, CHUNK),
                     lambda: reader.seek(0, 2)):
            with pytest.raises(errors.StaleFileHandle) as info:
                read()
            assert info.value.errno == errno.ESTALE and "/gone" in str(info.value)
        reader.close()
        early.close()
    finally:
        other.close()


def test_a_reader_of_a_truncated_file_gets_its_current_bytes(cluster, client):
    rng = np.random.default_rng(32)
    old, new = random_bytes(rng, 4 * CHUNK), random_bytes(rng, CHUNK + CHUNK // 2)
    write_file(client, "/t", old)
    other = cluster.client()
    try:
        positional, streaming = other.open("/t", "rb"), other.open("/t", "rb")
        write_file(client, "/t", new)  # "wb" by another client: truncated, then 1.5 chunks written
        assert positional.pread(4 * CHUNK, 0) == new
        assert positional.pread(CHUNK, 2 * CHUNK) == b""
        assert streaming.read() == new and streaming.read() == b""
        with client.open("/t", "r+b") as f:  # a truncate by another client
            f.truncate(CHUNK // 2)
        assert positional.pread(4 * CHUNK, 0) == new[:CHUNK // 2]
        positional.close()
        streaming.close()
        # a real hole (a sparse file) still reads as zeros
        with client.open("/sparse", "wb") as f:
            f.pwrite(b"end", 3 * CHUNK)
        with other.open("/sparse", "rb") as f:
            assert f.pread(3 * CHUNK + 3, 0) == bytes(3 * CHUNK) + b"end"
    finally:
        other.close()


def test_no_intact_replica_fails_at_once_with_eio(cluster, client):
    data = random_bytes(np.random.default_rng(33), 2 * CHUNK)
    write_file(client, "/bad", data)
    inode = cluster.meta.stat("/bad")
    _corrupt_every_replica(cluster, ChunkId(inode.inode_id, 0), inode.layout.chain_of_chunk(0))
    with client.open("/bad", "rb") as f:
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            f.pread(2 * CHUNK, 0)
        assert time.monotonic() - started < 1.0
        assert info.value.errno == errno.EIO and isinstance(info.value, errors.NoIntactReplica)
        assert "chunk" in str(info.value)
        assert f.pread(CHUNK, CHUNK) == data[CHUNK:]  # the intact chunk still reads
    with client.open("/bad", "r+b") as f:  # a partial write on top of it cannot build on it either
        with pytest.raises(OSError) as info:
            f.pwrite(b"x", 3)
        assert info.value.errno == errno.EIO
