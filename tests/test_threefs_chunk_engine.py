"""The 3FS chunk engine (issue 15): CRC32C against google_crc32c, block-level copy-on-write in two slot
files per chunk checked against a byte model, whole-chunk overwrites that read nothing old, aborts,
SIGKILL at every step of a write, read_into, the descriptor cache, and payload checksums along a chain."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import google_crc32c
import pytest

from storage.threefs.errors import ChecksumError
from storage.threefs.storage.block_checksums import BLOCK_SIZE, block_checksums, content_checksum
from storage.threefs.storage.chunk_store import ChunkId, ChunkStore, PendingVersionExists
from storage.threefs.storage.crc32c import crc32c, crc32c_blocks
from storage.threefs.storage.fd_cache import FdCache

from threefs_storage_fixtures import cluster  # noqa: F401 - a pytest fixture

REPO = Path(__file__).resolve().parents[1]


def test_crc32c_matches_google_crc32c():
    assert crc32c(b"123456789") == 0xE3069283 == google_crc32c.value(b"123456789")  # the CRC32C check value
    data = random.Random(1).randbytes(3 * BLOCK_SIZE + 77)
    for buffer in (data, bytearray(data), memoryview(data), memoryview(bytearray(b"xx" + data))[2:]):
        assert crc32c(buffer) == google_crc32c.value(data)
        assert crc32c_blocks(buffer, BLOCK_SIZE) == [google_crc32c.value(data[p:p + BLOCK_SIZE])
                                                     for p in range(0, len(data), BLOCK_SIZE)]
    assert crc32c(bytearray(data[10:]), crc32c(data[:10])) == google_crc32c.value(data)  # extends
    table = block_checksums(data)
    assert table == b"".join(google_crc32c.value(data[p:p + BLOCK_SIZE]).to_bytes(4, "little")
                             for p in range(0, len(data), BLOCK_SIZE))
    assert content_checksum(data) == google_crc32c.value(table) and content_checksum(b"") == 0


def test_writes_match_a_byte_model(tmp_path):
    """Partial-block, multi-block, past-the-end and whole-chunk writes, aborts and reopens, checked after
    every step against a byte model, through read, read_version and read_into."""
    rng = random.Random(7)
    store = ChunkStore(tmp_path / "t", fsync=False)
    cid, model = ChunkId(1, 0), b""
    for step in range(250):
        if rng.random() < 0.1:
            offset, data, full = 0, rng.randbytes(rng.randrange(0, 5 * BLOCK_SIZE)), True
        else:
            offset, full = rng.randrange(0, 5 * BLOCK_SIZE), False
            data = rng.randbytes(rng.choice([0, 1, 100, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE + 9]))
        new = data if full else model[:offset] + bytes(max(0, offset - len(model))) + data + model[offset + len(data):]
        version = store.apply_write(cid, offset, data, chain_version=1, full_replace=full)
        assert store.read(cid, 0, 1 << 20, pending=True) == new and store.read(cid, 0, 1 << 20) == model
        if rng.random() < 0.2:
            assert store.abort_pending(cid)  # the committed bytes stay
        else:
            store.commit(cid, version)
            model = new
        assert store.read(cid, 0, 1 << 20) == model
        meta = store.meta(cid)
        assert meta is None or (meta.length, meta.checksum) == (len(model), content_checksum(model))
        offset, n = rng.randrange(0, 6 * BLOCK_SIZE), rng.randrange(0, 3 * BLOCK_SIZE)
        if meta is not None:
            buffer = bytearray(n + 1)
            got = store.read_into(cid, meta.committed_version, offset, memoryview(buffer)[:n])
            assert bytes(buffer[:got]) == model[offset:offset + n] and buffer[n:] == b"\0"
            assert store.read_version(cid, meta.committed_version, offset, n) == model[offset:offset + n]
            assert store.read_into(cid, meta.committed_version + 1, 0, memoryview(buffer)) is None
        if step % 50 == 49:
            store.close()
            store = ChunkStore(tmp_path / "t", fsync=False)
            names = sorted(p.name for p in (tmp_path / "t" / "chunks").iterdir())
            assert names == ([store.content_path(cid).name] if meta else [])  # spares are dropped on reopen
    store.close()


def test_a_write_that_fails_half_way_never_leaks_into_the_next_version(tmp_path, monkeypatch):
    """A write that failed after touching the spare slot (a full disk) leaves its bytes there; the next
    write must not build on them, and a missing committed slot file reads as damage (ChecksumError, which
    the service repairs), not as a bare FileNotFoundError."""
    from storage.threefs.storage import chunk_store as chunk_store_module

    store = ChunkStore(tmp_path / "t", fsync=False)
    cid = ChunkId(4, 0)
    model = random.Random(1).randbytes(6 * BLOCK_SIZE)
    store.commit(cid, store.apply_write(cid, 0, model, chain_version=1))
    store.commit(cid, store.apply_write(cid, 0, b"a" * BLOCK_SIZE, chain_version=1))  # the spare now lags by block 0
    model = b"a" * BLOCK_SIZE + model[BLOCK_SIZE:]
    build = chunk_store_module.build_version

    def disk_full_after_writing(*args, **kwargs):
        build(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chunk_store_module, "build_version", disk_full_after_writing)
    with pytest.raises(OSError, match="No space"):
        store.apply_write(cid, 3 * BLOCK_SIZE, b"x" * BLOCK_SIZE, chain_version=1)
    monkeypatch.setattr(chunk_store_module, "build_version", build)
    store.commit(cid, store.apply_write(cid, 5 * BLOCK_SIZE, b"z" * 10, chain_version=1))
    model = model[:5 * BLOCK_SIZE] + b"z" * 10 + model[5 * BLOCK_SIZE + 10:]
    assert store.read(cid, 0, 1 << 20) == model
    store.close()
    store = ChunkStore(tmp_path / "t", fsync=False)  # no descriptor of the slot files cached
    for path in (tmp_path / "t" / "chunks").glob(f"{cid.hex()}*"):
        path.unlink()
    with pytest.raises(ChecksumError, match="missing"):
        store.apply_write(cid, 0, b"q", chain_version=1)
    store.close()


def test_a_whole_chunk_overwrite_reads_nothing_old(tmp_path):
    store = ChunkStore(tmp_path / "t", fsync=False)
    cid = ChunkId(2, 0)
    store.commit(cid, store.apply_write(cid, 0, b"a" * (3 * BLOCK_SIZE), chain_version=1))
    store.content_path(cid).write_bytes(b"\xff" * (3 * BLOCK_SIZE))  # every committed block damaged
    with pytest.raises(ChecksumError, match="block 0"):
        store.apply_write(cid, 10, b"b", chain_version=1)  # merging with a damaged block: caught
    store.commit(cid, store.apply_write(cid, 0, b"c" * (3 * BLOCK_SIZE), chain_version=1))  # covers it: no read
    assert store.read(cid, 0, 1 << 20) == b"c" * (3 * BLOCK_SIZE)
    store.commit(cid, store.apply_write(cid, 0, b"d" * BLOCK_SIZE, chain_version=1))  # aligned prefix: no read
    assert store.read(cid, 0, 1 << 20) == b"d" * BLOCK_SIZE + b"c" * (2 * BLOCK_SIZE)
    store.close()


def test_pending_abort_and_concurrent_writes(tmp_path):
    store = ChunkStore(tmp_path / "t", fsync=False)
    cid = ChunkId(3, 0)
    store.commit(cid, store.apply_write(cid, 0, b"x" * 10_000, chain_version=1))
    assert store.apply_write(cid, 5000, b"y" * 3000, chain_version=1) == 2
    with pytest.raises(PendingVersionExists):
        store.apply_write(cid, 0, b"z", chain_version=1)
    assert store.abort_pending(cid) and store.read(cid, 0, 1 << 20) == b"x" * 10_000
    assert store.apply_write(cid, 9000, b"w" * 2000, chain_version=1) == 2  # builds on the committed bytes
    store.commit(cid, 2)
    assert store.read(cid, 0, 1 << 20) == b"x" * 9000 + b"w" * 2000
    assert store.apply_write(ChunkId(3, 1), 0, b"new", chain_version=1) == 1  # a chunk that only has pending
    assert store.abort_pending(ChunkId(3, 1)) and store.meta(ChunkId(3, 1)) is None
    assert sorted(p.name for p in (tmp_path / "t" / "chunks").iterdir()) == [f"{cid.hex()}.0", f"{cid.hex()}.1"]
    assert store.remove_inode(3) == 1 and list((tmp_path / "t" / "chunks").iterdir()) == []
    store.close()


_STEP_KILLER = """
import os, signal, sys
from storage.threefs.storage import chunk_meta_db, version_writer
from storage.threefs.storage.chunk_store import ChunkId, ChunkStore
kill_at, steps = int(sys.argv[2]), [0]
def step():
    steps[0] += 1
    if steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
