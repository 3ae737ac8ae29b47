"""``MountClient``: the file API over a real 3FS FUSE mount (or any POSIX directory).

A 3FS cluster is used through its FUSE mount (``/3fs/stage`` and the like): metadata operations go through
the kernel to the FUSE daemon, data through the page cache or, with USRBIO, through shared memory.
``MountClient`` maps the package's ``FileClient`` protocol onto such a directory, so ``usrbio.py``,
``fsspec_fs.py`` and the adapters run unchanged against a production cluster. Client paths are relative to
the mount point (``/`` is the mount root; ``..`` never leaves it). Files are OS files (``os.pread`` /
``os.pwrite``); ``rename`` is ``os.replace`` (atomic); errors are the OS ones with the client path.

When DeepSeek's ``hf3fs_fuse.io`` is importable and says the directory is on 3FS (``native_usrbio``),
``File.fsync`` also calls its ``force_fsync`` (3FS updates file lengths lazily; this makes ``stat``'s
size exact) and ``MountClient.iovec``/``ioring`` return the native USRBIO objects (whose ``prepare``
takes ``file.fileno()`` after ``register_fd``). Without it everything takes the POSIX path.
"""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import stat as stat_module
from types import ModuleType

from storage.threefs.client.file_api import FileStat, OpenMode, parse_mode
from storage.threefs.client.stream_file import StreamFile
from storage.threefs.client.usrbio import IoRing, IoVec

_VIRTUAL_DIR = "3fs-virt"  # the FUSE daemon's control directory at a 3FS mount root


def native_usrbio(mount_point: str) -> ModuleType | None:
    """``hf3fs_fuse.io`` if it imports and places ``mount_point`` on a 3FS FUSE mount, else None."""
    try:
        module = importlib.import_module("hf3fs_fuse.io")
    except ImportError:
        return None
    try:
        on_3fs = module.extract_mount_point(os.path.realpath(mount_point))
    except Exception:  # noqa: BLE001 - a broken binding means: use the POSIX path
        return None
    return module if on_3fs else None


