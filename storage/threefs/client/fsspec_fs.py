"""``ThreeFSFileSystem``: this 3FS (or a real 3FS mount) as an fsspec file system, protocol ``3fs``.

smallpond reads and writes its datasets on 3FS through ordinary file paths; Python's data tools reach
storage through fsspec. This adapter puts any ``file_api.FileClient`` behind ``fsspec.AbstractFileSystem``:

    fs = fsspec.filesystem("3fs", client=client)          # a Client, a MountClient, ...
    fs = fsspec.filesystem("3fs", url="3fs+embedded:///tmp/cluster")   # via storage.threefs.connect
    with fs.open("/data/part-0.parquet", "wb") as f:
        frame.write_parquet(f)                             # polars, through the file object
    frame = polars.read_parquet(fs.open("/data/part-0.parquet", "rb"))

For pyarrow (datasets, Ray Data, ``pyarrow.parquet``), wrap it:

    from pyarrow.fs import FSSpecHandler, PyFileSystem
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    pyarrow.parquet.write_table(table, "/data/t.parquet", filesystem=arrow_fs)

Paths are client paths: ``/data/x``, ``data/x`` and ``3fs:///data/x`` name the same file (no host part).
Writes are atomic from a reader's view: ``wb``/``xb`` files are written under a hidden temporary name in the
same directory, fsynced, and renamed over the target on close; leaving a ``with`` block by an exception,
or dropping an unclosed file, discards them (inside ``fs.transaction`` the renames wait for the commit).
``ab`` appends in place (not atomic). ``mv`` is one atomic rename with POSIX semantics (an existing
target is replaced, never moved into). Parent directories are created on write (``auto_mkdir=True``).
"""

from __future__ import annotations

import datetime
import errno
import io
import os
import posixpath
import uuid
from glob import has_magic
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem
from fsspec.utils import stringify_path

from storage.threefs.client.file_api import File, FileClient, FileStat

_PROTOCOLS = ("3fs", "3fs+embedded")
_COPY_CHUNK = 8 << 20


class _RawReader(io.RawIOBase):
    """A client ``File`` as a raw stream, for ``io.BufferedReader``."""

    def __init__(self, file: File):
        super().__init__()
        self.file = file
        self.name = file.path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.file.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


class ThreeFSReadFile(io.BufferedReader):
    """A buffered, seekable reader over a client ``File`` (what ``fs.open(path, 'rb')`` returns).

    path: the client path; size: the file's length in bytes when opened.
    """

    def __init__(self, fs: ThreeFSFileSystem, path: str, file: File, size: int, block_size: int):
        super().__init__(_RawReader(file), buffer_size=block_size)
        self.fs = fs
        self.path = path
        self.size = size


