"""The meta service: the file-system namespace as transactions on a KV store.

3FS's meta service keeps no state of its own. Every operation (lookup, create, rename, ...) is one
serializable transaction over the inode, directory-entry and file-session keys of `meta_schema`; a
transaction that conflicts with a concurrent one is rerun by the KV store, so any number of
`MetaService` objects, in any number of processes, may share one store. Renames detect moves of a
directory into its own subtree by walking the destination's ancestors through the directory inodes'
parent field. Files opened for writing hold a file session; a removed file becomes garbage (its chunks
to be deleted by storage) only when its last write session closes. File lengths are reported by clients
(`sync`, `close`) and only ever grow that way; with a `storage_length`, closing or pruning a session also
takes the length storage holds, so a length is exact after close even for a writer that died (the rules,
truncations and append reservations: `lengths.py`).

This module holds `MetaService` and its operations; path normalisation and resolution (symlinks
included) are in `meta_paths`, and what removal does (dropping a file's last link, garbage, purging
trees that `remove_tree` detached, in batches of `PURGE_BATCH`) is in `meta_remove`.
"""

from __future__ import annotations

import dataclasses
import errno
import secrets
import time
import uuid
from typing import Callable

from storage.threefs.kv import KVStore, Transaction, prefix_end
from storage.threefs.meta.layout import Layout, LayoutPolicy
from storage.threefs.meta.paths import (
    MAX_NAME_BYTES, MAX_SYMLINK_FOLLOWS, check_not_within, get_inode, os_error, put_dentry, put_inode,
    resolve_existing, split_path, walk,
)
from storage.threefs.meta.remove import detach, drop_link, has_entries, purge_step
from storage.threefs.meta import lengths, sessions
from storage.threefs.meta.schema import (
    DETACHED_PREFIX, GARBAGE_PREFIX, INODE_ID_ALLOC_KEY, ROOT_INODE_ID, DirEntry, FileSession, Inode,
    InodeType, chain_base_key, decode_counter, dentry_key, dentry_prefix, encode_counter, find_problems,
    garbage_key, id_of_suffix, inode_key, session_key,
)
from storage.threefs.mgmtd.routing import ChainTable

__all__ = ["MAX_NAME_BYTES", "MAX_SYMLINK_FOLLOWS", "PURGE_BATCH", "MetaService", "split_path"]

PURGE_BATCH = 256             # KV operations per remove_tree transaction
MEASURE_ATTEMPTS = 3          # storage lengths a close measures while truncates keep outdating them


def _check_length(length: object, name: str = "length") -> int:
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"{name} must be an int >= 0, got {length!r}")
    return length


def _check_client(client_id: object) -> None:
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id must be a non-empty str, got {client_id!r}")


def _set_length(node: Inode, length: int, name: str, txn: Transaction) -> Inode:
    if node.is_dir:
        raise os_error(IsADirectoryError, errno.EISDIR, name)
    node = lengths.truncated(node, length)
    put_inode(txn, node)
    return node


def _remove_entry(txn: Transaction, path: str, directory: bool | None) -> None:
    """Removes the entry at `path` (a last symlink itself): a file or symlink when `directory` is False or
    None, an empty directory when it is True or None; the POSIX error otherwise."""
    res = resolve_existing(txn, path, follow_last=False)
    if res.inode.is_dir:
        if directory is False:
            raise os_error(IsADirectoryError, errno.EISDIR, path)
        if res.name is None:
            raise os_error(OSError, errno.EBUSY, path)
        if has_entries(txn, dentry_prefix(res.inode.inode_id)):
            raise os_error(OSError, errno.ENOTEMPTY, path)
        txn.clear(dentry_key(res.parent_id, res.name))
        txn.clear(inode_key(res.inode.inode_id))
    elif directory:
        raise os_error(NotADirectoryError, errno.ENOTDIR, path)
    else:
        txn.clear(dentry_key(res.parent_id, res.name))
        drop_link(txn, res.inode)


