"""Paths in the meta service: normalising them and resolving them to inodes inside a transaction.

User paths are absolute and `/`-separated; `split_path` normalises one lexically ('.', '..' and duplicate
slashes; '..' of the root is the root) into its components, checking each name's length. `walk` then
resolves components from the root, one directory-entry read per component, following symlinks in
intermediate components (and in the last one when asked) up to Linux's limit of 40; a symlink target is
split as it stands, so its '..' components go to the directory inode's parent field. A missing last
component resolves to its would-be directory and name, which is what creating operations need.

`check_not_within` walks the other way, up parent fields, so that rename can refuse to move a directory
into its own subtree. The inode and directory-entry accessors (`get_inode`, `put_inode`, `get_dentry`,
`put_dentry`) live here too. Everything here is a function over a `Transaction`, so a resolution is part
of the caller's transaction and conflicts with concurrent changes to any entry it read. Errors are the
POSIX ones (`os_error`).
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from storage.threefs.errors import os_error  # noqa: F401 - re-exported: meta's modules import it from here
from storage.threefs.kv import Transaction
from storage.threefs.meta.schema import ROOT_INODE_ID, DirEntry, Inode, InodeType, dentry_key, inode_key

MAX_SYMLINK_FOLLOWS = 40      # as Linux's MAXSYMLINKS
MAX_NAME_BYTES = 255


def split_path(path: str, argname: str = "path") -> list[str]:
    """The components of an absolute path, with '.', '..' and duplicate slashes resolved lexically."""
    if not isinstance(path, str):
        raise TypeError(f"{argname} must be a str, got {type(path).__name__}")
    if not path.startswith("/"):
        raise ValueError(f"{argname} must be an absolute path starting with '/', got {path!r}")
    parts: list[str] = []
    for c in path.split("/"):
        if c == "..":
            if parts:
                parts.pop()
        elif c not in ("", "."):
            if "\0" in c:
                raise ValueError(f"{argname} must not contain NUL bytes, got {path!r}")
            if len(c.encode()) > MAX_NAME_BYTES:
                raise os_error(OSError, errno.ENAMETOOLONG, path)
            parts.append(c)
    return parts


class Resolved(NamedTuple):
    """Where a path lands: its directory and name (None for the root or a '.'/'..' ending) and its inode."""

    parent_id: int | None
    name: str | None
    inode: Inode | None


def get_inode(txn: Transaction, inode_id: int, what: str | None = None) -> Inode:
    """The inode `inode_id`; FileNotFoundError naming `what` (default: the id) if it does not exist."""
    data = txn.get(inode_key(inode_id))
    if data is None:
        raise os_error(FileNotFoundError, errno.ENOENT, what or f"inode {inode_id}")
    return Inode.from_bytes(data)


def put_inode(txn: Transaction, inode: Inode) -> None:
    """Stores `inode` under its id."""
    txn.set(inode_key(inode.inode_id), inode.to_bytes())


def get_dentry(txn: Transaction, parent: int, name: str) -> DirEntry | None:
    """The entry `name` of directory `parent`, or None."""
    key = dentry_key(parent, name)
    data = txn.get(key)
    return None if data is None else DirEntry.from_kv(key, data)


def put_dentry(txn: Transaction, parent: int, name: str, inode: Inode) -> None:
    """Stores the entry `name` of directory `parent`, pointing to `inode`."""
    txn.set(dentry_key(parent, name), DirEntry(parent, name, inode.inode_id, inode.type).value_bytes())


def walk(txn: Transaction, path: str, comps: list[str], follow_last: bool) -> Resolved:
    """Resolves normalised components from the root, following symlinks in intermediate components
    (and in the last one if follow_last). A missing last component gives inode None."""
    stack = list(reversed(comps))
    cur = ROOT_INODE_ID                      # the directory being looked in
    parent_id: int | None = None
    name: str | None = None
    node_id = ROOT_INODE_ID
    follows = 0
    while stack:
        c = stack.pop()
        if c in (".", ".."):                 # only from symlink targets: user paths are normalised
            if c == "..":
                cur = get_inode(txn, cur, path).parent
            parent_id, name, node_id = None, None, cur
            continue
        entry = get_dentry(txn, cur, c)
        if entry is None:
            if stack:
                raise os_error(FileNotFoundError, errno.ENOENT, path)
            return Resolved(cur, c, None)
        parent_id, name, node_id = cur, c, entry.inode_id
        if entry.type is InodeType.SYMLINK and (stack or follow_last):
            follows += 1
            if follows > MAX_SYMLINK_FOLLOWS:
                raise os_error(OSError, errno.ELOOP, path)
            target = get_inode(txn, entry.inode_id, path).target or ""
            if target.startswith("/"):
                cur = ROOT_INODE_ID
            stack.extend(reversed([p for p in target.split("/") if p]))
            parent_id, name, node_id = None, None, cur
            continue
        if stack:
            if entry.type is not InodeType.DIRECTORY:
                raise os_error(NotADirectoryError, errno.ENOTDIR, path)
            cur = entry.inode_id
    return Resolved(parent_id, name, get_inode(txn, node_id, path))


def check_not_within(txn: Transaction, dir_id: int, moved_id: int, path: str) -> None:
    """OSError(EINVAL) naming `path` if directory `moved_id` is directory `dir_id` or one of its ancestors, so
    that moving it into `dir_id` would make it its own ancestor; follows parent fields up to the root."""
    ancestor, hops = dir_id, 0
    while True:
        if ancestor == moved_id:
            raise os_error(OSError, errno.EINVAL, path)
        if ancestor == ROOT_INODE_ID:
            break
        ancestor, hops = get_inode(txn, ancestor, path).parent, hops + 1
        if hops > 1 << 16:
            raise RuntimeError(f"directory parent chain of {path!r} does not reach the root")


def resolve_existing(txn: Transaction, path: str, follow_last: bool = True) -> Resolved:
    """Resolves `path`, which must exist."""
    res = walk(txn, path, split_path(path), follow_last)
    if res.inode is None:
        raise os_error(FileNotFoundError, errno.ENOENT, path)
    return res