class ThreeFSWriteFile(io.BufferedIOBase):
    """A buffered, write-only, atomically published file (what ``fs.open(path, 'wb'|'xb'|'ab')`` returns).

    Bytes are buffered up to ``block_size`` and written to a temporary file beside ``path``; ``close``
    flushes, fsyncs and (with autocommit) renames it over ``path``. ``discard`` drops everything. In
    append mode the target itself is written and ``commit``/``discard`` have nothing to publish or undo.
    """

    def __init__(self, fs: ThreeFSFileSystem, path: str, mode: str, block_size: int, autocommit: bool):
        super().__init__()
        self.fs = fs
        self.path = path
        self.mode = mode
        self.autocommit = autocommit
        self._block_size = block_size
        self._buffer = bytearray()
        self._written = 0
        client = fs.client
        if mode == "ab":
            self._temp = None
            self._file = client.open(path, "ab")
            self._written = client.stat(path).size  # tell() is the position in the file
        else:
            if mode == "xb" and client.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            directory, name = posixpath.split(path)
            self._temp = posixpath.join(directory, f".{name}.3fs-tmp-{uuid.uuid4().hex[:16]}")
            self._file = client.open(self._temp, "xb")
        self._published = False
        self._discarded = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self.path}")
        return self._written

    def write(self, data) -> int:
        if self.closed:
            raise ValueError(f"write to closed file {self.path}")
        with memoryview(data) as whole, whole.cast("B") as view:
            self._buffer += view
            count = len(view)
        self._written += count
        if len(self._buffer) >= self._block_size:
            self._flush_buffer()
        return count

    def flush(self) -> None:
        if not self.closed:
            self._flush_buffer()

    def close(self) -> None:
        """Flushes and fsyncs the data, then publishes it (if autocommit). A failure discards it."""
        if self.closed:
            return
        try:
            self._flush_buffer()
            self._file.fsync()
            self._file.close()
        except BaseException:
            self.discard()
            raise
        super().close()
        if self.autocommit:
            self.commit()

    def commit(self) -> None:
        """Publishes the written file under its name: one atomic rename (after ``close``)."""
        if not self.closed:
            raise ValueError(f"commit of {self.path} before close")
        if self._temp is not None and not self._published and not self._discarded:
            try:  # "xb" stays exclusive at publication: a file created meanwhile is not replaced
                self.fs.client.rename(self._temp, self.path, replace=self.mode != "xb")
            except FileExistsError:
                self.fs.client.remove(self._temp)
                raise
            self._published = True

    def discard(self) -> None:
        """Drops the written data (the temporary file); the target is left as it was."""
        self._discarded = True
        self._buffer.clear()
        if not self._file.closed:
            self._file.close()
        if self._temp is not None and not self._published:
            try:
                self.fs.client.remove(self._temp)
            except FileNotFoundError:
                pass
        if not self.closed:
            super().close()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and hasattr(self, "_file"):
            try:
                self.discard()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    def _flush_buffer(self) -> None:
        if self._buffer:
            self._file.write(self._buffer)
            self._buffer.clear()


