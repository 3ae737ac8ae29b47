"""Building a chunk version in its spare slot file: copy-on-write per 4 KiB block, in place.

A chunk's committed version lives in one slot file; the next version is written into the other (the
spare), which already holds an older version of the chunk. `build_version` brings the spare to the new
content touching only what differs: it copies from the committed slot the blocks the caller names stale
(those where the spare differs from the committed content; None: all), writes the blocks the update
changes (the edge blocks of a partial update merged with the committed bytes, read and checked first;
blocks wholly covered are never read) and sets the file's length. The committed slot is only read.
`install_content` writes a whole version (a full-chunk replace from recovery or repair).

The block CRC32C table of the new version is the committed one with the changed blocks' entries
replaced; the CRC32C of the whole content is kept when the update wrote all of it (free when the caller
knows the payload's CRC32C), else recorded as unknown.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from storage.threefs.storage.block_checksums import (BLOCK_SIZE, block_checksums, block_count, read_blocks,
                                                      version_checksum)
from storage.threefs.storage.crc32c import crc32c
from storage.threefs.storage.fd_cache import FdCache

_CRC_SIZE = 4


class Version(NamedTuple):
    """One version of a chunk: where it lives and its checksums. The first seven fields are its metadata
    row (`chunk_meta_db.CommittedRow`); `changed` is the block range [first, last) it changed relative to
    the version it was built on (None: all of it, a full replace)."""

    version: int
    chain_version: int
    slot: int
    length: int
    whole_crc: int | None
    checksum: int
    block_crcs: bytes
    changed: tuple[int, int] | None = None


def _copy(src: int, dst: int, begin: int, end: int) -> None:
    """Copies bytes [begin, end) from file `src` to the same offsets of file `dst` (in the kernel)."""
    pos = begin
    while pos < end:
        try:
            copied = os.copy_file_range(src, dst, end - pos, pos, pos)
        except OSError:  # not supported here: through user space
            piece = os.pread(src, end - pos, pos)
            _pwrite_all(dst, piece, pos)
            copied = len(piece)
        if copied <= 0:
            raise OSError(f"copying bytes [{pos}, {end}) between chunk slot files stopped short")
        pos += copied


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Writes all of `data` at `offset` (a short write, say a full disk, is retried, then an OSError)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"writing {len(view)} bytes at {offset} of a chunk slot file stopped short")
        view, offset = view[written:], offset + written


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers -> [first, last) runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for block in blocks:
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs


def build_version(fd: int, fds: FdCache, base: Version | None, base_path: str | None, stale: set[int] | None,
                  offset: int, data: bytes | bytearray | memoryview, full_replace: bool, version: int, slot: int,
                  chain_version: int, data_crc: int | None, where: str) -> Version:
    """Writes version `version` into the spare slot file `fd`: `base` (committed, in `base_path`; None for
    a new chunk) with [offset, offset + len(data)) replaced (zero-filled past its end), or `data` alone
    when `full_replace`. `stale`: the spare's blocks that differ from `base`. Returns the new Version.
    Raises ChecksumError (message starting with `where`) when a base block it merges with is damaged."""
    n = len(data)
    old_length = 0 if base is None or full_replace else base.length
    length = n if full_replace else max(old_length, offset + n)
    changed_begin, changed_end = min(offset, old_length), offset + n  # past the end: the zeros before too
    first = changed_begin // BLOCK_SIZE
    last = block_count(changed_end) if changed_end > changed_begin else first
    region_begin, region_end = first * BLOCK_SIZE, min(last * BLOCK_SIZE, length)

    if region_begin == offset and region_end == offset + n:
        content = data  # the update covers its blocks exactly: nothing old to merge
    else:
        merged = bytearray(region_end - region_begin)
        keep = [(b, e) for b, e in ((region_begin, min(offset, old_length)),  # the first block's bytes before
                                    (offset + n, min(region_end, old_length))) if b < e]  # and the last's after
        if keep:
            with fds.use(base_path) as base_fd:
                for begin, end in keep:
                    merged[begin - region_begin:end - region_begin] = read_blocks(
                        base_fd, begin, end, base.length, base.block_crcs, base.whole_crc, where)
        merged[offset - region_begin:offset - region_begin + n] = data
        content = merged

    if base is not None and not full_replace:
        to_copy = range(block_count(old_length)) if stale is None else sorted(stale)
        runs = _runs([b for b in to_copy if not first <= b < last and b < block_count(old_length)])
        if runs:
            with fds.use(base_path) as base_fd:
                for begin, end in runs:
                    _copy(base_fd, fd, begin * BLOCK_SIZE, min(end * BLOCK_SIZE, old_length))
    if region_end > region_begin:
        _pwrite_all(fd, content, region_begin)
    if os.fstat(fd).st_size != length:
        os.ftruncate(fd, length)

    new_crcs = block_checksums(content) if region_end > region_begin else b""
    if full_replace or base is None:
        table = new_crcs  # the region starts at byte 0
    else:
        table = base.block_crcs[:first * _CRC_SIZE] + new_crcs + base.block_crcs[last * _CRC_SIZE:]
    if region_begin == 0 and region_end == length:
        whole = data_crc if content is data and data_crc is not None else crc32c(content)
    else:
        whole = None
    return Version(version, chain_version, slot, length, whole, version_checksum(table), table,
                   None if full_replace else (first, last))


def install_content(fd: int, content: bytes | bytearray | memoryview, version: int, slot: int,
                    chain_version: int) -> Version:
    """Writes the whole `content` of committed `version` into slot file `fd`; returns its Version."""
    _pwrite_all(fd, content, 0)
    if os.fstat(fd).st_size != len(content):
        os.ftruncate(fd, len(content))
    table = block_checksums(content)
    return Version(version, chain_version, slot, len(content), crc32c(content), version_checksum(table), table)
