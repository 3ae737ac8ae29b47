"""Mounting and unmounting through the kernel directly (``mount(2)`` / ``umount2(2)`` via ctypes; no libfuse,
no fusermount), and ``serve_mount``: what ``python -m storage.threefs mount URL MOUNTPOINT`` runs.

``mount_fuse`` opens ``/dev/fuse`` and mounts a ``fuse.jaxseek3fs`` file system on that connection; it
needs root (CAP_SYS_ADMIN). Problems are ``MountError`` naming the cause: no ``/dev/fuse``, a mountpoint
that is not an empty directory, missing privileges, a kernel without FUSE. ``unmount`` detaches
(``MNT_DETACH``): the mountpoint is free at once, and the connection ends when the last open file on
it closes. ``serve_mount`` unmounts on SIGTERM / SIGINT, when the process exits, and stops serving when
someone else unmounts (``umount MOUNTPOINT``).
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import functools
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path

from storage.threefs.fuse.operations import FuseOperations
from storage.threefs.fuse.server import FuseServer

FUSE_DEVICE = "/dev/fuse"
FS_TYPE = "fuse.jaxseek3fs"
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
STOP_GRACE_SECONDS = 5.0  # after unmounting, how long the workers may finish requests in flight


class MountError(OSError):
    """Mounting failed; the message says why and what would fix it."""


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def check_mountpoint(mountpoint: str | Path) -> Path:
    """The mountpoint, resolved; MountError unless it is an existing empty directory."""
    path = Path(mountpoint).absolute()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"mountpoint {path} does not exist (create an empty directory)") from None
    except OSError as error:  # ENOTCONN: a FUSE mount whose server died
        raise MountError(error.errno, f"mountpoint {path}: {error.strerror} (a dead mount? umount -l {path})") \
            from None
    if not stat.S_ISDIR(mode):
        raise MountError(errno.ENOTDIR, f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(errno.EBUSY, f"mountpoint {path} is already a mount point (unmount it first)")
    if any(path.iterdir()):
        raise MountError(errno.ENOTEMPTY, f"mountpoint {path} is not empty (its files would be hidden)")
    return path


def mount_fuse(mountpoint: str | Path) -> int:
    """Opens a FUSE connection and mounts it on `mountpoint` (an empty directory); returns the device fd.
    The kernel's first request (INIT) waits on the fd: serve it (``FuseServer``) before touching the mount."""
    path = check_mountpoint(mountpoint)
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(errno.ENOENT, f"{FUSE_DEVICE} is missing: load the kernel module (modprobe fuse) or "
                                       f"give the container the device (--device /dev/fuse)")
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise MountError(errno.EACCES, f"cannot open {FUSE_DEVICE}: mounting needs root (euid {os.geteuid()})") \
            from None
    options = f"fd={fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()}"
    if _libc().mount(b"jaxseek3fs", os.fsencode(path), FS_TYPE.encode(), MS_NOSUID | MS_NODEV, options.encode()):
        code = ctypes.get_errno()
        os.close(fd)
        if code == errno.EPERM:
            raise MountError(code, f"mount {path}: not permitted: mounting FUSE needs root or CAP_SYS_ADMIN "
                                   f"(euid {os.geteuid()}; in a container, --cap-add SYS_ADMIN)")
        if code == errno.ENODEV:
            raise MountError(code, "mount: this kernel has no FUSE file system (modprobe fuse)")
        raise MountError(code, f"mount {path}: {os.strerror(code)}")
    return fd


def unmount(mountpoint: str | Path) -> bool:
    """Lazily unmounts `mountpoint` (MNT_DETACH); True if it was mounted. Other failures raise OSError."""
    if _libc().umount2(os.fsencode(str(mountpoint)), MNT_DETACH):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            return False
        raise OSError(code, f"umount {mountpoint}: {os.strerror(code)}")
    return True


def set_read_ahead(mountpoint: str | Path, kilobytes: int) -> bool:
    """Sets the kernel's read-ahead for the FUSE mount at `mountpoint` (its backing device's
    ``read_ahead_kb``; the kernel starts FUSE mounts at 128 KiB, so a 1 MiB ``read`` becomes 8 READ
    requests); True if it took. Call from a thread other than the mount's workers."""
    device = os.stat(mountpoint).st_dev
    try:
        Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").write_text(str(kilobytes))
    except OSError as error:
        logging.getLogger(__name__).info("cannot set the read-ahead of %s: %s", mountpoint, error)
        return False
    return True