class ThreeFSFileSystem(AbstractFileSystem):
    """fsspec over a ``FileClient``: pass ``client=`` (any FileClient) or ``url=`` (``connect(url)``).

    block_size: read buffer and write flush size in bytes. auto_mkdir: create parent directories when a
    file is written.
    """

    protocol = _PROTOCOLS
    root_marker = "/"
    cachable = False  # a FileClient is live state, not a key: never share instances through fsspec's cache

    def __init__(self, client: FileClient | None = None, url: str | None = None, block_size: int = 4 << 20,
                 auto_mkdir: bool = True, **storage_options: Any):
        super().__init__(**storage_options)
        if (client is None) == (url is None):
            raise ValueError("pass exactly one of client= (a FileClient) or url= (for storage.threefs.connect)")
        if client is None:
            from storage.threefs.connect import connect  # lazily: connect imports the whole cluster stack
            client = connect(url)
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size={block_size!r}: expected a positive byte count")
        self.client = client
        self.url = url
        self.blocksize = block_size
        self.auto_mkdir = auto_mkdir

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = stringify_path(path)
        for protocol in sorted(_PROTOCOLS, key=len, reverse=True):
            for separator in ("://", "::"):
                if path.startswith(protocol + separator):
                    path = path[len(protocol) + len(separator):]
                    break
        return "/" + path.strip("/")

    # -- listing ---------------------------------------------------------------------------------------
    @staticmethod
    def _entry(st: FileStat) -> dict[str, Any]:
        return {"name": st.path, "size": st.size, "type": st.type, "mtime": st.mtime, "inode_id": st.inode_id}

    def info(self, path, **kwargs) -> dict[str, Any]:
        return self._entry(self.client.stat(self._strip_protocol(path)))

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        st = self.client.stat(path)
        if st.type != "directory":
            entries = [self._entry(st)]
        else:
            entries = []
            for name in self.client.listdir(path):
                try:
                    entries.append(self._entry(self.client.stat(posixpath.join(path, name))))
                except FileNotFoundError:
                    continue  # removed between listdir and stat
        return entries if detail else [entry["name"] for entry in entries]

    def exists(self, path, **kwargs) -> bool:
        return self.client.exists(self._strip_protocol(path))

    def created(self, path) -> datetime.datetime:
        """3FS keeps no creation time: the modification time."""
        return self.modified(path)

    def modified(self, path) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.timezone.utc)

    # -- files -----------------------------------------------------------------------------------------
    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        path = self._strip_protocol(path)
        block_size = block_size if isinstance(block_size, int) and block_size > 0 else self.blocksize
        if mode == "rb":
            file = self.client.open(path, "rb")
            return ThreeFSReadFile(self, path, file, self.client.stat(path).size, block_size)
        if mode in ("wb", "xb", "ab"):
            if self.auto_mkdir:
                self.client.makedirs(self._parent(path), exist_ok=True)
            return ThreeFSWriteFile(self, path, mode, block_size, autocommit)
        raise ValueError(f"mode={mode!r}: ThreeFSFileSystem opens files with 'rb', 'wb', 'xb' or 'ab'")

    def cat_file(self, path, start=None, end=None, **kwargs) -> bytes:
        """Bytes ``[start, end)`` of the file (negative values count from its end; None: the edges)."""
        path = self._strip_protocol(path)
        with self.client.open(path, "rb") as file:
            if start is None and end is None:
                return file.read()
            if (start is not None and start < 0) or end is None or end < 0:
                size = self.client.stat(path).size
                start = 0 if start is None else max(0, size + start) if start < 0 else start
                end = size if end is None else max(0, size + end) if end < 0 else end
            start = start or 0
            return file.pread(end - start, start) if end > start else b""

    def pipe_file(self, path, value, mode="overwrite", **kwargs) -> None:
        with self.open(path, "xb" if mode == "create" else "wb") as file:
            file.write(value)

    def cp_file(self, path1, path2, **kwargs) -> None:
        source, target = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.client.stat(source).type == "directory":
            self.makedirs(target, exist_ok=True)
            return
        with self.client.open(source, "rb") as reader, self.open(target, "wb") as writer:
            while chunk := reader.read(_COPY_CHUNK):
                writer.write(chunk)

    def touch(self, path, truncate=True, **kwargs) -> None:
        if truncate or not self.exists(path):
            self.pipe_file(path, b"")
        else:
            self.client.open(self._strip_protocol(path), "ab").close()

    # -- namespace -------------------------------------------------------------------------------------
    def mkdir(self, path, create_parents=True, **kwargs) -> None:
        path = self._strip_protocol(path)
        if self.client.exists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        if not create_parents:
            parent = self._parent(path)
            if not self.client.exists(parent) or self.client.stat(parent).type != "directory":
                raise FileNotFoundError(errno.ENOENT, "parent directory does not exist", parent)
        self.client.makedirs(path, exist_ok=True)

    def makedirs(self, path, exist_ok=False) -> None:
        self.client.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rmdir(self, path) -> None:
        path = self._strip_protocol(path)
        if self.client.stat(path).type != "directory":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        self.client.remove(path)

    def rm_file(self, path) -> None:
        path = self._strip_protocol(path)
        if self.client.stat(path).type == "directory":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        self.client.remove(path)

    def _rm(self, path) -> None:
        self.client.remove(self._strip_protocol(path))

    def rm(self, path, recursive=False, maxdepth=None) -> None:
        """Removes files, or directory trees with ``recursive=True`` (one client call per path)."""
        paths = path if isinstance(path, (list, tuple)) else [path]
        if maxdepth is not None or any(has_magic(self._strip_protocol(p)) for p in paths):
            return super().rm(path, recursive=recursive, maxdepth=maxdepth)  # glob expansion, then _rm
        for one in paths:
            one = self._strip_protocol(one)
            if not recursive and self.client.stat(one).type == "directory" and self.client.listdir(one):
                raise IsADirectoryError(errno.EISDIR, "directory not empty; pass recursive=True", one)
            self.client.remove(one, recursive=recursive)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs) -> None:
        """An atomic rename (POSIX semantics: an existing file or empty directory at path2 is replaced)."""
        if isinstance(path1, (list, tuple)) or isinstance(path2, (list, tuple)):
            return super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
        source, target = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.auto_mkdir:
            self.client.makedirs(self._parent(target), exist_ok=True)
        self.client.rename(source, target)


for _protocol in _PROTOCOLS:
    fsspec.register_implementation(_protocol, ThreeFSFileSystem, clobber=True)
del _protocol
