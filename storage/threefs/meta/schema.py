"""The metadata schema: inodes, directory entries and file sessions as KV keys and values.

Modelled on 3FS's FoundationDB schema:

- inode: key `INOD` + inode id as 8 bytes little-endian (consecutive ids spread over the key space);
  value: type, permissions, times, and per type the file length and layout, the directory's parent and
  default layout for children, or the symlink target.
- directory entry: key `DENT` + parent inode id (8 bytes big-endian) + name in UTF-8, so the entries of
  one directory are one contiguous key range and listing a directory is one range scan; value: the
  child's inode id and type.
- file session: key `INOS` + inode key + session id, one per file opened for writing (read opens are
  not tracked). A removed file's chunks are deleted only after its last write session closes.

Bookkeeping keys of this implementation: `IDAL` holds the next inode id, `CHBI` + table id the next
chain-table base index for new layouts, and `GARB` + inode id (big-endian) a removed file whose chunks
storage still has to delete. Values are compact JSON. The root directory is inode 0, its own parent.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from storage.threefs.kv import prefix_end
from storage.threefs.meta.layout import Layout, LayoutPolicy

ROOT_INODE_ID = 0

INODE_PREFIX = b"INOD"
DENTRY_PREFIX = b"DENT"
SESSION_PREFIX = b"INOS"
INODE_ID_ALLOC_KEY = b"IDAL"
CHAIN_BASE_PREFIX = b"CHBI"
GARBAGE_PREFIX = b"GARB"
DETACHED_PREFIX = b"TRSH"   # roots of directory trees unlinked by remove_tree, still being purged


class InodeType(enum.Enum):
    """What an inode is."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _u64(value: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ValueError(f"{name} must be an unsigned 64-bit int, got {value!r}")
    return value


# -- keys ------------------------------------------------------------------------------------------------


def inode_key(inode_id: int) -> bytes:
    """`INOD` + inode id, 8 bytes little-endian."""
    return INODE_PREFIX + _u64(inode_id, "inode_id").to_bytes(8, "little")


def inode_id_of_key(key: bytes) -> int:
    return int.from_bytes(key[len(INODE_PREFIX):], "little")


def dentry_prefix(parent: int) -> bytes:
    """`DENT` + parent id, 8 bytes big-endian: the prefix of one directory's entries."""
    return DENTRY_PREFIX + _u64(parent, "parent").to_bytes(8, "big")


def dentry_key(parent: int, name: str) -> bytes:
    """`DENT` + parent id (big-endian) + name (UTF-8)."""
    return dentry_prefix(parent) + name.encode()


def session_prefix(inode_id: int) -> bytes:
    """`INOS` + inode key: the prefix of one file's write sessions."""
    return SESSION_PREFIX + inode_key(inode_id)


def session_key(inode_id: int, session_id: str) -> bytes:
    """`INOS` + inode key + session id."""
    return session_prefix(inode_id) + session_id.encode()


def chain_base_key(table_id: int) -> bytes:
    """`CHBI` + table id: the next base index into that chain table for a new file's layout."""
    return CHAIN_BASE_PREFIX + _u64(table_id, "table_id").to_bytes(8, "big")


def garbage_key(inode_id: int) -> bytes:
    """`GARB` + inode id (big-endian): a removed file awaiting chunk deletion."""
    return GARBAGE_PREFIX + _u64(inode_id, "inode_id").to_bytes(8, "big")


def detached_key(inode_id: int) -> bytes:
    """`TRSH` + inode id (big-endian): a directory tree unlinked from the namespace, not yet purged."""
    return DETACHED_PREFIX + _u64(inode_id, "inode_id").to_bytes(8, "big")


def id_of_suffix(key: bytes, prefix: bytes) -> int:
    """The big-endian id after `prefix` in a GARB/TRSH/CHBI key."""
    return int.from_bytes(key[len(prefix):], "big")


def encode_counter(value: int) -> bytes:
    return _u64(value, "counter").to_bytes(8, "big")


