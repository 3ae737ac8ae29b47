"""File lengths in the meta service: writers' reports, storage lengths, truncations and append reservations.

The service learns a file's length from its writers: they report the end of their writes periodically,
on fsync and on close, and the stored length becomes max(stored, reported). That alone loses the length
of a writer that dies before reporting, although storage holds its bytes. So, as in 3FS, the service
also asks storage for the exact length (``MetaService(storage_length=...)``: the end of the last chunk
holding bytes, over every chain of the file's layout) when a write session closes and when it prunes a
dead client's session, and keeps max(stored, reported, storage).

A storage length must never bring back bytes that a truncate or a ``wb`` reopen removed. Both drop the
chunks first and then, in one transaction, set the length exactly and add one to the inode's
``truncations``. A storage length is measured outside any transaction (storage is another service), so it
is paired with the count it was measured under (a ``Measured``) and applied only by a transaction that
still sees that count; otherwise it is stale (``StaleMeasurement``): close measures again, prune leaves
the session for its next round. A truncate that commits after a transaction applied a measurement sets
the length exactly anyway. A length report carries the count its handle last saw; one from before a
truncation is ignored (storage's length on close covers that handle's later writes).

Appends: ``reserve_append`` gives each ``ab`` write its own range [offset, offset + size), offset =
max(length, append_end), and advances ``append_end``; concurrent appenders never overwrite each other.
The length grows only as written bytes are reported or measured: a reserved range nobody wrote stays
past the end, unless a later append lands past it (then it reads as zeros, a hole).

These are transaction bodies; ``MetaService`` runs them (and does the storage queries).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from storage.threefs.kv.store import KVStore, Transaction
from storage.threefs.meta.paths import get_inode, os_error, put_inode
from storage.threefs.meta.remove import has_entries, to_garbage
from storage.threefs.meta.schema import Inode, session_key, session_prefix


class Measured(NamedTuple):
    """A file's length as storage reported it, and the inode's truncation count when it was asked."""

    truncations: int
    length: int


class StaleMeasurement(Exception):
    """The file was truncated between measuring its length on storage and applying it."""


def measure(kv: KVStore, storage_length: Callable[[Inode], int] | None, inode_id: int) -> Measured | None:
    """Storage's length of a linked file, with the truncation count it was measured under (read before
    asking storage); None without `storage_length`, for a removed or missing file, or when storage does
    not answer (logged)."""
    if storage_length is None:
        return None
    try:
        node = kv.transact(lambda txn: get_inode(txn, inode_id), read_only=True)
    except FileNotFoundError:
        return None
    if not node.is_file or node.nlink == 0 or node.layout is None:
        return None
    try:
        return Measured(node.truncations, storage_length(node))
    except Exception as error:  # noqa: BLE001 - storage down: the reported length still counts
        logging.getLogger(__name__).warning("3FS meta: storage length of inode %d unavailable: %s", inode_id, error)
        return None


def grown(node: Inode, length: int) -> Inode:
    """`node` with length max(its length, `length`) (mtime updated when it grows)."""
    if length <= node.length:
        return node
    return dataclasses.replace(node, length=length, mtime=time.time())


def truncated(node: Inode, length: int) -> Inode:
    """`node` with exactly `length`, one more truncation, and no append reservations left."""
    now = time.time()
    return dataclasses.replace(node, length=length, mtime=now, ctime=now, truncations=node.truncations + 1,
                               append_end=0)


def _reported(node: Inode, length: int | None, truncations: int | None) -> Inode:
    """Applies a writer's report, unless it predates a truncation."""
    if length is None or (truncations is not None and truncations != node.truncations):
        return node
    return grown(node, length)


def _measured(node: Inode, measured: Measured | None) -> Inode:
    if measured is None:
        return node
    if measured.truncations != node.truncations:
        raise StaleMeasurement(f"inode {node.inode_id} was truncated while storage measured its length")
    return grown(node, measured.length)


def report(txn: Transaction, inode_id: int, length: int, truncations: int | None) -> Inode:
    """A writer's report of its max write end (sync/fsync)."""
    node = get_inode(txn, inode_id)
    if node.is_dir:
        raise os_error(IsADirectoryError, errno.EISDIR, f"inode {inode_id}")
    new = _reported(node, length, truncations)
    if new is not node:
        put_inode(txn, new)
    return new


def end_session(txn: Transaction, inode_id: int, session_id: str, length: int | None, truncations: int | None,
                measured: Measured | None) -> Inode:
    """Closes a write session: applies the writer's report and storage's length; a removed file whose
    last session this was becomes garbage. ValueError for a session that is not open; StaleMeasurement
    (nothing changed) when `measured` predates a truncation."""
    node = get_inode(txn, inode_id)
    key = session_key(inode_id, session_id)
    if txn.get(key) is None:
        raise ValueError(f"session_id {session_id!r} is not an open write session of inode {inode_id}")
    txn.clear(key)
    new = _measured(_reported(node, length, truncations), measured)
    if new is not node:
        put_inode(txn, new)
    if new.nlink == 0 and not has_entries(txn, session_prefix(inode_id)):
        to_garbage(txn, new)
    return new


def apply_measured(txn: Transaction, node: Inode, measured: Measured) -> Inode:
    """Applies a storage length inside a transaction that read `node` (StaleMeasurement: predates a
    truncation)."""
    new = _measured(node, measured)
    if new is not node:
        put_inode(txn, new)
    return new


def reserve_append(txn: Transaction, inode_id: int, size: int) -> int:
    """Reserves [offset, offset + size) at the end of file `inode_id` for one append; returns offset."""
    node = get_inode(txn, inode_id)
    if node.is_dir:
        raise os_error(IsADirectoryError, errno.EISDIR, f"inode {inode_id}")
    offset = max(node.length, node.append_end)
    put_inode(txn, dataclasses.replace(node, append_end=offset + size))
    return offset