def fuse_unavailable_reason() -> str | None:
    """None if this process can mount FUSE file systems; otherwise why not (tries a mount on a scratch
    directory and undoes it at once)."""
    with tempfile.TemporaryDirectory(prefix="fuse-probe-") as scratch:
        try:
            fd = mount_fuse(scratch)
        except OSError as error:
            return str(error)
        try:
            unmount(scratch)
        finally:
            os.close(fd)
    return None


def serve_mount(url: str, mountpoint: str | Path, *, threads: int = 4, cache_seconds: float = 0.0,
                read_ahead_kb: int = 1024, ready: threading.Event | None = None) -> None:
    """Mounts the 3FS at `url` (``connect``'s URLs: ``3fs+embedded:///dir``, ``3fs+tcp:///dir``) on
    `mountpoint` and serves it until SIGTERM / SIGINT or an external unmount; then unmounts, closes the
    files still open (recording their lengths) and the client. Must run in the main thread (signals).
    `read_ahead_kb`: the kernel's read-ahead on the mount (``set_read_ahead``). `ready` is set once the
    mount answers."""
    from storage.threefs.connect import connect

    check_mountpoint(mountpoint)  # before connecting: a wrong mountpoint creates no cluster
    stop = threading.Event()  # signals from here on stop the mount (before it exists: right after mounting)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        client = connect(url)
        try:
            operations = FuseOperations(client, _cluster_dir(url), cache_seconds)
            _serve(mount_fuse(mountpoint), os.path.abspath(mountpoint), operations, threads, read_ahead_kb,
                   stop, ready, f"3FS {url} mounted at {os.path.abspath(mountpoint)}")
        finally:
            client.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(fd: int, path: str, operations: FuseOperations, threads: int, read_ahead_kb: int,
           stop: threading.Event, ready: threading.Event | None, banner: str) -> None:
    """Serves the mounted connection `fd` until `stop` or an external unmount; then unmounts, lets the
    requests in flight finish and closes the handles still open, and the fd."""
    at_exit = functools.partial(unmount, path)
    atexit.register(at_exit)  # however the process ends (short of SIGKILL), the mountpoint is freed
    server = FuseServer(fd, operations, threads)
    try:
        server.start()
        if not server.initialized.wait(10.0):
            raise MountError(errno.ETIMEDOUT, f"the kernel sent no FUSE INIT for {path} within 10 s")
        set_read_ahead(path, read_ahead_kb)
        if ready is not None:
            ready.set()
        print(banner, flush=True)
        while not stop.wait(0.2) and server.running():
            pass
    finally:
        unmount(path)
        finished = server.wait(STOP_GRACE_SECONDS)
        if not finished:
            logging.getLogger(__name__).warning("requests on %s still running %.0f s after unmounting: "
                                                "leaving the connection open under them", path, STOP_GRACE_SECONDS)
        operations.close_all()
        if finished:  # a worker still in readv/writev must never meet a reused descriptor number
            os.close(fd)
        atexit.unregister(at_exit)  # only this mount's (another mount in the process keeps its own)


def _cluster_dir(url: str) -> str | None:
    """The local directory of an embedded or TCP cluster URL (STATFS reports its file system)."""
    _, _, rest = url.partition("://")
    path = "/" + rest.partition("/")[2]
    return path if path != "/" and os.path.isdir(path) else None


def exit_with_parent() -> None:
    """Asks the kernel to SIGTERM this process when its parent dies (Linux PR_SET_PDEATHSIG; the handler
    then unmounts). Set here, after exec, rather than in a fork hook of a multithreaded parent."""
    parent = os.getppid()
    _libc().prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(url: str, mountpoint: str, threads: int, cache_seconds: float, read_ahead_kb: int,
         with_parent: bool = False) -> int:
    """The ``mount`` sub-command: 0 after a clean unmount, 2 (with the reason on stderr) if mounting failed.
    `with_parent`: unmount and exit when the parent process dies (``exit_with_parent``)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if with_parent:
        exit_with_parent()
    try:
        serve_mount(url, mountpoint, threads=threads, cache_seconds=cache_seconds, read_ahead_kb=read_ahead_kb)
    except (MountError, ValueError) as error:
        print(f"mount: {error}", file=sys.stderr)
        return 2
    return 0
