"""File layouts: how a file's bytes map to chunks and chunks to replication chains.

In 3FS a file is cut into equal-size chunks (chunk size a power of two) and striped over `stripe_size`
chains of a chain table. Each directory carries a default policy (chunk size, stripe) for the files made
in it. When a file is created the meta service takes `stripe_size` consecutive chains of the table,
round-robin from a base index kept in the KV store, and shuffles them with a per-file random seed; the
file's inode records the table id and version, the chunk size, and the chains. Clients then compute every
chunk's chain themselves (chunk `i` lives on `chains[i % stripe_size]`), so meta stays off the data path.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, NamedTuple

from storage.threefs.mgmtd.routing import ChainTable

MIN_CHUNK_SIZE = 512


def _check_chunk_size(chunk_size: object, name: str = "chunk_size") -> int:
    if (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
        or chunk_size < MIN_CHUNK_SIZE or chunk_size & (chunk_size - 1)
    ):
        raise ValueError(f"{name} must be a power of two >= {MIN_CHUNK_SIZE}, got {chunk_size!r}")
    return chunk_size


def _check_positive(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class LayoutPolicy:
    """A directory's default layout for the files created in it.

    Attributes:
      chunk_size: bytes per chunk, a power of two >= 512.
      stripe_size: how many chains a file is striped over (clipped to the chain table's size).
    """

    chunk_size: int = 1 << 20
    stripe_size: int = 4

    def __post_init__(self) -> None:
        _check_chunk_size(self.chunk_size)
        _check_positive(self.stripe_size, "stripe_size")

    def to_dict(self) -> dict[str, int]:
        return {"chunk_size": self.chunk_size, "stripe_size": self.stripe_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayoutPolicy:
        return cls(chunk_size=d["chunk_size"], stripe_size=d["stripe_size"])


class ChunkSpan(NamedTuple):
    """The part of one chunk that a byte range covers.

    Attributes:
      chunk_index: which chunk of the file (file offset // chunk_size).
      chain_id: the chain that stores it.
      offset_in_chunk: first byte within the chunk.
      length: bytes covered in this chunk.
      buffer_offset: where these bytes sit in the caller's buffer (relative to the range's start).
    """

    chunk_index: int
    chain_id: int
    offset_in_chunk: int
    length: int
    buffer_offset: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """One file's layout, fixed when the file is created.

    Attributes:
      table_id, table_version: the chain table the chains were taken from.
      chunk_size: bytes per chunk, a power of two >= 512.
      stripe_size: number of chains the file is striped over.
      chains: [stripe_size] chain ids, in stripe order (already shuffled).
      seed: the shuffle seed (kept so the choice is reproducible).
    """

    table_id: int
    table_version: int
    chunk_size: int
    stripe_size: int
    chains: tuple[int, ...]
    seed: int

    def __post_init__(self) -> None:
        _check_chunk_size(self.chunk_size)
        _check_positive(self.stripe_size, "stripe_size")
        if not isinstance(self.chains, tuple) or not all(isinstance(c, int) for c in self.chains):
            raise ValueError(f"chains must be a tuple of chain ids, got {self.chains!r}")
        if len(self.chains) != self.stripe_size:
            raise ValueError(
                f"chains must hold stripe_size={self.stripe_size} chain ids, got {len(self.chains)}: {self.chains}"
            )

    @classmethod
    def choose(cls, chain_table: ChainTable, policy: LayoutPolicy, base_index: int, seed: int) -> Layout:
        """Takes `policy.stripe_size` consecutive chains of the table (sorted by id) round-robin from
        `base_index` and shuffles them with `random.Random(seed)`. The stripe is clipped to the table size."""
        ids = chain_table.chain_ids
        if not ids:
            raise ValueError(f"chain_table {chain_table.table_id} has no chains to place a file on")
        if not isinstance(base_index, int) or base_index < 0:
            raise ValueError(f"base_index must be an int >= 0, got {base_index!r}")
        stripe = min(policy.stripe_size, len(ids))
        chains = [ids[(base_index + i) % len(ids)] for i in range(stripe)]
        random.Random(seed).shuffle(chains)
        return cls(chain_table.table_id, chain_table.version, policy.chunk_size, stripe, tuple(chains), seed)

    def chain_of_chunk(self, chunk_index: int) -> int:
        """The chain id that stores chunk `chunk_index`."""
        if chunk_index < 0:
            raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
        return self.chains[chunk_index % self.stripe_size]

    def chunk_index(self, offset: int) -> int:
        """The chunk that holds file byte `offset`."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        return offset // self.chunk_size

    def chunk_spans(self, offset: int, length: int) -> list[ChunkSpan]:
        """Splits the byte range [offset, offset + length) at chunk boundaries, in file order."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        spans: list[ChunkSpan] = []
        done = 0
        while done < length:
            index, in_chunk = divmod(offset + done, self.chunk_size)
            n = min(self.chunk_size - in_chunk, length - done)
            spans.append(ChunkSpan(index, self.chain_of_chunk(index), in_chunk, n, done))
            done += n
        return spans

    def to_dict(self) -> dict[str, Any]:
        return {
            "table_id": self.table_id, "table_version": self.table_version, "chunk_size": self.chunk_size,
            "stripe_size": self.stripe_size, "chains": list(self.chains), "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(d["table_id"], d["table_version"], d["chunk_size"], d["stripe_size"], tuple(d["chains"]),
                   d["seed"])
