"""Removal in the meta service: what happens to a file when its last link goes, and purging removed trees.

A file or symlink whose last directory entry is removed is dropped (`drop_link`): a symlink's inode simply
goes; a file with open write sessions stays as an orphan inode with nlink 0 (its writers keep working)
and becomes garbage when its last session closes; any other file becomes garbage at once. Garbage is the
inode moved under `GARB`, for storage to delete the file's chunks (`MetaService.garbage`, then `release_garbage`).

Removing a whole tree cannot be one transaction (a transaction's size is bounded), so it is two phases:
`detach` takes the tree out of the namespace in one transaction and records its root under `TRSH`, then
`purge_step` removes at most `batch` entries per transaction, deepest first, until the tree and its
`TRSH` record are gone. Each step commits a consistent state, so a tree whose purge was interrupted is
simply invisible in the namespace until `MetaService.purge_detached` finishes it.
"""

from __future__ import annotations

import dataclasses
import errno
import time

from storage.threefs.kv import Transaction, prefix_end
from storage.threefs.meta.paths import get_inode, os_error, put_inode, resolve_existing
from storage.threefs.meta.schema import (
    DirEntry, Inode, InodeType, dentry_key, dentry_prefix, detached_key, garbage_key, inode_key, session_prefix,
)


def has_entries(txn: Transaction, prefix: bytes) -> bool:
    """Whether any key starts with `prefix` (a directory's entries, a file's sessions)."""
    return bool(txn.get_range(prefix, prefix_end(prefix), limit=1))


def to_garbage(txn: Transaction, inode: Inode) -> None:
    """Moves a file's inode to the garbage list (nlink 0), for storage to delete its chunks."""
    txn.clear(inode_key(inode.inode_id))
    txn.set(garbage_key(inode.inode_id), dataclasses.replace(inode, nlink=0).to_bytes())


def drop_link(txn: Transaction, inode: Inode) -> None:
    """Drops the last link of a file or symlink (its dentry is already cleared)."""
    if inode.is_symlink:
        txn.clear(inode_key(inode.inode_id))
    elif has_entries(txn, session_prefix(inode.inode_id)):
        put_inode(txn, dataclasses.replace(inode, nlink=0, ctime=time.time()))
    else:
        to_garbage(txn, inode)


def detach(txn: Transaction, path: str) -> int | None:
    """Takes `path` out of the namespace: a file or symlink is dropped at once (None); a directory is
    recorded under `TRSH` and its inode id returned, for `purge_step`."""
    res = resolve_existing(txn, path, follow_last=False)
    if res.name is None:
        raise os_error(OSError, errno.EBUSY, path)
    txn.clear(dentry_key(res.parent_id, res.name))
    if not res.inode.is_dir:
        drop_link(txn, res.inode)
        return None
    txn.set(detached_key(res.inode.inode_id), b"")
    return res.inode.inode_id


def purge_step(txn: Transaction, root_id: int, batch: int) -> bool:
    """Removes up to `batch` entries of a detached tree, deepest first; True when it is gone. Only
    removals count against the batch (descending is reads), so every step makes progress."""
    if txn.get(detached_key(root_id)) is None:
        return True
    stack: list[tuple[int, bytes | None]] = [(root_id, None)]   # (directory, its dentry key)
    removed = 0
    while stack and removed < batch:
        dir_id, dir_key = stack[-1]
        prefix = dentry_prefix(dir_id)
        entries = txn.get_range(prefix, prefix_end(prefix), limit=batch - removed)
        if not entries:
            stack.pop()
            txn.clear(inode_key(dir_id))
            removed += 1
            if dir_key is None:
                txn.clear(detached_key(root_id))
                return True
            txn.clear(dir_key)
            continue
        for key, value in entries:
            entry = DirEntry.from_kv(key, value)
            if entry.type is InodeType.DIRECTORY:
                stack.append((entry.inode_id, key))
                break
            txn.clear(key)
            drop_link(txn, get_inode(txn, entry.inode_id))
            removed += 1
    return False