def _with_path(exc: OSError, path: str, path2: str | None = None) -> OSError:
    """The same kind of OSError (chosen by errno), naming client paths instead of OS paths."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), path, None, path2)


def _open_flags(mode: OpenMode) -> int:
    flags = os.O_RDWR if mode.read and mode.write else os.O_WRONLY if mode.write else os.O_RDONLY
    if mode.create:
        flags |= os.O_CREAT
    if mode.exclusive:
        flags |= os.O_EXCL
    if mode.truncate:
        flags |= os.O_TRUNC
    return flags | getattr(os, "O_CLOEXEC", 0)


class MountFile(StreamFile):
    """An open OS file behind the ``file_api.File`` protocol (unbuffered: every call is a syscall).

    Append mode writes at the current end of the file (found by ``fstat``) rather than using O_APPEND,
    because Linux makes ``pwrite`` ignore its offset under O_APPEND; ``pwrite`` keeps its offset.
    """

    def __init__(self, fd: int, path: str, mode: str, parsed: OpenMode, native: ModuleType | None):
        self.path = path
        self.mode = mode
        self.closed = False
        self._fd = fd
        self._open_mode = parsed
        self._native = native
        self._position = 0

    def fileno(self) -> int:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self.path}")
        return self._fd

    # -- positional IO ---------------------------------------------------------------------------------
    def pread_into(self, buffer, offset: int) -> int:
        """Fills ``buffer`` ([n] bytes, writable) from ``offset``; short only at end of file."""
        self._check_io(writing=False)
        self._check_offset(offset)
        with memoryview(buffer) as whole, whole.cast("B") as view:
            done = 0
            while done < len(view):
                try:
                    got = os.preadv(self._fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise _with_path(exc, self.path) from None
                if got == 0:
                    break
                done += got
        return done

    def pwrite(self, data, offset: int) -> int:
        """Writes all of ``data`` (bytes-like) at ``offset``; returns its length."""
        self._check_io(writing=True)
        self._check_offset(offset)
        with memoryview(data) as whole, whole.cast("B") as view:
            done = 0
            while done < len(view):
                try:
                    done += os.pwrite(self._fd, view[done:], offset + done)
                except OSError as exc:
                    raise _with_path(exc, self.path) from None
        return done

    def truncate(self, size: int | None = None) -> int:
        self._check_io(writing=True)
        size = self._position if size is None else size
        self._check_offset(size, "size")
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise _with_path(exc, self.path) from None
        return size

    def fsync(self) -> None:
        self._check_open()
        try:
            os.fsync(self._fd)
            if self._native is not None and self._open_mode.write:
                self._native.force_fsync(self._fd)
        except OSError as exc:
            raise _with_path(exc, self.path) from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()

    def __repr__(self) -> str:
        return f"MountFile({self.path!r}, mode={self.mode!r}{', closed' if self.closed else ''})"

    def _end(self) -> int:
        return os.fstat(self._fd).st_size


class MountClient:
    """The ``FileClient`` for the directory ``mount_point`` (a 3FS FUSE mount or any POSIX directory)."""

    def __init__(self, mount_point: str | os.PathLike):
        root = os.path.realpath(os.fspath(mount_point))
        if not os.path.isdir(root):
            raise NotADirectoryError(errno.ENOTDIR, "mount_point is not a directory", os.fspath(mount_point))
        self.mount_point = root
        self.usrbio = native_usrbio(root)

    def __repr__(self) -> str:
        return f"MountClient({self.mount_point!r}{', hf3fs USRBIO' if self.usrbio else ''})"

    # -- paths -----------------------------------------------------------------------------------------
    def normpath(self, path: str) -> str:
        """The canonical client path: ``/``-rooted, no ``.``/``..``/empty parts; ``..`` above ``/`` is a
        ``ValueError``."""
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, got {type(path).__name__}")
        parts: list[str] = []
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise ValueError(f"path={path!r} escapes the mount root with '..'")
                parts.pop()
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    def os_path(self, path: str) -> str:
        """The OS path of a client path under the mount point."""
        relative = self.normpath(path).lstrip("/")
        return os.path.join(self.mount_point, relative) if relative else self.mount_point

    # -- FileClient ------------------------------------------------------------------------------------
    def open(self, path: str, mode: str = "rb") -> MountFile:
        parsed = parse_mode(mode)
        client_path = self.normpath(path)
        try:
            fd = os.open(self.os_path(client_path), _open_flags(parsed), 0o666)
        except OSError as exc:
            raise _with_path(exc, client_path) from None
        if stat_module.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), client_path)
        return MountFile(fd, client_path, mode, parsed, self.usrbio)

    def stat(self, path: str) -> FileStat:
        client_path = self.normpath(path)
        os_path = self.os_path(client_path)
        try:
            st = os.stat(os_path)
        except FileNotFoundError:
            try:
                st = os.lstat(os_path)  # a dangling symlink is still an entry
            except OSError as exc:
                raise _with_path(exc, client_path) from None
        except OSError as exc:
            raise _with_path(exc, client_path) from None
        kind = ("directory" if stat_module.S_ISDIR(st.st_mode) else
                "symlink" if stat_module.S_ISLNK(st.st_mode) else "file")
        return FileStat(client_path, st.st_size if kind == "file" else 0, kind, st.st_mtime, st.st_ino)

    def listdir(self, path: str) -> list[str]:
        client_path = self.normpath(path)
        try:
            names = os.listdir(self.os_path(client_path))
        except OSError as exc:
            raise _with_path(exc, client_path) from None
        if client_path == "/" and self.usrbio is not None:
            names = [name for name in names if name != _VIRTUAL_DIR]
        return sorted(names)

    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        client_path = self.normpath(path)
        try:
            os.makedirs(self.os_path(client_path), exist_ok=exist_ok)
        except OSError as exc:
            raise _with_path(exc, client_path) from None

    def rename(self, src: str, dst: str, replace: bool = True) -> None:
        """Atomic rename; replace=False raises FileExistsError instead of replacing `dst` (files only:
        a hard link then an unlink, since Python has no renameat2)."""
        source, target = self.normpath(src), self.normpath(dst)
        if source == "/" or target == "/":
            raise ValueError(f"cannot rename the mount root (src={src!r}, dst={dst!r})")
        try:
            if replace:
                os.replace(self.os_path(source), self.os_path(target))
            else:
                os.link(self.os_path(source), self.os_path(target))
                os.unlink(self.os_path(source))
        except OSError as exc:
            raise _with_path(exc, source, target) from None

    def remove(self, path: str, recursive: bool = False) -> None:
        client_path = self.normpath(path)
        if client_path == "/":
            raise ValueError(f"path={path!r}: refusing to remove the mount root")
        os_path = self.os_path(client_path)
        try:
            if os.path.isdir(os_path) and not os.path.islink(os_path):
                if recursive:
                    shutil.rmtree(os_path)
                else:
                    os.rmdir(os_path)
            else:
                os.unlink(os_path)
        except OSError as exc:
            raise _with_path(exc, client_path) from None

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.os_path(path))

    def close(self) -> None:
        """Nothing to release: the mount stays mounted."""

    # -- USRBIO ----------------------------------------------------------------------------------------
    def iovec(self, size: int, block_size: int = 0):
        """An Iov of ``size`` bytes: native (``hf3fs_fuse.io.make_iovec``) on 3FS, else ``usrbio.IoVec``."""
        if self.usrbio is None:
            return IoVec(size, block_size)
        from multiprocessing.shared_memory import SharedMemory
        shm = SharedMemory(create=True, size=size)
        iov = self.usrbio.make_iovec(shm, self.mount_point, block_size=block_size)
        shm.unlink()  # the mapping and the 3FS registration keep the memory alive (as fuse_demo.py does)
        return iov

    def ioring(self, entries: int, for_read: bool = True, io_depth: int = 0):
        """An Ior: native (``hf3fs_fuse.io.make_ioring``; prepare takes ``file.fileno()`` after
        ``register_fd``) on 3FS, else ``usrbio.IoRing`` (prepare takes the ``MountFile``)."""
        if self.usrbio is None:
            return IoRing(entries, for_read=for_read, io_depth=io_depth)
        return self.usrbio.make_ioring(self.mount_point, entries, for_read=for_read, io_depth=io_depth)
