"""Per-block CRC32Cs of a chunk version, and the verified reads of a byte range from its content file.

A chunk version's metadata holds one CRC32C per BLOCK_SIZE block of its content (the last block may be
short), packed as little-endian uint32s. Its version checksum (compared along a chain and answered by
CRAQ's version query) is the CRC32C of that packed table (`version_checksum`): it changes with any byte
of the content and is computed from the table alone, so a write that changes one block never re-reads
the chunk. Where a write produced the whole content at once, the metadata also keeps the CRC32C of the
whole content (`whole_crc`), so a read of the whole version is checked with one CRC32C call.

A read loads only the blocks that overlap the requested range, with one pread (`read_blocks`, returning
bytes) or one preadv straight into the caller's buffer plus scratch for the parts of the edge blocks
outside the range (`read_blocks_into`), and checks exactly those blocks. A read that reaches the end of
the version also checks that the file holds no more bytes than the metadata records.
"""

from __future__ import annotations

import os
import struct

from storage.threefs.errors import ChecksumError
from storage.threefs.storage.crc32c import crc32c, crc32c_blocks

BLOCK_SIZE = 4096
_CRC = struct.Struct("<I")


def block_count(length: int) -> int:
    """The number of blocks (the last one possibly short) that hold `length` bytes."""
    return -(-length // BLOCK_SIZE)


def block_checksums(content: bytes | bytearray | memoryview) -> bytes:
    """The packed CRC32Cs of the blocks of `content`."""
    crcs = crc32c_blocks(content, BLOCK_SIZE)
    return struct.pack(f"<{len(crcs)}I", *crcs)


def version_checksum(packed_block_checksums: bytes) -> int:
    """A version's checksum: the CRC32C of its packed block CRC32Cs (0 for empty content)."""
    return crc32c(packed_block_checksums) if packed_block_checksums else 0


def content_checksum(content: bytes | bytearray | memoryview) -> int:
    """The version checksum of a version holding `content` (what `ChunkMeta.checksum` reports)."""
    return version_checksum(block_checksums(content))


def _check_table(crcs: bytes, length: int, where: str) -> None:
    if len(crcs) != _CRC.size * block_count(length):
        raise ChecksumError(f"{where}: metadata holds {len(crcs) // _CRC.size} block checksums for "
                            f"{length} bytes ({block_count(length)} blocks of {BLOCK_SIZE})")


def _check_read_size(got: int, start: int, stop: int, length: int, where: str) -> None:
    if got < stop - start:
        at = start + got
        raise ChecksumError(f"{where}: the file ends at byte {at}, inside block {at // BLOCK_SIZE}, but "
                            f"metadata records {length} bytes")
    if got > stop - start:
        raise ChecksumError(f"{where}: the file holds more than the {length} bytes metadata records")


def _check_blocks(view: bytes | bytearray | memoryview, first_block: int, crcs: bytes, length: int,
                  where: str) -> None:
    """Checks consecutive blocks held in `view` (from the start of block `first_block`)."""
    for i, actual in enumerate(crc32c_blocks(view, BLOCK_SIZE)):
        block = first_block + i
        (expected,) = _CRC.unpack_from(crcs, block * _CRC.size)
        if actual != expected:
            raise ChecksumError(
                f"{where}: block {block} (bytes [{block * BLOCK_SIZE}, {min((block + 1) * BLOCK_SIZE, length)})) "
                f"has crc32c {actual:#010x}, metadata says {expected:#010x}")


def _whole_mismatch(actual: int, whole_crc: int, where: str) -> ChecksumError:
    return ChecksumError(f"{where}: content has crc32c {actual:#010x}, metadata says {whole_crc:#010x} "
                         f"(its block checksums match)")


def read_blocks(fd: int, offset: int, end: int, length: int, crcs: bytes, whole_crc: int | None,
                where: str) -> bytes:
    """Bytes [offset, end) (0 <= offset <= end <= length) of a chunk version of `length` bytes whose block
    CRC32Cs are `crcs` (and whole-content CRC32C `whole_crc`, None when unknown), from its content file
    `fd`: reads the blocks overlapping the range with one pread and checks each of them.

    Raises ChecksumError, its message starting with `where`, naming the first damaged block.
    """
    whole = offset == 0 and end == length
    if offset == end and not whole:
        return b""
    _check_table(crcs, length, where)
    start = offset - offset % BLOCK_SIZE
    stop = min(length, -(-end // BLOCK_SIZE) * BLOCK_SIZE)
    to_end = stop == length  # read one byte more: the file must end where the metadata says
    data = os.pread(fd, stop - start + to_end, start)
    _check_read_size(len(data), start, stop, length, where)
    if whole and whole_crc is not None and crc32c(data) == whole_crc:
        return data
    _check_blocks(data, start // BLOCK_SIZE, crcs, length, where)
    if whole and whole_crc is not None:
        raise _whole_mismatch(crc32c(data), whole_crc, where)
    return data if whole else data[offset - start:end - start]


def read_blocks_into(fd: int, buffer: memoryview, offset: int, length: int, crcs: bytes,
                     whole_crc: int | None, where: str) -> int:
    """Reads bytes [offset, offset + n) of the version into `buffer` (n: `len(buffer)`, cut at `length`)
    with one preadv (scratch space takes the rest of the edge blocks) and checks every block it
    touched. Returns n. Raises ChecksumError like `read_blocks` (the buffer then holds unchecked bytes).
    """
    n = max(0, min(len(buffer), length - offset))
    end = offset + n
    whole = offset == 0 and end == length
    if n == 0 and not whole:
        return 0
    _check_table(crcs, length, where)
    start = offset - offset % BLOCK_SIZE
    stop = min(length, -(-end // BLOCK_SIZE) * BLOCK_SIZE)
    target = memoryview(buffer).cast("B")[:n]
    head, tail = bytearray(offset - start), bytearray(stop - end + (stop == length))
    got = os.preadv(fd, [piece for piece in (head, target, tail) if len(piece)], start)
    _check_read_size(got, start, stop, length, where)
    if whole and whole_crc is not None and crc32c(target) == whole_crc:
        return n
    edge_tail = bytes(tail[:stop - end])  # the rest of the last block, past the range
    if head:  # the first block starts before the range
        block_end = min(start + BLOCK_SIZE, stop)
        _check_blocks(bytes(head) + bytes(target[:min(block_end, end) - offset]) + edge_tail[:max(0, block_end - end)],
                      start // BLOCK_SIZE, crcs, length, where)
        inner_start = block_end
    else:
        inner_start = offset
    inner_stop = end if end == length else end - end % BLOCK_SIZE  # blocks wholly inside the range
    if inner_stop > inner_start:
        _check_blocks(target[inner_start - offset:inner_stop - offset], inner_start // BLOCK_SIZE, crcs, length,
                      where)
    if inner_start <= inner_stop < end:  # the last block ends past the range
        _check_blocks(bytes(target[inner_stop - offset:]) + edge_tail, inner_stop // BLOCK_SIZE, crcs, length,
                      where)
    if whole and whole_crc is not None:
        raise _whole_mismatch(crc32c(target), whole_crc, where)
    return n
