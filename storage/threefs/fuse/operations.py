"""``FuseOperations``: the FUSE requests, answered by a 3FS ``Client``.

One method per opcode, ``op(header, body) -> reply payload`` (bytes, or a list of buffers written
together); a failure is an ``OSError`` whose errno the server sends back (``server.errno_of``).
Namespace requests go to the client's metadata service by path (``nodes.NodeTable`` turns node ids
into paths); GETATTR asks for the inode by id, so it works on renamed and unlinked-but-open files; data
requests go through the ``ThreeFSFile`` the OPEN / CREATE made (``OpenFile``).

Semantics, as a POSIX file system over 3FS gives them:
  * close-to-open consistency: FLUSH (every ``close(2)``) and FSYNC make the file's length exact in
    metadata, so another client sees every byte once ``close`` returns; an OPEN drops the kernel's
    cached pages of the file. Attributes and names are cached by the kernel for ``cache_seconds``
    (default 0: every ``stat`` asks).
  * writes are synchronous on every replica of the chain before WRITE is answered (3FS's own rule).
  * a file's size while it is open for writing here is the larger of metadata's length and the end of
    the writes made through this mount's handles (metadata learns lengths lazily).
  * permission bits, owners and times cannot be changed (3FS keeps none of them per file beyond
    mode 0644 / 0755 / 0777 and times): chmod, chown and utimes succeed and change nothing; every node
    belongs to the mounting user. Hard links, device nodes and extended attributes are refused (ENOSYS /
    EPERM), as hf3fs_fuse refuses most of them.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from storage.threefs.client.client import Client
from storage.threefs.client.file import ThreeFSFile
from storage.threefs.fuse import protocol as p
from storage.threefs.fuse.nodes import Handles, NodeTable, inode_id_of, node_id_of
from storage.threefs.meta.schema import Inode, InodeType

TYPE_BITS = {InodeType.FILE: stat.S_IFREG, InodeType.DIRECTORY: stat.S_IFDIR, InodeType.SYMLINK: stat.S_IFLNK}


@dataclasses.dataclass
class OpenFile:
    """An OPEN / CREATE handle: the 3FS file, and the end of the writes made through it (``written_end``)
    that metadata may not know yet (``dirty``: written since the last FLUSH / FSYNC)."""

    file: ThreeFSFile
    inode_id: int
    writable: bool
    written_end: int = 0
    dirty: bool = False


@dataclasses.dataclass
class OpenDir:
    """An OPENDIR handle: the listing READDIR pages through, as (node id, name, mode) ("." and ".." first)."""

    node_id: int
    entries: list[tuple[int, str, int]]


class FuseOperations:
    """The file system a FUSE server serves.

    Args:
      client: the 3FS client (``connect(url)`` of an embedded or TCP cluster); its metadata service is
        used directly for namespace requests (it answers with inode ids).
      statfs_path: a local directory whose file system STATFS reports (the cluster's root); None: a
        nominal 1 PiB.
      cache_seconds: how long the kernel may cache names and attributes.
    """

    def __init__(self, client: Client, statfs_path: str | Path | None = None, cache_seconds: float = 0.0) -> None:
        if not hasattr(client, "meta"):
            raise ValueError(f"a FUSE mount serves this 3FS's Client (3fs+embedded:// or 3fs+tcp://), got {client!r}")
        self.client = client
        self.meta: Any = client.meta
        self.nodes = NodeTable()
        self.handles = Handles()
        self.statfs_path = statfs_path
        self.cache_seconds = cache_seconds
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.log = logging.getLogger(__name__)
        self._per_thread = threading.local()

    # ----------------------------------------------------------------------------- attributes

    def _attr(self, inode: Inode) -> p.Attr:
        size = inode.length
        if inode.type is InodeType.FILE:
            size = max([size] + [h.written_end for h in self.handles.values()
                                 if isinstance(h, OpenFile) and h.inode_id == inode.inode_id])
        elif inode.type is InodeType.DIRECTORY:
            size = 4096
        return p.Attr(node_id_of(inode.inode_id), size, TYPE_BITS[inode.type] | (inode.mode & 0o7777),
                      inode.nlink, inode.mtime, inode.ctime, inode.atime, self.uid, self.gid)

    def _entry(self, parent: int, name: str, inode: Inode) -> bytes:
        """An entry reply for `inode` found as `name` in `parent`; the kernel now holds one more reference."""
        attr = self._attr(inode)
        self.nodes.remember(parent, name, attr.ino)
        return p.entry_out(attr, self.cache_seconds)

    def _stat_node(self, node_id: int) -> Inode:
        return self.meta.stat_inode(inode_id_of(node_id))

    # ----------------------------------------------------------------------------- names

    def lookup(self, h: p.Header, body: memoryview) -> bytes:
        (name,) = p.names(body, 1)
        return self._entry(h.nodeid, name, self.meta.stat(self.nodes.child_path(h.nodeid, name),
                                                          follow_symlinks=False))

    def forget(self, h: p.Header, body: memoryview) -> None:
        self.nodes.forget(h.nodeid, p.FORGET_IN.unpack_from(body)[0])

    def batch_forget(self, h: p.Header, body: memoryview) -> None:
        count = p.BATCH_FORGET_IN.unpack_from(body)[0]
        for i in range(count):
            self.nodes.forget(*p.FORGET_ONE.unpack_from(body, p.BATCH_FORGET_IN.size + i * p.FORGET_ONE.size))

    def getattr(self, h: p.Header, body: memoryview) -> bytes:
        return p.attr_out(self._attr(self._stat_node(h.nodeid)), self.cache_seconds)

    def setattr(self, h: p.Header, body: memoryview) -> bytes:
        """Truncation (FATTR_SIZE, through the given handle or a short write open); other changes are
        accepted and ignored (see the module docstring)."""
        valid, _, fh, size = p.SETATTR_IN.unpack_from(body)[:4]
        if valid & p.FATTR_SIZE:
            handle = self.handles.get(fh) if valid & p.FATTR_FH else None
            if isinstance(handle, OpenFile) and handle.writable:
                handle.file.truncate(size)
            else:
                inode = self._stat_node(h.nodeid)
                if inode.type is not InodeType.FILE:
                    raise OSError(errno.EISDIR if inode.is_dir else errno.EINVAL, "not a regular file")
                with self.client.open(self.nodes.path(h.nodeid), "r+b") as file:
                    file.truncate(size)
            for other in self.handles.values():  # writes past the new end are gone
                if isinstance(other, OpenFile) and other.inode_id == inode_id_of(h.nodeid):
                    other.written_end = min(other.written_end, size)
        return self.getattr(h, body)

    def readlink(self, h: p.Header, body: memoryview) -> bytes:
        return self.meta.readlink(self.nodes.path(h.nodeid)).encode("utf-8", "surrogateescape")

    def symlink(self, h: p.Header, body: memoryview) -> bytes:
        name, target = p.names(body, 2)
        return self._entry(h.nodeid, name, self.meta.symlink(target, self.nodes.child_path(h.nodeid, name)))

    def mkdir(self, h: p.Header, body: memoryview) -> bytes:
        (name,) = p.names(body[p.MKDIR_IN.size:], 1)
        return self._entry(h.nodeid, name, self.meta.mkdir(self.nodes.child_path(h.nodeid, name)))

    def unlink(self, h: p.Header, body: memoryview) -> bytes:
        (name,) = p.names(body, 1)
        self.meta.unlink(self.nodes.child_path(h.nodeid, name))
        self.nodes.removed(h.nodeid, name)
        return b""

    def rmdir(self, h: p.Header, body: memoryview) -> bytes:
        (name,) = p.names(body, 1)
        self.meta.rmdir(self.nodes.child_path(h.nodeid, name))
        self.nodes.removed(h.nodeid, name)
        return b""

    def rename(self, h: p.Header, body: memoryview) -> bytes:
        (new_parent,) = p.RENAME_IN.unpack_from(body)
        return self._rename(h.nodeid, new_parent, 0, body[p.RENAME_IN.size:])

    def rename2(self, h: p.Header, body: memoryview) -> bytes:
        new_parent, flags, _ = p.RENAME2_IN.unpack_from(body)
        return self._rename(h.nodeid, new_parent, flags, body[p.RENAME2_IN.size:])

    def _rename(self, parent: int, new_parent: int, flags: int, body: memoryview) -> bytes:
        if flags & ~p.RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "renameat2: only RENAME_NOREPLACE is supported (no RENAME_EXCHANGE)")
        name, new_name = p.names(body, 2)
        self.client.rename(self.nodes.child_path(parent, name), self.nodes.child_path(new_parent, new_name),
                           replace=not flags & p.RENAME_NOREPLACE)
        self.nodes.moved(parent, name, new_parent, new_name)
        return b""

    # ----------------------------------------------------------------------------- files

    def _open_handle(self, path: str, mode: str) -> tuple[OpenFile, int]:
        file = self.client.open(path, mode)
        handle = OpenFile(file, file.inode_id, writable="+" in mode)
        return handle, self.handles.add(handle)

    def open(self, h: p.Header, body: memoryview) -> bytes:
        (flags,) = p.OPEN_IN.unpack_from(body)[:1]
        write = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        _, fh = self._open_handle(self.nodes.path(h.nodeid), "r+b" if write else "rb")
        if flags & os.O_TRUNC:  # only sent with FUSE_ATOMIC_O_TRUNC, which we do not ask for; just in case
            self.handles.get(fh).file.truncate(0)
        return p.open_out(fh)

    def create(self, h: p.Header, body: memoryview) -> bytes:
        flags, _mode, _umask, _ = p.CREATE_IN.unpack_from(body)
        (name,) = p.names(body[p.CREATE_IN.size:], 1)
        mode = "x+b" if flags & os.O_EXCL else "w+b" if flags & os.O_TRUNC else "a+b"
        handle, fh = self._open_handle(self.nodes.child_path(h.nodeid, name), mode)
        try:
            entry = self._entry(h.nodeid, name, self.meta.stat_inode(handle.inode_id))
        except BaseException:
            self.handles.pop(fh)
            handle.file.close()
            raise
        return entry + p.open_out(fh)

    def read(self, h: p.Header, body: memoryview) -> memoryview:
        """Reads into this thread's reply buffer (the server writes the reply before this thread's next
        request, so one buffer per worker, reused, saves a 1 MiB allocation and its page faults per READ)."""
        fh, offset, size = p.READ_IN.unpack_from(body)[:3]
        buffer = getattr(self._per_thread, "read_buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._per_thread.read_buffer = memoryview(bytearray(max(size, p.MAX_WRITE)))
        count = self.handles.get(fh).file.pread_into(buffer[:size], offset)
        return buffer[:count]

    def write(self, h: p.Header, body: memoryview) -> bytes:
        fh, offset, size = p.WRITE_IN.unpack_from(body)[:3]
        handle: OpenFile = self.handles.get(fh)
        data = body[p.WRITE_IN.size:p.WRITE_IN.size + size]
        handle.file.pwrite(data, offset)
        handle.written_end = max(handle.written_end, offset + size)
        handle.dirty = True
        return p.WRITE_OUT.pack(size, 0)

    def flush(self, h: p.Header, body: memoryview) -> bytes:
        """Every close(2): the file's length becomes exact in metadata (close-to-open consistency)."""
        return self._sync(p.RELEASE_IN.unpack_from(body)[0])

    def fsync(self, h: p.Header, body: memoryview) -> bytes:
        return self._sync(p.FSYNC_IN.unpack_from(body)[0])

    def _sync(self, fh: int) -> bytes:
        handle = self.handles.get(fh)
        if isinstance(handle, OpenFile) and handle.dirty:
            handle.dirty = False  # before: a write racing with this sync marks the handle dirty again
            try:
                handle.file.fsync()
            except BaseException:
                handle.dirty = True
                raise
        return b""

    def release(self, h: p.Header, body: memoryview) -> bytes:
        handle = self.handles.pop(p.RELEASE_IN.unpack_from(body)[0])
        if isinstance(handle, OpenFile):
            handle.file.close()
        return b""

    # ----------------------------------------------------------------------------- directories

    def _listing(self, node_id: int) -> list[tuple[int, str, int]]:
        entries = [(node_id, ".", stat.S_IFDIR), (self.nodes.parent_of(node_id), "..", stat.S_IFDIR)]
        entries += [(node_id_of(e.inode_id), e.name, TYPE_BITS[e.type])
                    for e in self.meta.listdir(self.nodes.path(node_id))]
        return entries

    def opendir(self, h: p.Header, body: memoryview) -> bytes:
        return p.open_out(self.handles.add(OpenDir(h.nodeid, self._listing(h.nodeid))))

    def readdir(self, h: p.Header, body: memoryview) -> bytes:
        """Entries from `offset` (an index into the listing; 0 lists again) that fit in `size` bytes."""
        fh, offset, size = p.READ_IN.unpack_from(body)[:3]
        listing: OpenDir = self.handles.get(fh)
        if offset == 0:
            listing.entries = self._listing(listing.node_id)
        reply, used = [], 0
        for index in range(offset, len(listing.entries)):
            node_id, name, mode = listing.entries[index]
            record = p.dirent(node_id, index + 1, name, mode)
            if used + len(record) > size:
                break
            reply.append(record)
            used += len(record)
        return b"".join(reply)

    def releasedir(self, h: p.Header, body: memoryview) -> bytes:
        self.handles.pop(p.RELEASE_IN.unpack_from(body)[0])
        return b""

    def fsyncdir(self, h: p.Header, body: memoryview) -> bytes:
        return b""  # metadata transactions are durable when they commit

    # ----------------------------------------------------------------------------- the rest

    def statfs(self, h: p.Header, body: memoryview) -> bytes:
        if self.statfs_path is not None:
            s = os.statvfs(self.statfs_path)
            return p.STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, 255,
                                     s.f_frsize, 0)
        blocks = (1 << 50) // 4096
        return p.STATFS_OUT.pack(blocks, blocks, blocks, 1 << 32, 1 << 32, 4096, 255, 4096, 0)

    def access(self, h: p.Header, body: memoryview) -> bytes:
        self._stat_node(h.nodeid)  # exists; everything belongs to the mounting user
        return b""

    def interrupt(self, h: p.Header, body: memoryview) -> None:
        """Requests run to completion (they are short); the kernel gets their real answer."""

    def destroy(self, h: p.Header, body: memoryview) -> bytes:
        return b""

    def close_all(self) -> None:
        """Closes every handle still open (their write sessions end, their lengths are recorded)."""
        for handle in self.handles.values():
            if isinstance(handle, OpenFile):
                try:
                    handle.file.close()
                except Exception as error:  # noqa: BLE001 - shutting down: the session ends by lease
                    self.log.warning("closing %r at unmount failed: %s", handle.file, error)

    def handlers(self) -> dict[int, Any]:
        """Opcode -> method; opcodes missing here are answered ENOSYS (xattrs, links, mknod, locks, ...)."""
        o = p.Opcode
        return {o.LOOKUP: self.lookup, o.FORGET: self.forget, o.BATCH_FORGET: self.batch_forget,
                o.GETATTR: self.getattr, o.SETATTR: self.setattr, o.READLINK: self.readlink,
                o.SYMLINK: self.symlink, o.MKDIR: self.mkdir, o.UNLINK: self.unlink, o.RMDIR: self.rmdir,
                o.RENAME: self.rename, o.RENAME2: self.rename2, o.OPEN: self.open, o.CREATE: self.create,
                o.READ: self.read, o.WRITE: self.write, o.FLUSH: self.flush, o.FSYNC: self.fsync,
                o.RELEASE: self.release, o.OPENDIR: self.opendir, o.READDIR: self.readdir,
                o.RELEASEDIR: self.releasedir, o.FSYNCDIR: self.fsyncdir, o.STATFS: self.statfs,
                o.ACCESS: self.access, o.INTERRUPT: self.interrupt, o.DESTROY: self.destroy}
