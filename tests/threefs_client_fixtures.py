"""Shared fixtures and helpers for the storage.threefs end-to-end client tests, on an EmbeddedCluster
(mgmtd, meta and storage in-process).

Small chunks (4 KiB) so every file spans many chunks and every stripe chain. The cluster is 3 nodes x 3
targets, 3 chains of 3 replicas (every node holds one target of each chain), files striped over all three
chains. Replicas are checked through each node's ChunkStore, and on disk under root/node-N/target-T/.

Test modules import the names they use, the `cluster` and `client` fixtures included:
`from threefs_client_fixtures import client, cluster` (tests/ is on sys.path: it has no __init__.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.threefs.storage.chunk_id import ChunkId
from storage.threefs.cluster import ClusterShape, EmbeddedCluster


CHUNK = 4096
STRIPE = 3
SHAPE = ClusterShape(nodes=3, targets_per_node=3, replicas=3, chunk_size=CHUNK, stripe=STRIPE)
WHOLE = 1 << 62


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.fixture
def cluster(tmp_path):
    c = EmbeddedCluster(tmp_path / "cluster", SHAPE, heartbeat_interval=0.2)
    yield c
    c.close()


@pytest.fixture
def client(cluster):
    cl = cluster.client()
    yield cl
    cl.close()


# -- replica inspection ---------------------------------------------------------------------------------

def replica_contents(cluster: EmbeddedCluster) -> dict[int, dict[ChunkId, bytes]]:
    """target -> {chunk id: committed content} for every target of the cluster, read through its store
    (which checks each chunk's CRC32). Asserts no chunk is left with a pending version."""
    out: dict[int, dict[ChunkId, bytes]] = {}
    for node, targets in cluster.shape.targets().items():
        service = cluster.services[node]
        for target in targets:
            store = service.store(target)
            chunks = {}
            for meta in store.list_meta():
                assert meta.pending_version == 0, f"target {target}: {meta} left a pending version"
                chunks[meta.chunk_id] = store.read_version(meta.chunk_id, meta.committed_version, 0, WHOLE)
            out[target] = chunks
    return out


def assert_chains_consistent(cluster: EmbeddedCluster) -> dict[int, dict[ChunkId, bytes]]:
    """Every target of a chain holds the same chunks with the same bytes; returns chain -> chunks."""
    contents = replica_contents(cluster)
    per_chain = {}
    for chain in cluster.manager.routing().chain_table.chains.values():
        first, *rest = chain.targets
        for other in rest:
            assert set(contents[other]) == set(contents[first]), (chain, other)
            for chunk_id, data in contents[first].items():
                assert contents[other][chunk_id] == data, (chain, other, chunk_id)
        per_chain[chain.chain_id] = contents[first]
    return per_chain


def chunk_files_on_disk(root: Path, inode_id: int) -> list[Path]:
    """The chunks of `inode_id` held on disk, one path (without its slot suffix) per chunk and target
    directory, whichever of its two slot files exist."""
    prefix = ChunkId(inode_id, 0).hex()[:24]  # tenant, reserved, inode id, track
    return sorted({path.with_suffix("") for path in root.glob(f"node-*/target-*/chunks/{prefix}*")})


def expected_chunks(data: bytes) -> dict[int, bytes]:
    """chunk index -> content of a file written as one piece from offset 0."""
    return {i: data[i * CHUNK:(i + 1) * CHUNK] for i in range(-(-len(data) // CHUNK))}


def patched(data: bytes, offset: int, patch: bytes) -> bytes:
    """`data` after a pwrite of `patch` at `offset` (zero-filled past its end)."""
    out = bytearray(data)
    if offset + len(patch) > len(out):
        out.extend(bytes(offset + len(patch) - len(out)))
    out[offset:offset + len(patch)] = patch
    return bytes(out)


def read_all(client, path: str) -> bytes:
    with client.open(path, "rb") as f:
        return f.read()


def write_file(client, path: str, data: bytes) -> None:
    with client.open(path, "wb") as f:
        assert f.write(data) == len(data)
