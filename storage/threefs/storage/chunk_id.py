"""Chunk identity: ChunkId (inode id, chunk index), its 16-byte key encoding, and ChunkMeta.

A chunk id's 16-byte key follows 3FS's layout (tenant, reserved, inode id, track, chunk index, integers
big-endian), so byte order sorts chunks by inode, then chunk index; chunk stores key their metadata and
name their content files by it; `inode_key_range` is the key range of one file's chunks. ChunkMeta is
one chunk's metadata as dump-chunkmeta reports it.
`as_chunk_id` normalizes a chunk id that arrived as a plain tuple (e.g. over RPC).
"""

from __future__ import annotations

from typing import NamedTuple


class ChunkId(NamedTuple):
    """A chunk of a file: (inode id, chunk index within the file).

    Its 16-byte key follows 3FS's chunk id: tenant (1 byte), reserved (1), inode id (8, big-endian),
    track (2), chunk index (4, big-endian); byte order therefore sorts by inode, then chunk index.
    """

    inode_id: int
    chunk_index: int

    def to_bytes(self) -> bytes:
        """The 16-byte big-endian key (tenant 0, track 0)."""
        if not 0 <= self.inode_id < 1 << 64:
            raise ValueError(f"inode_id must be in [0, 2**64), got {self.inode_id}")
        if not 0 <= self.chunk_index < 1 << 32:
            raise ValueError(f"chunk_index must be in [0, 2**32), got {self.chunk_index}")
        return (b"\x00\x00" + self.inode_id.to_bytes(8, "big") + b"\x00\x00"
                + self.chunk_index.to_bytes(4, "big"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChunkId:
        """Inverse of `to_bytes`."""
        if len(raw) != 16:
            raise ValueError(f"a chunk id key is 16 bytes, got {len(raw)}")
        return cls(int.from_bytes(raw[2:10], "big"), int.from_bytes(raw[12:16], "big"))

    def hex(self) -> str:
        """The key as 32 hex digits, used in content file names."""
        return self.to_bytes().hex()

    @classmethod
    def from_hex(cls, text: str) -> ChunkId:
        """Inverse of `hex`."""
        return cls.from_bytes(bytes.fromhex(text))


class ChunkMeta(NamedTuple):
    """One chunk's metadata as dump-chunkmeta reports it.

    committed_version: 0 when the chunk has no committed content yet.
    pending_version: 0 when no write is pending, else committed_version + 1 (or the version a
      full-chunk replace will install).
    chain_version: the chain version stored with the committed version.
    length, checksum: byte length and version checksum (CRC32C of the block table) of the committed content.
    """

    chunk_id: ChunkId
    committed_version: int
    pending_version: int
    chain_version: int
    length: int
    checksum: int


def inode_key_range(inode_id: int) -> tuple[bytes, bytes]:
    """[begin, end) of the 16-byte keys of file `inode_id`'s chunks (every track and index)."""
    if not isinstance(inode_id, int) or not 0 <= inode_id < 1 << 64:
        raise ValueError(f"inode_id must be an int in [0, 2**64), got {inode_id!r}")
    begin = b"\x00\x00" + inode_id.to_bytes(8, "big") + bytes(6)  # tenant, reserved, inode id, track, index
    if inode_id == (1 << 64) - 1:
        return begin, b"\x00\x01" + bytes(14)  # the next reserved byte: past every inode id
    return begin, b"\x00\x00" + (inode_id + 1).to_bytes(8, "big") + bytes(6)


def as_chunk_id(chunk_id: object) -> ChunkId:
    """`chunk_id` as a ChunkId (a plain (inode_id, chunk_index) tuple, as it may arrive over RPC)."""
    if isinstance(chunk_id, ChunkId):
        return chunk_id
    if isinstance(chunk_id, tuple) and len(chunk_id) == 2 and all(isinstance(x, int) for x in chunk_id):
        return ChunkId(*chunk_id)
    raise TypeError(f"chunk_id must be a ChunkId (inode_id, chunk_index), got {chunk_id!r}")
