"""``StreamFile``: the stream half of a file (read, write, seek, tell) over its positional IO.

Both file classes (``client_file.ThreeFSFile`` for this 3FS, ``mount.MountFile`` for a FUSE mount) do
their IO at explicit offsets (``pread_into`` / ``pwrite``, like USRBIO); the position, append mode and
the open-mode checks are the same for both and live here.
"""

from __future__ import annotations

import io

from storage.threefs.client.file_api import OpenMode


class StreamFile:
    """Mixin. Subclasses set ``path``, ``mode``, ``closed``, ``_open_mode`` (OpenMode) and ``_position``,
    and implement ``pread_into(buffer, offset)``, ``pwrite(data, offset)`` and ``_end()`` (the file's
    current size)."""

    path: str
    mode: str
    closed: bool
    _open_mode: OpenMode
    _position: int

    def pread_into(self, buffer, offset: int) -> int:
        raise NotImplementedError

    def pwrite(self, data, offset: int) -> int:
        raise NotImplementedError

    def _end(self) -> int:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self.path!r}")

    def _check_io(self, writing: bool) -> None:
        """Raises for a closed file or an operation its mode does not allow."""
        self._check_open()
        if not (self._open_mode.write if writing else self._open_mode.read):
            raise io.UnsupportedOperation(f"{self.path!r} is not open for {'writing' if writing else 'reading'} "
                                          f"(mode {self.mode!r})")

    @staticmethod
    def _check_offset(offset: int, name: str = "offset") -> None:
        if offset < 0:
            raise ValueError(f"{name} must be >= 0, got {offset}")

    def readable(self) -> bool:
        return self._open_mode.read

    def writable(self) -> bool:
        return self._open_mode.write

    def seekable(self) -> bool:
        return True

    def pread(self, length: int, offset: int) -> bytes:
        """[n <= length] bytes at `offset`, short only at the end of the file; the position stays."""
        self._check_offset(length, "length")
        buffer = bytearray(length)
        count = self.pread_into(buffer, offset)
        return bytes(buffer) if count == length else bytes(buffer[:count])

    def read(self, size: int = -1) -> bytes:
        self._check_io(writing=False)
        if size is None or size < 0:
            size = max(0, self._end() - self._position)
        data = self.pread(size, self._position)
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        count = self.pread_into(buffer, self._position)
        self._position += count
        return count

    def write(self, data) -> int:
        """Writes at the position (append mode: at the current end of the file)."""
        self._check_io(writing=True)
        if self._open_mode.append:
            self._position = self._append_position(memoryview(data).nbytes)
        count = self.pwrite(data, self._position)
        self._position += count
        return count

    def _append_position(self, size: int) -> int:
        """Where an append of `size` bytes goes: the current end (a file shared by concurrent appenders
        overrides this with a reservation)."""
        return self._end()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            base = 0
        elif whence == io.SEEK_CUR:
            base = self._position
        elif whence == io.SEEK_END:
            base = self._end()
        else:
            raise ValueError(f"whence must be 0, 1 or 2, got {whence!r}")
        if base + offset < 0:
            raise ValueError(f"seek to {base + offset} (offset={offset}, whence={whence}) in {self.path!r}: "
                             f"negative position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        self._check_open()
        return self._position

    def flush(self) -> None:
        self._check_open()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError
