"""The file API shared by this 3FS's ``Client`` and ``MountClient`` (a real 3FS FUSE mount).

3FS offers applications two doors: the FUSE mount (ordinary POSIX files, metadata through the kernel)
and USRBIO (batched zero-copy IO through shared memory, still opening files through FUSE). Everything
above the client in this package (``usrbio.py``, ``fsspec_fs.py``, the adapters) is written against the
two protocols below, so it runs the same over the embedded Python 3FS and over a real cluster's mount.

Conventions:
  * Paths are absolute, ``/``-separated client paths (``/`` is the file system root or the mount root).
  * Files are binary only. Modes: ``rb``, ``wb``, ``ab``, ``xb``, ``r+b``, ``w+b``, ``a+b`` (``parse_mode``).
  * Errors are the POSIX exceptions (``FileNotFoundError``, ``FileExistsError``, ``IsADirectoryError``,
    ...) carrying the client path; IO on a closed file raises ``ValueError`` as Python's own files do.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol, runtime_checkable

FileType = Literal["file", "directory", "symlink"]


@dataclasses.dataclass(frozen=True)
class FileStat:
    """What ``FileClient.stat`` reports about one path.

    path: the normalised client path. size: bytes (exact after close or fsync). type: ``'file'``,
    ``'directory'`` or ``'symlink'``. mtime: seconds since the epoch. inode_id: 3FS inode id (the OS inode
    number on a mount).
    """

    path: str
    size: int
    type: FileType
    mtime: float
    inode_id: int


@dataclasses.dataclass(frozen=True)
class OpenMode:
    """A binary open mode, decomposed.

    read/write: allowed operations. append: every ``write`` goes to the end of the file. create: a
    missing file is created. exclusive: an existing file is an error. truncate: an existing file is
    emptied at open.
    """

    read: bool
    write: bool
    append: bool
    create: bool
    exclusive: bool
    truncate: bool


_BASE_MODES = {  # first letter -> (read, write, append, create, exclusive, truncate) without '+'
    "r": (True, False, False, False, False, False),
    "w": (False, True, False, True, False, True),
    "a": (False, True, True, True, False, False),
    "x": (False, True, False, True, True, False),
}


def parse_mode(mode: str) -> OpenMode:
    """Decomposes a binary mode (``rb``, ``wb``, ``ab``, ``xb``, ``r+b``, ``w+b``, ``a+b``; ``rb+`` etc.
    are accepted too). Text modes, unknown letters and repeated letters raise ``ValueError``."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {type(mode).__name__}")
    letters = set(mode)
    if len(letters) != len(mode) or not letters <= set("rwaxb+"):
        raise ValueError(f"mode={mode!r}: expected a binary mode such as 'rb', 'wb', 'ab', 'xb', 'r+b'")
    if "b" not in letters:
        raise ValueError(f"mode={mode!r}: only binary modes are supported (add 'b'; text modes are not)")
    base = letters & set(_BASE_MODES)
    if len(base) != 1:
        raise ValueError(f"mode={mode!r}: needs exactly one of 'r', 'w', 'a', 'x'")
    read, write, append, create, exclusive, truncate = _BASE_MODES[base.pop()]
    if "+" in letters:
        read = write = True
    return OpenMode(read, write, append, create, exclusive, truncate)


@runtime_checkable
class File(Protocol):
    """An open binary file: seekable, a context manager, positional IO that never moves the position.

    ``pread`` and ``pread_into`` are short only at the end of the file. ``fsync`` makes ``stat``'s size
    exact (3FS updates a file's length lazily while write sessions are open).
    """

    path: str
    mode: str
    closed: bool

    def read(self, size: int = -1) -> bytes: ...
    def readinto(self, buffer) -> int: ...
    def write(self, data) -> int: ...
    def seek(self, offset: int, whence: int = 0) -> int: ...
    def tell(self) -> int: ...
    def pread(self, length: int, offset: int) -> bytes: ...
    def pread_into(self, buffer: memoryview, offset: int) -> int: ...
    def pwrite(self, data, offset: int) -> int: ...
    def flush(self) -> None: ...
    def fsync(self) -> None: ...
    def truncate(self, size: int) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> File: ...
    def __exit__(self, *exc_info) -> None: ...


@runtime_checkable
class FileClient(Protocol):
    """Namespace operations plus ``open``; implemented by ``client.Client`` and ``mount.MountClient``."""

    def open(self, path: str, mode: str = "rb") -> File: ...
    def stat(self, path: str) -> FileStat: ...
    def listdir(self, path: str) -> list[str]: ...  # sorted names, without '.' and '..'
    def makedirs(self, path: str, exist_ok: bool = True) -> None: ...
    def rename(self, src: str, dst: str, replace: bool = True) -> None: ...  # atomic; replaces a file or an empty dir
    def remove(self, path: str, recursive: bool = False) -> None: ...
    def exists(self, path: str) -> bool: ...
    def close(self) -> None: ...
