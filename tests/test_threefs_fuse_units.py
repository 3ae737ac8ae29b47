"""The FUSE mount's parts that need no mount: the node table (node ids -> paths through renames, removals
and forgets), the wire structs, and the errors that name why mounting failed."""

from __future__ import annotations

import ctypes
import errno

import pytest

from storage.threefs.fuse import mount as mount_module
from storage.threefs.fuse import protocol
from storage.threefs.fuse.nodes import NodeTable


def test_the_node_table_follows_renames_and_forgets():
    nodes = NodeTable()
    nodes.remember(1, "a", 10)
    nodes.remember(10, "f", 11)
    assert nodes.path(11) == "/a/f"
    nodes.moved(1, "a", 1, "b")  # a directory rename moves what is below it
    assert nodes.path(11) == "/b/f" and nodes.child_path(10, "g") == "/b/g"
    nodes.remember(10, "g", 12)
    nodes.moved(10, "f", 10, "g")  # replaces g: its node is detached
    assert nodes.path(11) == "/b/g"
    with pytest.raises(OSError) as stale:
        nodes.path(12)
    assert stale.value.errno == errno.ESTALE
    nodes.removed(10, "g")
    with pytest.raises(OSError):
        nodes.path(11)
    nodes.remember(1, "b", 10)
    nodes.forget(10, 1)
    assert nodes.path(10) == "/b"  # still one reference left
    nodes.forget(10, 1)
    with pytest.raises(OSError):
        nodes.path(10)
    assert nodes.known() == 3  # the root and the two detached files the kernel still holds


def test_dirents_are_8_byte_aligned_and_carry_the_type():
    record = protocol.dirent(5, 3, "abc", 0o100644)
    assert len(record) == 32 and len(record) % 8 == 0
    ino, offset, namelen, kind = protocol.DIRENT.unpack_from(record)
    assert (ino, offset, namelen, kind, record[24:27]) == (5, 3, 3, 8, b"abc")  # DT_REG
    assert len(protocol.dirent(5, 3, "x" * 8, 0o40755)) == 32


def test_mount_errors_name_their_cause(tmp_path, monkeypatch):
    class RefusingLibc:  # mount(2) as an unprivileged process gets it
        @staticmethod
        def mount(*args):
            ctypes.set_errno(errno.EPERM)
            return -1

    (tmp_path / "mp").mkdir()
    monkeypatch.setattr(mount_module, "_libc", RefusingLibc)
    with pytest.raises(mount_module.MountError, match="needs root") as refused:
        mount_module.mount_fuse(tmp_path / "mp")
    assert refused.value.errno in (errno.EPERM, errno.EACCES)  # EACCES: /dev/fuse itself (not root here)
    monkeypatch.setattr(mount_module, "FUSE_DEVICE", str(tmp_path / "no-such-device"))
    with pytest.raises(mount_module.MountError, match="no-such-device is missing"):
        mount_module.mount_fuse(tmp_path / "mp")
    with pytest.raises(mount_module.MountError, match="does not exist"):
        mount_module.mount_fuse(tmp_path / "absent")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(mount_module.MountError, match="not a directory"):
        mount_module.mount_fuse(tmp_path / "file")
