"""Per-block CRC32s of a chunk version, and the verified read of a byte range from its content file.

A chunk version's metadata holds one CRC32 per BLOCK_SIZE block of its content (the last block may be
short), packed as little-endian uint32s, next to the CRC32 of the whole content. A read loads only the
blocks that overlap the requested range, with one pread, and checks exactly those. A read of the whole
version checks all of its bytes with one CRC32 call against the whole-content CRC32 (which releases the
GIL, where 256 calls on 4 KiB blocks would hold it; a mismatch is then located block by block) and also
checks that the file holds no more bytes than the metadata records.
"""

from __future__ import annotations

import os
import struct
import zlib

from storage.threefs.errors import ChecksumError

BLOCK_SIZE = 4096
_CRC = struct.Struct("<I")


def block_count(length: int) -> int:
    """The number of blocks (the last one possibly short) that hold `length` bytes."""
    return -(-length // BLOCK_SIZE)


def block_checksums(content: bytes) -> bytes:
    """The packed CRC32s of the blocks of `content`."""
    view = memoryview(content)
    crcs = [zlib.crc32(view[pos:pos + BLOCK_SIZE]) for pos in range(0, len(view), BLOCK_SIZE)]
    return struct.pack(f"<{len(crcs)}I", *crcs)


def read_blocks(fd: int, offset: int, end: int, length: int, crcs: bytes, checksum: int, where: str) -> bytes:
    """Bytes [offset, end) (0 <= offset <= end <= length) of a chunk version of `length` bytes whose block
    CRC32s are `crcs` and whole-content CRC32 `checksum`, from its open content file `fd`: reads the
    blocks overlapping the range and checks each of them; the whole version (offset 0, end `length`) is
    checked entirely, and so is the file's length.

    Raises ChecksumError, its message starting with `where`, naming the first damaged block.
    """
    whole = offset == 0 and end == length
    if offset == end and not whole:
        return b""
    if len(crcs) != _CRC.size * block_count(length):
        raise ChecksumError(f"{where}: metadata holds {len(crcs) // _CRC.size} block checksums for "
                            f"{length} bytes ({block_count(length)} blocks of {BLOCK_SIZE})")
    start = offset - offset % BLOCK_SIZE
    stop = min(length, -(-end // BLOCK_SIZE) * BLOCK_SIZE)
    to_end = stop == length  # read one byte more: the file must end where the metadata says
    data = os.pread(fd, stop - start + to_end, start)
    if len(data) < stop - start:
        at = start + len(data)
        raise ChecksumError(f"{where}: the file ends at byte {at}, inside block {at // BLOCK_SIZE}, but "
                            f"metadata records {length} bytes")
    if len(data) > stop - start:
        raise ChecksumError(f"{where}: the file holds more than the {length} bytes metadata records")
    if whole and zlib.crc32(data) == checksum:
        return data
    view = memoryview(data)
    for pos in range(0, len(data), BLOCK_SIZE):
        block = (start + pos) // BLOCK_SIZE
        actual = zlib.crc32(view[pos:pos + BLOCK_SIZE])
        (expected,) = _CRC.unpack_from(crcs, block * _CRC.size)
        if actual != expected:
            raise ChecksumError(
                f"{where}: block {block} (bytes [{start + pos}, {min(start + pos + BLOCK_SIZE, length)})) has "
                f"crc32 {actual:#010x}, metadata says {expected:#010x}")
    if whole:  # every block matches its checksum but the whole content does not: the metadata disagrees
        raise ChecksumError(f"{where}: content has crc32 {zlib.crc32(data):#010x}, metadata says "
                            f"{checksum:#010x} (its block checksums match)")
    return data[offset - start:end - start]
