"""What the FUSE server remembers between requests: where each node the kernel knows lives, and the open
file and directory handles.

The kernel names files by node id (3FS inode id + 1) and the 3FS client by path, so ``NodeTable`` keeps,
for every node the kernel holds a reference to (LOOKUP, CREATE, MKDIR, SYMLINK replies count one each;
FORGET gives them back), its parent node and name. A node's path is rebuilt from these on demand, so a
rename of a directory moves everything below it at once. A node whose name was removed or replaced is
*detached*: it has no path (its requests fail with ESTALE, except those that work on an open handle or
the inode id). All methods are thread-safe.

``Handles`` hands out the ``fh`` numbers of OPEN / CREATE / OPENDIR replies.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import threading
from typing import Any

from storage.threefs.fuse.protocol import ROOT_NODE_ID


def node_id_of(inode_id: int) -> int:
    return inode_id + 1


def inode_id_of(node_id: int) -> int:
    return node_id - 1


@dataclasses.dataclass
class Node:
    parent: int | None  # None: detached (the root has itself as its parent)
    name: str
    lookups: int = 0


class NodeTable:
    """Node id -> (parent node, name), with the kernel's lookup counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[int, Node] = {ROOT_NODE_ID: Node(ROOT_NODE_ID, "", 1)}
        self._by_name: dict[tuple[int, str], int] = {}

    def path(self, node_id: int) -> str:
        """The node's absolute 3FS path; OSError(ESTALE) for a node that is detached or unknown."""
        with self._lock:
            parts = []
            while node_id != ROOT_NODE_ID:
                node = self._nodes.get(node_id)
                if node is None or node.parent is None:
                    raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), f"node {node_id}")
                parts.append(node.name)
                node_id = node.parent
        return "/" + "/".join(reversed(parts))

    def child_path(self, parent: int, name: str) -> str:
        """The path of `name` in directory node `parent`."""
        if not name or "/" in name or name in (".", ".."):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), name)
        base = self.path(parent)
        return base + name if base == "/" else f"{base}/{name}"

    def remember(self, parent: int, name: str, node_id: int) -> None:
        """The kernel learnt `node_id` as `name` in `parent` (one more reference). Whatever node held that
        name before (replaced behind the kernel's back) is detached."""
        with self._lock:
            previous = self._by_name.get((parent, name))
            if previous is not None and previous != node_id:
                self._detach(previous)
            node = self._nodes.get(node_id)
            if node is None:
                node = self._nodes[node_id] = Node(parent, name)
            elif node.parent is not None and (node.parent, node.name) != (parent, name):
                self._by_name.pop((node.parent, node.name), None)  # moved by another client: follow it
            node.parent, node.name = parent, name
            node.lookups += 1
            self._by_name[(parent, name)] = node_id

    def forget(self, node_id: int, lookups: int) -> None:
        """The kernel dropped `lookups` references; the node is forgotten at zero (the root never)."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node_id == ROOT_NODE_ID:
                return
            node.lookups -= lookups
            if node.lookups <= 0:
                del self._nodes[node_id]
                if node.parent is not None and self._by_name.get((node.parent, node.name)) == node_id:
                    del self._by_name[(node.parent, node.name)]

    def removed(self, parent: int, name: str) -> None:
        """`name` was unlinked from `parent`: its node (if known) is detached."""
        with self._lock:
            node_id = self._by_name.get((parent, name))
            if node_id is not None:
                self._detach(node_id)

    def moved(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        """`name` in `parent` was renamed to `new_name` in `new_parent` (replacing what was there)."""
        with self._lock:
            replaced = self._by_name.get((new_parent, new_name))
            if replaced is not None:
                self._detach(replaced)
            node_id = self._by_name.pop((parent, name), None)
            if node_id is not None:
                node = self._nodes[node_id]
                node.parent, node.name = new_parent, new_name
                self._by_name[(new_parent, new_name)] = node_id

    def parent_of(self, node_id: int) -> int:
        """The parent node of a directory node (the root's is the root; a detached one's too)."""
        with self._lock:
            node = self._nodes.get(node_id)
            return node.parent if node is not None and node.parent is not None else ROOT_NODE_ID

    def known(self) -> int:
        """How many nodes the kernel holds references to (the root included)."""
        with self._lock:
            return len(self._nodes)

    def _detach(self, node_id: int) -> None:
        node = self._nodes[node_id]
        if node.parent is not None:
            self._by_name.pop((node.parent, node.name), None)
        node.parent = None


class Handles:
    """fh number -> an open file or directory listing (numbers are never reused while the server runs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, Any] = {}
        self._numbers = itertools.count(1)

    def add(self, handle: Any) -> int:
        with self._lock:
            fh = next(self._numbers)
            self._open[fh] = handle
            return fh

    def get(self, fh: int) -> Any:
        """The handle; OSError(EBADF) for an unknown number."""
        with self._lock:
            handle = self._open.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF), f"fh {fh}")
        return handle

    def pop(self, fh: int) -> Any:
        with self._lock:
            return self._open.pop(fh, None)

    def values(self) -> list[Any]:
        with self._lock:
            return list(self._open.values())