class MetaService:
    """Namespace operations over a KVStore (see the module docstring and storage/threefs/README.md).

    Args:
      kv: the store; several MetaService objects may share it.
      chain_table: returns the current chain table (new files' layouts are chosen from it).
      default_layout: the root directory's layout policy when this call creates the root.
      default_chunk_size, default_stripe: an alternative way to give default_layout.
      storage_length: inode -> the file's exact length as storage holds it (``ChunkIO.file_length``),
        asked when a write session closes or is pruned (``lengths.py``); None: lengths come from the
        writers' reports only (meta-only use), and pruning needs no storage.
    """

    def __init__(self, kv: KVStore, chain_table: Callable[[], ChainTable], default_layout: LayoutPolicy | None = None,
                 *, default_chunk_size: int | None = None, default_stripe: int | None = None,
                 storage_length: Callable[[Inode], int] | None = None):
        if not callable(chain_table):
            raise TypeError(f"chain_table must be a callable returning a ChainTable, got {chain_table!r}")
        if default_layout is None:
            default_layout = LayoutPolicy(default_chunk_size or 1 << 20, default_stripe or 4)
        elif default_chunk_size is not None or default_stripe is not None:
            raise ValueError("give default_layout or default_chunk_size/default_stripe, not both")
        if not isinstance(default_layout, LayoutPolicy):
            raise TypeError(f"default_layout must be a LayoutPolicy, got {default_layout!r}")
        self.kv = kv
        self.default_layout = default_layout
        self._chain_table = chain_table
        self._storage_length = storage_length
        self.kv.transact(self._ensure_root)

    # -- helpers inside a transaction --------------------------------------------------------------------

    def _ensure_root(self, txn: Transaction) -> None:
        if txn.get(inode_key(ROOT_INODE_ID)) is None:
            now = time.time()
            root = Inode(ROOT_INODE_ID, InodeType.DIRECTORY, 0o755, now, now, now, nlink=2,
                         layout_policy=self.default_layout, parent=ROOT_INODE_ID)
            txn.set(inode_key(ROOT_INODE_ID), root.to_bytes())
            txn.set(INODE_ID_ALLOC_KEY, encode_counter(ROOT_INODE_ID + 1))

    @staticmethod
    def _alloc_id(txn: Transaction) -> int:
        next_id = decode_counter(txn.get(INODE_ID_ALLOC_KEY), ROOT_INODE_ID + 1)
        txn.set(INODE_ID_ALLOC_KEY, encode_counter(next_id + 1))
        return next_id

    def _new_dir(self, txn: Transaction, parent_id: int, name: str, policy: LayoutPolicy | None) -> Inode:
        parent = get_inode(txn, parent_id)
        now = time.time()
        inode = Inode(self._alloc_id(txn), InodeType.DIRECTORY, 0o755, now, now, now, nlink=2,
                      layout_policy=policy or parent.layout_policy or self.default_layout, parent=parent_id)
        put_inode(txn, inode)
        put_dentry(txn, parent_id, name, inode)
        return inode

    def _add_session(self, txn: Transaction, inode: Inode, session_id: str, client_id: str) -> None:
        session = FileSession(inode.inode_id, session_id, client_id, time.time())
        txn.set(session_key(inode.inode_id, session_id), session.to_bytes())

    # -- lookups ----------------------------------------------------------------------------------------

    def stat(self, path: str, follow_symlinks: bool = True) -> Inode:
        """The inode at `path` (a symlink's target's if follow_symlinks)."""
        return self.kv.transact(lambda txn: resolve_existing(txn, path, follow_symlinks).inode, read_only=True)

    def stat_inode(self, inode_id: int) -> Inode:
        """The inode with id `inode_id` (also a removed file that still has write sessions)."""
        return self.kv.transact(lambda txn: get_inode(txn, inode_id), read_only=True)

    def listdir(self, path: str) -> list[DirEntry]:
        """The entries of the directory at `path`, sorted by name (one range scan)."""

        def fn(txn: Transaction) -> list[DirEntry]:
            node = resolve_existing(txn, path).inode
            if not node.is_dir:
                raise os_error(NotADirectoryError, errno.ENOTDIR, path)
            prefix = dentry_prefix(node.inode_id)
            return [DirEntry.from_kv(k, v) for k, v in txn.get_range(prefix, prefix_end(prefix))]

        return self.kv.transact(fn, read_only=True)

    def readlink(self, path: str) -> str:
        """The target of the symlink at `path`; OSError(EINVAL) if it is not a symlink."""
        node = self.kv.transact(lambda txn: resolve_existing(txn, path, follow_last=False).inode, read_only=True)
        if not node.is_symlink:
            raise os_error(OSError, errno.EINVAL, path)
        return node.target

    # -- creating ---------------------------------------------------------------------------------------

    def mkdir(self, path: str, parents: bool = False, exist_ok: bool = False,
              layout: LayoutPolicy | None = None) -> Inode:
        """Makes a directory (and missing parents if `parents`); its layout policy is `layout` or the parent's."""
        comps = split_path(path)
        if layout is not None and not isinstance(layout, LayoutPolicy):
            raise TypeError(f"layout must be a LayoutPolicy or None, got {layout!r}")

        def fn(txn: Transaction) -> Inode:
            if parents:
                for k in range(1, len(comps)):
                    res = walk(txn, path, comps[:k], follow_last=True)
                    if res.inode is None:
                        self._new_dir(txn, res.parent_id, res.name, None)
                    elif not res.inode.is_dir:
                        raise os_error(NotADirectoryError, errno.ENOTDIR, path)
            res = walk(txn, path, comps, follow_last=False)
            if res.inode is None:
                return self._new_dir(txn, res.parent_id, res.name, layout)
            if exist_ok:
                node = res.inode
                if node.is_symlink:
                    node = walk(txn, path, comps, follow_last=True).inode
                if node is not None and node.is_dir:
                    return node
            raise os_error(FileExistsError, errno.EEXIST, path)

        return self.kv.transact(fn)

    def create(self, path: str, client_id: str, exclusive: bool = False, truncate: bool = True) -> tuple[Inode, str]:
        """Opens `path` for writing, creating it with a layout from the chain table if missing; records a
        file session. exclusive: FileExistsError if it exists. truncate: an existing file's length becomes 0."""
        comps = split_path(path)
        _check_client(client_id)
        table = self._chain_table()
        session_id = uuid.uuid4().hex

        def fn(txn: Transaction) -> tuple[Inode, str]:
            res = walk(txn, path, comps, follow_last=not exclusive)
            now = time.time()
            node = res.inode
            if node is not None:
                if exclusive:
                    raise os_error(FileExistsError, errno.EEXIST, path)
                if node.is_dir:
                    raise os_error(IsADirectoryError, errno.EISDIR, path)
                if truncate:  # even at length 0: unreported bytes on storage were dropped too
                    node = lengths.truncated(node, 0)
                    put_inode(txn, node)
            else:
                policy = get_inode(txn, res.parent_id).layout_policy or self.default_layout
                base_key = chain_base_key(table.table_id)
                base = decode_counter(txn.get(base_key)) % max(1, len(table.chain_ids))
                layout = Layout.choose(table, policy, base, secrets.randbits(32))
                txn.set(base_key, encode_counter((base + layout.stripe_size) % len(table.chain_ids)))
                node = Inode(self._alloc_id(txn), InodeType.FILE, 0o644, now, now, now, layout=layout)
                put_inode(txn, node)
                put_dentry(txn, res.parent_id, res.name, node)
            self._add_session(txn, node, session_id, client_id)
            return node, session_id

        return self.kv.transact(fn)

    def open(self, path: str, client_id: str, write: bool) -> tuple[Inode, str | None]:
        """Opens an existing file; a write open records a file session (read opens are not tracked)."""
        if write:
            _check_client(client_id)

        def fn(txn: Transaction) -> tuple[Inode, str | None]:
            node = resolve_existing(txn, path).inode
            if node.is_dir:
                raise os_error(IsADirectoryError, errno.EISDIR, path)
            if not write:
                return node, None
            session_id = uuid.uuid4().hex
            self._add_session(txn, node, session_id, client_id)
            return node, session_id

        return self.kv.transact(fn, read_only=not write)

    def symlink(self, target: str, path: str) -> Inode:
        """Makes a symlink at `path` pointing to `target` (not checked to exist)."""
        comps = split_path(path)
        if not isinstance(target, str) or not target or "\0" in target:
            raise ValueError(f"target must be a non-empty str without NUL bytes, got {target!r}")

        def fn(txn: Transaction) -> Inode:
            res = walk(txn, path, comps, follow_last=False)
            if res.inode is not None:
                raise os_error(FileExistsError, errno.EEXIST, path)
            now = time.time()
            node = Inode(self._alloc_id(txn), InodeType.SYMLINK, 0o777, now, now, now,
                         length=len(target.encode()), target=target)
            put_inode(txn, node)
            put_dentry(txn, res.parent_id, res.name, node)
            return node

        return self.kv.transact(fn)

    # -- lengths and sessions ---------------------------------------------------------------------------

    def close(self, inode_id: int, session_id: str, length: int | None, truncations: int | None = None) -> Inode:
        """Ends a write session; the file's length becomes max(stored, length, storage's length). `length`
        counts only if `truncations` (the count the writer's handle last saw; None: unchecked) is
        current. A removed file becomes garbage when its last session closes."""
        if length is not None:
            _check_length(length)
        for _ in range(MEASURE_ATTEMPTS):
            measured = self._measure(inode_id)
            try:
                return self.kv.transact(lambda txn: lengths.end_session(txn, inode_id, session_id, length,
                                                                        truncations, measured))
            except lengths.StaleMeasurement:
                continue  # truncated meanwhile: measure again
        return self.kv.transact(lambda txn: lengths.end_session(txn, inode_id, session_id, length, truncations, None))

    def _measure(self, inode_id: int) -> lengths.Measured | None:
        return lengths.measure(self.kv, self._storage_length, inode_id)

    def sync(self, inode_id: int, length: int, truncations: int | None = None) -> Inode:
        """Records a client's max write end: the file's length becomes max(stored, length), unless
        `truncations` (the count the writer's handle last saw; None: unchecked) is out of date."""
        _check_length(length)
        return self.kv.transact(lambda txn: lengths.report(txn, inode_id, length, truncations))

    def reserve_append(self, inode_id: int, size: int) -> int:
        """Reserves the next `size` bytes at the end of the file for one append (see ``lengths.py``);
        returns the offset to write them at."""
        _check_length(size, "size")
        return self.kv.transact(lambda txn: lengths.reserve_append(txn, inode_id, size))

    def truncate(self, path: str, length: int) -> Inode:
        """Sets the length of the file at `path` to exactly `length`."""
        _check_length(length)
        return self.kv.transact(lambda txn: _set_length(resolve_existing(txn, path).inode, length, path, txn))

    def truncate_inode(self, inode_id: int, length: int) -> Inode:
        """Sets an open file's length to exactly `length` (ftruncate: wherever the file was renamed)."""
        _check_length(length)
        return self.kv.transact(lambda txn: _set_length(get_inode(txn, inode_id), length, f"inode {inode_id}", txn))

    def renew_sessions(self, client_id: str) -> int:
        """Renews every write session of `client_id` (its lease); returns how many it holds."""
        _check_client(client_id)
        return self.kv.transact(lambda txn: sessions.renew(txn, client_id))

    def prune_sessions(self, lease_seconds: float) -> list[FileSession]:
        """Ends the sessions not renewed for `lease_seconds` (their clients died); returns them. With a
        storage_length, each such file's length becomes max(stored, storage's) first; a file storage
        does not answer for keeps its expired sessions until it does."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        if self._storage_length is None:
            return self.kv.transact(lambda txn: sessions.prune(txn, lease_seconds))
        expired = self.kv.transact(lambda txn: sessions.expired(txn, lease_seconds), read_only=True)
        measured = {i: m for i in sorted({s.inode_id for s in expired}) if (m := self._measure(i)) is not None}
        return self.kv.transact(lambda txn: sessions.prune(txn, lease_seconds, measured))

    # -- renaming and removing --------------------------------------------------------------------------

    def rename(self, src: str, dst: str, replace: bool = True) -> None:
        """Moves `src` to `dst` atomically, replacing a file or an empty directory at `dst` (POSIX rename);
        with replace=False an existing `dst` raises FileExistsError instead (renameat2's RENAME_NOREPLACE)."""
        src_comps, dst_comps = split_path(src, "src"), split_path(dst, "dst")

        def fn(txn: Transaction) -> None:
            s = walk(txn, src, src_comps, follow_last=False)
            if s.inode is None:
                raise os_error(FileNotFoundError, errno.ENOENT, src)
            if s.name is None:
                raise os_error(OSError, errno.EBUSY, src)
            d = walk(txn, dst, dst_comps, follow_last=False)
            if d.name is None:
                raise os_error(OSError, errno.EBUSY, dst)
            if (d.parent_id, d.name) == (s.parent_id, s.name):
                return
            node = s.inode
            if node.is_dir:
                check_not_within(txn, d.parent_id, node.inode_id, dst)
            old = d.inode
            if old is not None and not replace:
                raise os_error(FileExistsError, errno.EEXIST, dst)
            if old is not None:
                if node.is_dir and not old.is_dir:
                    raise os_error(NotADirectoryError, errno.ENOTDIR, dst)
                if not node.is_dir and old.is_dir:
                    raise os_error(IsADirectoryError, errno.EISDIR, dst)
                if old.is_dir:
                    if has_entries(txn, dentry_prefix(old.inode_id)):
                        raise os_error(OSError, errno.ENOTEMPTY, dst)
                    txn.clear(inode_key(old.inode_id))
                else:
                    drop_link(txn, old)
            txn.clear(dentry_key(s.parent_id, s.name))
            now = time.time()
            moved = dataclasses.replace(node, ctime=now, parent=d.parent_id if node.is_dir else node.parent)
            put_inode(txn, moved)
            put_dentry(txn, d.parent_id, d.name, moved)

        self.kv.transact(fn)

    def unlink(self, path: str) -> None:
        """Removes a file or symlink; a file's chunks become garbage once no write session is open."""
        self.kv.transact(lambda txn: _remove_entry(txn, path, directory=False))

    def rmdir(self, path: str) -> None:
        """Removes an empty directory."""
        self.kv.transact(lambda txn: _remove_entry(txn, path, directory=True))

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes whatever `path` names (not following a last symlink) in one transaction: a file or
        symlink (as `unlink`), an empty directory (as `rmdir`), or with `recursive` a whole tree (as
        `remove_tree`)."""
        def fn(txn: Transaction) -> int | None:
            if recursive and resolve_existing(txn, path, follow_last=False).inode.is_dir:
                return detach(txn, path)
            return _remove_entry(txn, path, directory=None)

        root_id = self.kv.transact(fn)
        if root_id is not None:
            self._purge(root_id)

    def remove_tree(self, path: str) -> None:
        """Removes `path` and everything under it. The tree leaves the namespace in one transaction (it is
        detached and recorded under `TRSH`); its contents are then purged in bounded transactions."""
        root_id = self.kv.transact(lambda txn: detach(txn, path))
        if root_id is not None:
            self._purge(root_id)

    def purge_detached(self) -> int:
        """Finishes purging trees that remove_tree detached but did not purge (say, the process died);
        returns how many."""
        end = prefix_end(DETACHED_PREFIX)
        roots = self.kv.transact(lambda txn: txn.get_range(DETACHED_PREFIX, end), read_only=True)
        for key, _ in roots:
            self._purge(id_of_suffix(key, DETACHED_PREFIX))
        return len(roots)

    def _purge(self, root_id: int) -> None:
        """Purges a detached tree, PURGE_BATCH removals per transaction (read at call time)."""
        while not self.kv.transact(lambda txn: purge_step(txn, root_id, PURGE_BATCH)):
            pass

    # -- garbage and invariants -------------------------------------------------------------------------

    def garbage(self, limit: int = 1024) -> list[Inode]:
        """Up to `limit` removed files whose chunks storage should delete. They stay listed until
        `release_garbage`, so a collector that dies half-way leaves them for the next one."""
        _check_length(limit, "limit")

        def fn(txn: Transaction) -> list[Inode]:
            items = txn.get_range(GARBAGE_PREFIX, prefix_end(GARBAGE_PREFIX), limit=limit)
            return [Inode.from_bytes(v) for _, v in items]

        return self.kv.transact(fn, read_only=True)

    def release_garbage(self, inode_ids: list[int]) -> None:
        """Forgets removed files whose chunks are deleted."""
        def fn(txn: Transaction) -> None:
            for inode_id in inode_ids:
                txn.clear(garbage_key(inode_id))

        self.kv.transact(fn)

    def check_consistency(self) -> list[str]:
        """Problems with the stored namespace (empty when consistent): dentries to missing inodes, directory
        parent fields that disagree with their dentry, unreachable inodes that are not garbage, ..."""
        return self.kv.transact(find_problems, read_only=True)
