"""Chunk-id range queries on a target (issue 14, part B): one inode's chunks are one key range of the
chunk store (the 16-byte chunk id sorts by inode, then index), so removing a file's chunks and asking a
file's length from storage touch exactly that inode's rows, never a neighbour's."""

from __future__ import annotations

from storage.threefs.storage.chunk_store import ChunkId, ChunkStore

from threefs_storage_fixtures import cluster  # noqa: F401 - the fixture


def _put(store: ChunkStore, chunk_id: ChunkId, data: bytes) -> None:
    store.commit(chunk_id, store.apply_write(chunk_id, 0, data, chain_version=1))


def test_inode_chunks_is_a_range_query_that_spares_neighbouring_inodes(tmp_path):
    store = ChunkStore(tmp_path / "t", fsync=False)
    for inode in (6, 7, 8, (1 << 64) - 1):
        for index in (0, 1, 5):
            _put(store, ChunkId(inode, index), bytes([inode % 251 + 1]) * (index + 1))
    assert [m.chunk_id for m in store.inode_chunks(7)] == [ChunkId(7, 0), ChunkId(7, 1), ChunkId(7, 5)]
    assert [m.length for m in store.inode_chunks((1 << 64) - 1)] == [1, 2, 6]   # no overflow at the top id
    assert store.inode_chunks(9) == []
    assert store.remove_inode(7) == 3
    assert store.inode_chunks(7) == []
    assert sorted({m.chunk_id.inode_id for m in store.list_meta()}) == [6, 8, (1 << 64) - 1]
    assert len(store.list_meta()) == 9
    store.close()


def test_remove_chunks_and_last_chunk_touch_only_that_inode(cluster):  # noqa: F811
    chain = cluster.manager.routing().chain_table.chain_ids[0]
    head = cluster.manager.routing().write_path(chain)[0]
    service = cluster.services[cluster.manager.routing().target_node[head]]
    for inode in (41, 42, 43):
        for index, size in ((0, 4096), (3, 100), (4, 0)):
            service.write(chain, cluster.manager.routing().chain(chain).version, ChunkId(inode, index), 0,
                          bytes([inode]) * size, full_replace=True)
    tail = cluster.manager.routing().readable_targets(chain)[-1]
    tail_service = cluster.services[cluster.manager.routing().target_node[tail]]
    # the last chunk holding bytes: index 3 (the emptied chunk 4 counts for nothing)
    assert tail_service.last_chunk(chain, tail, 42) == (3, 100)
    assert tail_service.last_chunk(chain, tail, 44) is None
    assert service.remove_chunks(chain, 42) == 3
    for target in cluster.manager.routing().chain(chain).targets:
        store = cluster.services[cluster.manager.routing().target_node[target]].store(target)
        assert store.inode_chunks(42) == []
        assert [len(store.inode_chunks(i)) for i in (41, 43)] == [3, 3]
    assert tail_service.last_chunk(chain, tail, 42) is None