def killing(fn):
    def wrapped(*args, **kwargs):
        step()
        result = fn(*args, **kwargs)
        step()
        return result
    return wrapped
class Os:  # version_writer's view of os: every call with an effect on disk is a step
    def __getattr__(self, name):
        return killing(getattr(os, name)) if name in ("pwrite", "ftruncate", "copy_file_range") else getattr(os, name)
store = ChunkStore(sys.argv[1])
cid = ChunkId(1, 0)
A = bytes(range(256)) * 48
if store.meta(cid) is None:
    store.commit(cid, store.apply_write(cid, 0, A, chain_version=1))
    store.commit(cid, store.apply_write(cid, 100, b"a" * 5000, chain_version=1))  # the spare is now 2 blocks stale
    store.close()
    print("setup", flush=True)
    sys.exit()
version_writer.os = Os()
chunk_meta_db.ChunkMetaDb.put = killing(chunk_meta_db.ChunkMetaDb.put)
store.commit(cid, store.apply_write(cid, 3 * 4096 - 10, b"B" * 4200, chain_version=1))  # merges 2 edge blocks
print("done", steps[0], flush=True)
"""


def test_sigkill_at_each_step_of_a_write_leaves_the_old_or_the_new_version(tmp_path):
    def run(kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _STEP_KILLER, str(tmp_path / "t"), str(kill_at)], cwd=REPO,
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)

    assert run(0).stdout == b"setup\n"
    with ChunkStore(tmp_path / "t") as store:
        old = store.read(ChunkId(1, 0), 0, 1 << 20)
    new = old[:3 * 4096 - 10] + b"B" * 4200 + old[3 * 4096 - 10 + 4200:]
    seen = []
    for kill_at in range(1, 100):
        result = run(kill_at)
        with ChunkStore(tmp_path / "t") as store:
            meta, content = store.meta(ChunkId(1, 0)), store.read(ChunkId(1, 0), 0, 1 << 20)
        if result.returncode == 0:
            assert content == new and result.stdout.startswith(b"done")
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert meta.pending_version == 0 and content in (old, new), f"killed at step {kill_at}: a mix"
        seen.append(content == new)
        if content == new:  # the commit landed: start over from the old version
            with ChunkStore(tmp_path / "t") as store:
                store.replace(ChunkId(1, 0), old, meta.committed_version + 1, 1)
    assert seen.count(False) >= 4 and seen[-1], seen  # killed before and inside the data writes, and after commit


def test_read_into_and_a_version_written_over(tmp_path):
    store = ChunkStore(tmp_path / "t", fsync=False)
    cid = ChunkId(4, 0)
    data = random.Random(3).randbytes(2 * BLOCK_SIZE + 300)
    store.commit(cid, store.apply_write(cid, 0, data, chain_version=1))
    buffer = bytearray(len(data) + 50)
    assert store.read_into(cid, 1, 0, memoryview(buffer)) == len(data) and bytes(buffer[:len(data)]) == data
    assert store.read_into(cid, 1, len(data) + 5, memoryview(buffer)) == 0
    store.commit(cid, store.apply_write(cid, 10, b"v2", chain_version=1))
    store.commit(cid, store.apply_write(cid, 20, b"v3", chain_version=1))  # version 1's slot now holds 3
    assert store.read_into(cid, 1, 0, memoryview(buffer)) is None and store.read_version(cid, 1, 0, 10) is None
    path = store.content_path(cid)
    raw = bytearray(path.read_bytes())
    raw[BLOCK_SIZE + 1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="block 1"):
        store.read_into(cid, 3, BLOCK_SIZE, memoryview(buffer)[:10])
    assert store.read_into(cid, 3, 0, memoryview(buffer)[:BLOCK_SIZE]) == BLOCK_SIZE  # block 0 is intact
    store.close()


def test_fd_cache_keeps_descriptors_in_use_open(tmp_path):
    cache = FdCache(capacity=2)
    paths = [str(tmp_path / f"f{i}") for i in range(4)]
    with cache.use(paths[0], create=True) as first:
        for path in paths[1:]:
            with cache.use(path, create=True):
                pass
        assert cache.paths() == [paths[0], paths[3]]  # the one in use is not evicted
        os.pwrite(first, b"still open", 0)
        cache.forget(paths[0])  # closed by its last user, not now
        os.pwrite(first, b"still open", 0)
    with pytest.raises(OSError):
        os.fstat(first)
    assert len(cache.paths()) <= 2
    with pytest.raises(FileNotFoundError):
        with cache.use(str(tmp_path / "missing")):
            pass
    cache.close()


def test_sync_makes_written_slots_durable(tmp_path):
    store = ChunkStore(tmp_path / "t", sync_interval=0)  # no background syncs: only explicit ones
    cid = ChunkId(5, 0)
    store.commit(cid, store.apply_write(cid, 0, b"durable", chain_version=1))
    assert store.unsynced_files() == [f"{cid.hex()}.0"] and store.metadata_unsynced()  # what the next sync fsyncs
    assert store.sync() == 1
    assert store.unsynced_files() == [] and not store.metadata_unsynced()
    assert store.sync() == 0  # nothing written since: no fsync at all
    store.close()
    with ChunkStore(tmp_path / "t", sync_interval=0.01) as store:  # a background sync clears it by itself
        store.commit(cid, store.apply_write(cid, 7, b"!", chain_version=1))
        for _ in range(500):
            if not store.unsynced_files() and not store.metadata_unsynced():
                break
            time.sleep(0.01)
        assert store.unsynced_files() == [] and not store.metadata_unsynced()
        assert store.read(cid, 0, 100) == b"durable!"


def test_a_damaged_payload_is_refused_at_the_head_and_at_each_replica(cluster):
    routing = cluster.manager.routing()
    head, middle, tail = routing.chain(1).targets
    chunk = ChunkId(9, 0)
    cluster.write(1, chunk, 0, b"A" * 100)
    before = cluster.replica_view(1)
    version = routing.chain(1).version
    head_service = cluster.services[routing.target_node[head]]
    with pytest.raises(ChecksumError, match="damaged on the way"):
        head_service.write(1, version, chunk, 0, b"B" * 10, False, google_crc32c.value(b"C" * 10))
    middle_service = cluster.services[routing.target_node[middle]]
    with pytest.raises(ChecksumError, match="damaged on the way"):
        middle_service.update(1, version, middle, chunk, 0, b"B" * 10, False, 2,
                              content_checksum(b"B" * 10 + b"A" * 90), google_crc32c.value(b"C" * 10))
    assert cluster.replica_view(1) == before  # nothing applied anywhere
    assert head_service.write(1, version, chunk, 0, b"B" * 10, False, google_crc32c.value(b"B" * 10)) == 2
    assert all(cluster.read(1, t, chunk) == b"B" * 10 + b"A" * 90 for t in (head, middle, tail))
