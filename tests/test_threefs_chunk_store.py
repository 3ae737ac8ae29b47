"""3FS chunk ids and the on-disk ChunkStore: versions, reopen, per-block checksums, format, SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from storage.threefs.storage.block_checksums import content_checksum
from storage.threefs.storage.block_checksums import BLOCK_SIZE
from storage.threefs.storage.chunk_store import ChunkId, ChunkStore, ChunkStoreFormatError, PendingVersionExists
from storage.threefs.errors import ChecksumError

REPO = Path(__file__).resolve().parents[1]


def test_chunk_id_encoding():
    cid = ChunkId(0x0102030405060708, 0x0A0B0C0D)
    raw = cid.to_bytes()
    assert raw == bytes.fromhex("0000" "0102030405060708" "0000" "0a0b0c0d")
    assert ChunkId.from_bytes(raw) == cid and ChunkId.from_hex(cid.hex()) == cid
    assert ChunkId(1, 5).to_bytes() < ChunkId(1, 6).to_bytes() < ChunkId(2, 0).to_bytes()
    with pytest.raises(ValueError, match="chunk_index"):
        ChunkId(1, 1 << 32).to_bytes()


def test_chunk_store_versions_and_reopen(tmp_path):
    cid = ChunkId(7, 0)
    store = ChunkStore(tmp_path / "t")
    assert store.read(cid, 0, 10) == b"" and store.meta(cid) is None
    assert store.apply_write(cid, 3, b"abc", chain_version=1) == 1
    assert store.read(cid, 0, 10) == b"" and store.read(cid, 0, 10, pending=True) == b"\0\0\0abc"
    store.commit(cid, 1)
    assert store.read(cid, 0, 100) == b"\0\0\0abc" and store.read(cid, 4, 1) == b"b"
    assert store.apply_write(cid, 8, b"XY", chain_version=2) == 2  # past the end: zero-extended
    with pytest.raises(PendingVersionExists, match="pending version 2"):
        store.apply_write(cid, 0, b"no", chain_version=2)
    store.commit(cid, 2)
    assert store.read(cid, 0, 100) == b"\0\0\0abc\0\0XY"
    assert store.meta(cid)[1:4] == (2, 0, 2)
    store.apply_write(cid, 0, b"Z", chain_version=3)  # pending 3, never committed
    store.apply_write(ChunkId(7, 1), 0, b"only pending", chain_version=3)
    store.close()
    (tmp_path / "t" / "chunks" / "orphan.v9.crashed").write_bytes(b"junk")

    reopened = ChunkStore(tmp_path / "t")
    assert reopened.read(cid, 0, 100) == b"\0\0\0abc\0\0XY"
    assert [m[:6] for m in reopened.list_meta()] == [(cid, 2, 0, 2, 10, content_checksum(b"\0\0\0abc\0\0XY"))]
    assert reopened.meta(ChunkId(7, 1)) is None
    assert sorted(p.name for p in (tmp_path / "t" / "chunks").iterdir()) == [reopened.content_path(cid).name]
    reopened.replace(cid, b"whole", committed_version=9, chain_version=4)
    assert reopened.read(cid, 0, 100) == b"whole" and reopened.meta(cid).committed_version == 9
    assert reopened.remove_inode(7) == 1 and reopened.list_meta() == []
    assert list((tmp_path / "t" / "chunks").iterdir()) == []
    reopened.close()


def test_chunk_store_checks_the_blocks_it_reads(tmp_path):
    store = ChunkStore(tmp_path / "t")
    cid = ChunkId(3, 2)
    data = random.Random(5).randbytes(3 * BLOCK_SIZE + 500)  # blocks 0-2 whole, block 3 short
    store.apply_write(cid, 0, data, chain_version=1)
    store.commit(cid, 1)
    assert store.meta(cid).checksum == content_checksum(data)  # the version checksum: CRC32C of the block CRC32Cs
    path = store.content_path(cid)
    raw = bytearray(path.read_bytes())
    raw[BLOCK_SIZE + 150] ^= 0x40  # bit rot in block 1
    path.write_bytes(bytes(raw))
    # a read checks the blocks it returns: intact blocks next to the damaged one read fine
    assert store.read(cid, 0, BLOCK_SIZE) == data[:BLOCK_SIZE]
    assert store.read(cid, BLOCK_SIZE - 6, 6) == data[BLOCK_SIZE - 6:BLOCK_SIZE]
    assert store.read(cid, 2 * BLOCK_SIZE, 1 << 20) == data[2 * BLOCK_SIZE:]
    assert store.read(cid, len(data) + 10, 5) == b""
    # a read overlapping the damaged block fails, naming the chunk, the target and the block
    for offset, length in [(BLOCK_SIZE + 150, 1), (BLOCK_SIZE - 1, 2), (2 * BLOCK_SIZE - 1, 1), (0, 1 << 20)]:
        with pytest.raises(ChecksumError, match=rf"chunk ChunkId\(inode_id=3, chunk_index=2\).*{tmp_path / 't'}"
                                                rf".*block 1 \(bytes \[4096, 8192\)\)"):
            store.read(cid, offset, length)
    with pytest.raises(ChecksumError, match="block 1"):  # the whole chunk (read_chunk, resync): every block
        store.read_version(cid, 1, 0, 1 << 62)
    with pytest.raises(ChecksumError, match="block 1"):  # an update merging with the damaged block
        store.apply_write(cid, BLOCK_SIZE + 5, b"x", chain_version=1)
    store.apply_write(cid, 3 * BLOCK_SIZE, b"x", chain_version=1)  # elsewhere: block 1 is copied as it is,
    with pytest.raises(ChecksumError, match="block 1"):                # with its checksum: still caught
        store.read(cid, BLOCK_SIZE, 1, pending=True)
    assert store.abort_pending(cid)
    # the file's length: a read that reaches the end checks where the file ends
    path.write_bytes(data + b"junk")
    assert store.read(cid, 0, 100) == data[:100]
    with pytest.raises(ChecksumError, match="more than the 12788 bytes"):
        store.read(cid, len(data) - 10, 100)
    path.write_bytes(data[:5000])
    assert store.read(cid, 0, 10) == data[:10]
    with pytest.raises(ChecksumError, match="ends at byte 5000, inside block 1"):
        store.read(cid, BLOCK_SIZE, 10)
    store.close()


def test_chunk_store_refuses_another_metadata_format(tmp_path):
    (tmp_path / "t").mkdir()
    db = sqlite3.connect(tmp_path / "t" / "chunkmeta.sqlite")  # a store from before per-block checksums
    db.execute("CREATE TABLE chunks (id BLOB PRIMARY KEY, committed_version INTEGER NOT NULL)")
    db.commit()
    db.close()
    with pytest.raises(ChunkStoreFormatError, match="has metadata format 0; this code reads format 3"):
        ChunkStore(tmp_path / "t")
    (tmp_path / "v2").mkdir()  # a store of the previous engine (a file per version, CRC32): refused too
    db = sqlite3.connect(tmp_path / "v2" / "chunkmeta.sqlite")
    db.execute("CREATE TABLE chunks (id BLOB PRIMARY KEY, committed_version INTEGER NOT NULL)")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    with pytest.raises(ChunkStoreFormatError, match="has metadata format 2; this code reads format 3"):
        ChunkStore(tmp_path / "v2")
    ChunkStore(tmp_path / "fresh").close()
    ChunkStore(tmp_path / "fresh").close()  # a store this code created reopens


_CRASH_WRITER = """
import sys
from storage.threefs.storage.chunk_store import ChunkId, ChunkStore
store = ChunkStore(sys.argv[1])
cid = ChunkId(1, 0)
version = store.meta(cid).committed_version if store.meta(cid) else 0
for written in range(1, 1 << 30):
    version = store.apply_write(cid, 0, bytes([(version + 1) % 256]) * 50_000, chain_version=1)
    store.commit(cid, version)
    if written == 3:
        print("ready", flush=True)
"""


def test_chunk_store_survives_kill(tmp_path):
    """SIGKILL a process in the middle of a stream of writes: the store reopens at a committed version."""
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _CRASH_WRITER, str(tmp_path / "t")], cwd=REPO,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = ChunkStore(tmp_path / "t")
        meta = store.meta(ChunkId(1, 0))
        assert meta.pending_version == 0 and meta.committed_version >= 3 * (attempt + 1)
        assert store.read(ChunkId(1, 0), 0, 1 << 20) == bytes([meta.committed_version % 256]) * 50_000
        assert len(list((tmp_path / "t" / "chunks").iterdir())) == 1
        store.close()