def decode_counter(value: bytes | None, default: int = 0) -> int:
    return default if value is None else int.from_bytes(value, "big")


# -- values ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inode:
    """One file, directory or symlink.

    Attributes:
      inode_id: unique, allocated from the `IDAL` counter (root = 0).
      type: file, directory or symlink.
      mode: permission bits.
      mtime, ctime, atime: seconds since the epoch.
      nlink: 1 for a linked file or symlink, 0 for a removed file awaiting its last close; 2 for directories.
      length: file length in bytes (symlinks: length of the target).
      layout: the file's chunk layout (files only).
      layout_policy: default layout for children (directories only).
      parent: the directory containing this directory (directories only; root's parent is itself).
      target: the symlink's target path (symlinks only).
      truncations: how many times the file was truncated or reopened with truncation (files only): a
        length report or storage length measured under an older count is stale (``meta/lengths.py``).
      append_end: the end of the appends reserved so far (files only; the next append goes to
        max(length, append_end)); reset by a truncation.
    """

    inode_id: int
    type: InodeType
    mode: int
    mtime: float
    ctime: float
    atime: float
    nlink: int = 1
    length: int = 0
    layout: Layout | None = None
    layout_policy: LayoutPolicy | None = None
    parent: int = ROOT_INODE_ID
    target: str | None = None
    truncations: int = 0
    append_end: int = 0

    @property
    def is_dir(self) -> bool:
        return self.type is InodeType.DIRECTORY

    @property
    def is_file(self) -> bool:
        return self.type is InodeType.FILE

    @property
    def is_symlink(self) -> bool:
        return self.type is InodeType.SYMLINK

    def to_bytes(self) -> bytes:
        d: dict[str, Any] = {
            "id": self.inode_id, "type": self.type.value, "mode": self.mode, "mtime": self.mtime,
            "ctime": self.ctime, "atime": self.atime, "nlink": self.nlink, "length": self.length,
        }
        if self.layout is not None:
            d["layout"] = self.layout.to_dict()
        if self.layout_policy is not None:
            d["policy"] = self.layout_policy.to_dict()
        if self.is_dir:
            d["parent"] = self.parent
        if self.target is not None:
            d["target"] = self.target
        if self.truncations:
            d["truncations"] = self.truncations  # new fields: written when set, absent in older records
        if self.append_end:
            d["append_end"] = self.append_end
        return _dumps(d)

    @classmethod
    def from_bytes(cls, data: bytes) -> Inode:
        d = json.loads(data)
        return cls(
            inode_id=d["id"], type=InodeType(d["type"]), mode=d["mode"], mtime=d["mtime"], ctime=d["ctime"],
            atime=d["atime"], nlink=d["nlink"], length=d["length"],
            layout=Layout.from_dict(d["layout"]) if "layout" in d else None,
            layout_policy=LayoutPolicy.from_dict(d["policy"]) if "policy" in d else None,
            parent=d.get("parent", ROOT_INODE_ID), target=d.get("target"),
            truncations=d.get("truncations", 0), append_end=d.get("append_end", 0),
        )


@dataclasses.dataclass(frozen=True)
class DirEntry:
    """One name in a directory: `parent`/`name` -> `inode_id` of type `type`."""

    parent: int
    name: str
    inode_id: int
    type: InodeType

    def value_bytes(self) -> bytes:
        return _dumps({"inode": self.inode_id, "type": self.type.value})

    @classmethod
    def from_kv(cls, key: bytes, value: bytes) -> DirEntry:
        """Decodes a `DENT` key and its value."""
        prefix_len = len(DENTRY_PREFIX) + 8
        d = json.loads(value)
        return cls(
            parent=int.from_bytes(key[len(DENTRY_PREFIX):prefix_len], "big"),
            name=key[prefix_len:].decode(), inode_id=d["inode"], type=InodeType(d["type"]),
        )


