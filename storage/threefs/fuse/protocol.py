"""The FUSE kernel protocol (``linux/fuse.h``, major 7, spoken at minor ``MINOR`` or the kernel's if lower):
opcodes, flags and the layouts of the request and reply structs this file system uses.

Every request read from ``/dev/fuse`` is a ``fuse_in_header`` (``IN_HEADER``) followed by an opcode's
argument struct and, for some opcodes, NUL-terminated names or (WRITE) the data. Every reply is a
``fuse_out_header`` (``OUT_HEADER``: total length, ``-errno`` or 0, the request's ``unique``) followed by
the opcode's reply struct, written to the device in one ``write``. FORGET, BATCH_FORGET and INTERRUPT
get no reply. All integers are little-endian (x86-64 and aarch64 hosts); structs are padded to 8 bytes.
"""

from __future__ import annotations

import enum
import stat
import struct
from typing import NamedTuple

MAJOR = 7
MINOR = 31  # the structs below are 7.31's; newer kernels speak 7.31 to us when we answer with it

ROOT_NODE_ID = 1  # FUSE's root; a 3FS inode id i is node id i + 1 (the 3FS root is inode 0)

MAX_WRITE = 1 << 20  # bytes per WRITE (and READ: max_pages below)
MAX_PAGES = MAX_WRITE // 4096
READ_BUFFER_SIZE = MAX_WRITE + 4096  # the device's read buffer: a WRITE's header, its struct and its data


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46


NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})

# INIT flags (fuse_init_in.flags / fuse_init_out.flags)
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
WANTED_INIT_FLAGS = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES

# fuse_setattr_in.valid bits
FATTR_MODE = 1 << 0
FATTR_SIZE = 1 << 3
FATTR_FH = 1 << 6

# renameat2 flags (RENAME2)
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

IN_HEADER = struct.Struct("<IIQQIIII")   # len, opcode, unique, nodeid, uid, gid, pid, padding
OUT_HEADER = struct.Struct("<IiQ")       # len, error (-errno), unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime, *nsec x3, mode nlink uid gid rdev blksize pad
ENTRY_OUT = struct.Struct("<QQQQII")     # nodeid, generation, entry_valid, attr_valid, *_nsec; then ATTR
ATTR_OUT = struct.Struct("<QII")         # attr_valid, attr_valid_nsec, dummy; then ATTR
OPEN_OUT = struct.Struct("<QII")         # fh, open_flags, padding
WRITE_OUT = struct.Struct("<II")         # size, padding
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
INIT_IN = struct.Struct("<IIII")         # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_background congestion max_write time_gran max_pages
GETATTR_IN = struct.Struct("<IIQ")       # getattr_flags, dummy, fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid pad fh size lock_owner atime mtime ctime nsec x3 mode . uid gid .
OPEN_IN = struct.Struct("<II")           # flags, unused
CREATE_IN = struct.Struct("<IIII")       # flags, mode, umask, padding; then the name
MKDIR_IN = struct.Struct("<II")          # mode, umask; then the name
RENAME_IN = struct.Struct("<Q")          # newdir; then old and new names
RENAME2_IN = struct.Struct("<QII")       # newdir, flags, padding; then old and new names
READ_IN = struct.Struct("<QQIIQII")      # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = READ_IN                       # fh, offset, size, write_flags, ...; then the data
RELEASE_IN = struct.Struct("<QIIQ")      # fh, flags, release_flags, lock_owner
FSYNC_IN = struct.Struct("<QII")         # fh, fsync_flags, padding
FORGET_IN = struct.Struct("<Q")          # nlookup
BATCH_FORGET_IN = struct.Struct("<II")   # count, dummy; then count FORGET_ONE
FORGET_ONE = struct.Struct("<QQ")        # nodeid, nlookup
GETXATTR_OUT = struct.Struct("<II")      # size, padding
DIRENT = struct.Struct("<QQII")          # ino, off (of the next entry), namelen, type; then the name, 8-aligned


class Header(NamedTuple):
    """A request's ``fuse_in_header``."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def parse_header(request: memoryview) -> Header:
    return Header(*IN_HEADER.unpack_from(request)[:7])


def names(body: memoryview, count: int) -> list[str]:
    """The first `count` NUL-terminated names in a request body (UTF-8; undecodable bytes kept as
    surrogates, as ``os.fsdecode`` does)."""
    parts = bytes(body).split(b"\0")
    if len(parts) <= count:
        raise ValueError(f"request body holds {len(parts) - 1} names, expected {count}")
    return [part.decode("utf-8", "surrogateescape") for part in parts[:count]]


# -- replies ---------------------------------------------------------------------------------------------


class Attr(NamedTuple):
    """What ``fuse_attr`` carries about one node (times in seconds since the epoch)."""

    ino: int
    size: int
    mode: int  # type bits | permission bits
    nlink: int
    mtime: float
    ctime: float
    atime: float
    uid: int
    gid: int

    def pack(self) -> bytes:
        seconds, nanos = [], []
        for t in (self.atime, self.mtime, self.ctime):
            whole = int(t)
            seconds.append(whole)
            nanos.append(min(999_999_999, max(0, int((t - whole) * 1e9))))
        return ATTR.pack(self.ino, self.size, (self.size + 511) // 512, *seconds, *nanos, self.mode,
                         self.nlink, self.uid, self.gid, 0, 4096, 0)


def split_seconds(seconds: float) -> tuple[int, int]:
    """A cache timeout as (whole seconds, nanoseconds)."""
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def entry_out(attr: Attr, cache_seconds: float) -> bytes:
    whole, nanos = split_seconds(cache_seconds)
    return ENTRY_OUT.pack(attr.ino, 0, whole, whole, nanos, nanos) + attr.pack()


def attr_out(attr: Attr, cache_seconds: float) -> bytes:
    whole, nanos = split_seconds(cache_seconds)
    return ATTR_OUT.pack(whole, nanos, 0) + attr.pack()


def open_out(fh: int, open_flags: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, 0)


def dirent(ino: int, next_offset: int, name: str, mode: int) -> bytes:
    """One ``fuse_dirent``: `next_offset` is what READDIR passes back to continue after this entry."""
    encoded = name.encode("utf-8", "surrogateescape")
    record = DIRENT.pack(ino, next_offset, len(encoded), stat.S_IFMT(mode) >> 12) + encoded
    return record + b"\0" * (-len(record) % 8)


def out_header(unique: int, error: int, payload_length: int) -> bytes:
    """The reply header; `error` is a positive errno (0 for success)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_length, -error, unique)


def init_reply(init_in: memoryview, max_background: int) -> bytes:
    """The INIT reply: our version (or the kernel's minor if lower), the flags we want that the kernel
    offers, 1 MiB writes and reads. Raises ``ValueError`` for a kernel speaking another major version."""
    major, minor, max_readahead, flags = INIT_IN.unpack_from(init_in)
    if major != MAJOR:
        raise ValueError(f"FUSE kernel protocol {major}.{minor}: this file system speaks {MAJOR}.x")
    return INIT_OUT.pack(MAJOR, min(minor, MINOR), max_readahead, flags & WANTED_INIT_FLAGS, max_background,
                         max(1, max_background * 3 // 4), MAX_WRITE, 1, MAX_PAGES, 0, 0)
