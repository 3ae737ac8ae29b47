"""Shared by the metadata tests: a small chain table, the KV stores (memory and SQLite), a MetaService."""

from pathlib import Path

import pytest

from storage.threefs.kv import MemoryKV, SqliteKV
from storage.threefs.meta.layout import LayoutPolicy
from storage.threefs.meta.service import MetaService
from storage.threefs.meta.schema import InodeType
from storage.threefs.mgmtd.routing import Chain, ChainTable

REPO = Path(__file__).resolve().parents[1]
CHAIN_IDS = (101, 102, 103, 104, 105, 106)
TABLE = ChainTable(table_id=1, version=3, chains={c: Chain(c, 1, (c * 10, c * 10 + 1)) for c in CHAIN_IDS})


@pytest.fixture(params=["memory", "sqlite"])
def kv(request, tmp_path):
    store = MemoryKV(seed=0) if request.param == "memory" else SqliteKV(str(tmp_path / "meta.db"))
    yield store
    store.close()


@pytest.fixture
def meta(kv):
    service = MetaService(kv, lambda: TABLE, LayoutPolicy(chunk_size=4096, stripe_size=4))
    yield service
    assert service.check_consistency() == []


def reachable_files(meta, path="/"):
    """{path: inode_id} of every file and symlink reachable from `path` (directories walked)."""
    found = {}
    for e in meta.listdir(path):
        child = path.rstrip("/") + "/" + e.name
        if e.type is InodeType.DIRECTORY:
            found.update(reachable_files(meta, child))
        else:
            found[child] = e.inode_id
    return found
