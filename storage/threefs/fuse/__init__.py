"""storage.threefs.fuse: this 3FS as a POSIX directory through the kernel's FUSE, like 3FS's hf3fs_fuse.

``python -m storage.threefs mount URL MOUNTPOINT`` serves ``connect(URL)`` (``3fs+embedded:///dir`` or
``3fs+tcp:///dir``) at MOUNTPOINT until SIGTERM / SIGINT, so tools that only take paths (polars' native
readers, DuckDB, TensorStore) read and write 3FS files unchanged. Pure Python: the FUSE kernel protocol
is spoken directly on ``/dev/fuse`` (no libfuse, no fusermount); mounting needs root (CAP_SYS_ADMIN).

=================  ======================================================================================
``protocol.py``    the kernel protocol: opcodes, flags, request and reply struct layouts (``linux/fuse.h``)
``nodes.py``       node ids (3FS inode id + 1) -> paths with the kernel's lookup counts; open handles
``operations.py``  ``FuseOperations``: each request answered by a 3FS ``Client`` (semantics documented there:
                   close-to-open consistency, synchronous replicated writes, what is refused)
``server.py``      ``FuseServer``: worker threads reading requests from the device and writing replies
``mount.py``       ``mount_fuse`` / ``unmount`` (mount(2) / umount2(2) via ctypes), ``serve_mount``, the CLI
=================  ======================================================================================

The serving process should not use its own mount: its requests would be served by its own workers and
hang once they stop (at unmount). Mount in one process, use the path from others.
"""

from storage.threefs.fuse.mount import MountError, fuse_unavailable_reason, mount_fuse, serve_mount, unmount

__all__ = ["MountError", "fuse_unavailable_reason", "mount_fuse", "serve_mount", "unmount"]