@dataclasses.dataclass(frozen=True)
class FileSession:
    """A write-mode open of a file: which client, when (seconds since the epoch)."""

    inode_id: int
    session_id: str
    client_id: str
    timestamp: float

    def to_bytes(self) -> bytes:
        return _dumps({"inode": self.inode_id, "session": self.session_id, "client": self.client_id,
                       "ts": self.timestamp})

    @classmethod
    def from_bytes(cls, data: bytes) -> FileSession:
        d = json.loads(data)
        return cls(d["inode"], d["session"], d["client"], d["ts"])


# -- invariants ------------------------------------------------------------------------------------------


def _scan(txn: Any, prefix: bytes) -> list[tuple[bytes, bytes]]:
    return txn.get_range(prefix, prefix_end(prefix))


def find_problems(txn: Any) -> list[str]:
    """Checks a whole stored namespace (one read transaction `txn`); returns the problems found: dentries
    to missing inodes or in non-directories, type or parent-field mismatches, files linked twice, linked
    files with nlink 0, inodes unreachable from the root that are neither garbage, nor awaiting their last
    write close, nor inside a tree remove_tree is purging; sessions and garbage that contradict inodes."""
    inodes = {inode_id_of_key(k): Inode.from_bytes(v) for k, v in _scan(txn, INODE_PREFIX)}
    dentries = [DirEntry.from_kv(k, v) for k, v in _scan(txn, DENTRY_PREFIX)]
    session_owners = {inode_id_of_key(k[len(SESSION_PREFIX):len(SESSION_PREFIX) + 12])
                      for k, _ in _scan(txn, SESSION_PREFIX)}
    garbage = {id_of_suffix(k, GARBAGE_PREFIX) for k, _ in _scan(txn, GARBAGE_PREFIX)}
    detached = {id_of_suffix(k, DETACHED_PREFIX) for k, _ in _scan(txn, DETACHED_PREFIX)}
    problems: list[str] = []
    root = inodes.get(ROOT_INODE_ID)
    if root is None or not root.is_dir or root.parent != ROOT_INODE_ID:
        problems.append(f"root inode {ROOT_INODE_ID} is missing, not a directory, or not its own parent")
    children: dict[int, list[int]] = {}
    link_count: dict[int, int] = {}
    for e in dentries:
        where = f"dentry {e.parent}/{e.name!r}"
        parent = inodes.get(e.parent)
        if parent is None or not parent.is_dir:
            problems.append(f"{where} is in a missing or non-directory inode {e.parent}")
        node = inodes.get(e.inode_id)
        if node is None:
            problems.append(f"{where} points to missing inode {e.inode_id}")
            continue
        if node.type is not e.type:
            problems.append(f"{where} says {e.type.value} but inode {e.inode_id} is a {node.type.value}")
        if node.is_dir and node.parent != e.parent:
            problems.append(f"{where}: directory inode {e.inode_id} has parent field {node.parent}")
        if node.is_file and node.nlink == 0:
            problems.append(f"{where}: linked file inode {e.inode_id} has nlink 0")
        if e.inode_id in detached:
            problems.append(f"{where} points to detached tree root {e.inode_id}")
        children.setdefault(e.parent, []).append(e.inode_id)
        link_count[e.inode_id] = link_count.get(e.inode_id, 0) + 1
    problems += [f"inode {i} has {n} directory entries" for i, n in sorted(link_count.items()) if n > 1]
    reachable: set[int] = set()
    todo = [ROOT_INODE_ID, *sorted(detached)]
    while todo:
        i = todo.pop()
        if i not in reachable:
            reachable.add(i)
            todo += children.get(i, [])
    for i, node in sorted(inodes.items()):
        awaiting_close = node.is_file and node.nlink == 0 and i in session_owners
        if i not in reachable and not awaiting_close:
            problems.append(f"inode {i} ({node.type.value}) is unreachable from the root and not garbage")
    problems += [f"garbage inode {i} still has an inode record" for i in sorted(garbage & inodes.keys())]
    problems += [f"sessions of missing inode {i}" for i in sorted(session_owners - inodes.keys())]
    problems += [f"detached tree root {i} is missing" for i in sorted(detached - inodes.keys())]
    return problems
