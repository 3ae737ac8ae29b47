"""3FS per-request shortcuts (issue 15, part I) against references: small CRC32Cs, memoized routing paths,
the routing a storage service observed last, the lazy error context of chunk reads, and the metadata
checkpoint on its own connection."""

from __future__ import annotations

import random
import threading

import google_crc32c
import pytest

from storage.threefs.errors import ChecksumError
from storage.threefs.mgmtd.routing import Chain, ChainTable, RoutingInfo, TargetState
from storage.threefs.storage.block_checksums import BLOCK_SIZE
from storage.threefs.storage.chunk_store import ChunkId, ChunkStore
from storage.threefs.storage.crc32c import COPY_BELOW, crc32c, crc32c_blocks
from storage.threefs.storage.service import StorageService


def test_crc32c_of_small_and_large_buffers_matches_google_crc32c():
    rng = random.Random(5)
    for size in (1, 100, BLOCK_SIZE, COPY_BELOW - 1, COPY_BELOW, COPY_BELOW + 4097, 3 * COPY_BELOW):
        data = rng.randbytes(size)
        for kind in (bytes, bytearray, lambda b: memoryview(bytearray(b)), lambda b: memoryview(b)):
            value = kind(data)
            assert crc32c(value) == google_crc32c.value(data), (size, kind)
            assert crc32c(value, 0x1234) == google_crc32c.extend(0x1234, data), (size, kind)
            assert crc32c_blocks(value, BLOCK_SIZE) == [
                google_crc32c.value(data[p:p + BLOCK_SIZE]) for p in range(0, size, BLOCK_SIZE)], (size, kind)


def _routing(states: dict[int, TargetState]) -> RoutingInfo:
    chains = {1: Chain(1, 3, (1, 2, 3)), 2: Chain(2, 1, (4, 5, 6))}
    return RoutingInfo(ChainTable(1, 4, chains), dict(states), {t: (t - 1) % 3 + 1 for t in range(1, 7)},
                       {1: "a", 2: "b", 3: "c"})


def test_routing_paths_are_memoized_per_snapshot_and_stay_off_the_wire():
    from storage.threefs.net.wire_types import threefs_codec

    states = {1: TargetState.SERVING, 2: TargetState.SYNCING, 3: TargetState.OFFLINE, 4: TargetState.LASTSRV,
              5: TargetState.WAITING, 6: TargetState.SERVING}
    routing = _routing(states)
    for _ in range(2):  # computed, then remembered: the same answers as the definition
        assert routing.write_path(1) == (1, 2) and routing.readable_targets(1) == (1,)
        assert routing.write_path(2) == (4, 6) and routing.readable_targets(2) == (4, 6)
        assert routing.successor(1, 1) == 2 and routing.successor(2, 6) is None
    other = _routing({**states, 2: TargetState.SERVING})  # another snapshot: its own answers
    assert other.write_path(1) == (1, 2) and other.readable_targets(1) == (1, 2)
    assert routing == _routing(states) and "_paths" not in repr(routing)  # not a field that compares or shows
    codec = threefs_codec()
    decoded = codec.decode(b"".join(bytes(part) for part in codec.encode(routing)))
    assert decoded == routing and decoded.readable_targets(2) == (4, 6)


def test_a_service_observing_an_older_routing_again_still_notes_it(tmp_path):
    store = ChunkStore(tmp_path / "t", fsync=False)
    down = _routing({1: TargetState.OFFLINE, 2: TargetState.SERVING, 3: TargetState.SERVING,
                     4: TargetState.SERVING, 5: TargetState.SERVING, 6: TargetState.SERVING})
    up = _routing({t: TargetState.SERVING for t in range(1, 7)})
    service = StorageService(1, {1: store}, lambda: up, peer=lambda node: None)
    try:
        recovering = lambda: service.local_states()[1].value  # noqa: E731
        service._membership.observe(down)
        assert recovering() == "online"
        service._membership.observe(up)
        assert recovering() == "up-to-date"
        service._membership.observe(up)  # the same snapshot again: nothing changes
        assert recovering() == "up-to-date"
        service._membership.observe(down)  # an older snapshot seen again after another one: noted again
        assert recovering() == "online"
    finally:
        store.close()


def test_a_damaged_read_names_chunk_version_target_and_file(tmp_path):
    store = ChunkStore(tmp_path / "t", fsync=False)
    cid = ChunkId(9, 4)
    data = random.Random(2).randbytes(3 * BLOCK_SIZE)
    store.commit(cid, store.apply_write(cid, 0, data, chain_version=1))
    assert store.read_version(cid, 1, 0, len(data)) == data  # the cached slot path reads the right file
    path = store.content_path(cid)
    raw = bytearray(path.read_bytes())
    raw[BLOCK_SIZE + 1] ^= 1
    path.write_bytes(bytes(raw))
    pattern = rf"^chunk ChunkId\(inode_id=9, chunk_index=4\) version 1 on target {tmp_path / 't'}: file {path.name}: block 1"
    with pytest.raises(ChecksumError, match=pattern):
        store.read_into(cid, 1, 0, memoryview(bytearray(2 * BLOCK_SIZE)))
    with pytest.raises(ChecksumError, match=pattern):
        store.read_version(cid, 1, BLOCK_SIZE, 10)
    store.close()


def test_checkpoints_alongside_writes_lose_no_committed_row(tmp_path):
    """Group commit on its own connection while writes commit: every committed version reopens."""
    store = ChunkStore(tmp_path / "t", fsync=True, sync_interval=0.001)
    rng = random.Random(3)
    expected: dict[ChunkId, bytes] = {}
    stop = threading.Event()

    def sync_often() -> None:
        while not stop.is_set():
            store.sync()

    syncer = threading.Thread(target=sync_often)
    syncer.start()
    try:
        for i in range(60):
            cid = ChunkId(1, i % 7)
            data = rng.randbytes(rng.randrange(1, 3 * BLOCK_SIZE))
            store.commit(cid, store.apply_write(cid, 0, data, chain_version=1, full_replace=True,
                                                version=store.meta(cid).committed_version + 1 if store.meta(cid) else 1))
            expected[cid] = data
    finally:
        stop.set()
        syncer.join()
    store.close()
    reopened = ChunkStore(tmp_path / "t", fsync=False)
    try:
        assert {cid: reopened.read(cid, 0, 1 << 20) for cid in expected} == expected
    finally:
        reopened.close()
