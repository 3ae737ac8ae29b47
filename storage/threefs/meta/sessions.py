"""Write-session leases: the sessions of clients that died are ended by the meta service.

A write-mode open holds a file session (``meta_schema.FileSession``), and a removed file keeps its chunks
until its last session ends. A client that dies without closing would keep them forever, so, as in 3FS,
sessions are leases: a live client renews the timestamps of its sessions (``renew_sessions``) more often
than the lease length, and the cluster periodically ends sessions whose lease ran out
(``prune_sessions``), making removed files garbage as a close would. A client whose session was pruned
(paused longer than the lease) can still report its length with ``sync``. A pruned writer's length is
taken from storage (``lengths.py``), as a close would, so its acknowledged bytes stay in the file.

These are the transaction bodies; ``MetaService.renew_sessions`` / ``prune_sessions`` run them.
"""

from __future__ import annotations

import dataclasses
import time

from storage.threefs.kv.store import Transaction, prefix_end
from storage.threefs.meta.lengths import Measured, apply_measured
from storage.threefs.meta.remove import has_entries, to_garbage
from storage.threefs.meta.schema import SESSION_PREFIX, FileSession, Inode, inode_key, session_key, session_prefix


def renew(txn: Transaction, client_id: str) -> int:
    """Renews every write session of `client_id`; returns how many it holds."""
    now, renewed = time.time(), 0
    for key, value in txn.get_range(SESSION_PREFIX, prefix_end(SESSION_PREFIX)):
        session = FileSession.from_bytes(value)
        if session.client_id == client_id:
            txn.set(key, dataclasses.replace(session, timestamp=now).to_bytes())
            renewed += 1
    return renewed


def expired(txn: Transaction, lease_seconds: float) -> list[FileSession]:
    """The sessions not renewed for `lease_seconds`."""
    expired_before = time.time() - lease_seconds
    found = [FileSession.from_bytes(value) for _, value in txn.get_range(SESSION_PREFIX, prefix_end(SESSION_PREFIX))]
    return [s for s in found if s.timestamp < expired_before]


def prune(txn: Transaction, lease_seconds: float, measured: dict[int, Measured] | None = None) -> list[FileSession]:
    """Ends the sessions not renewed for `lease_seconds` (removed files whose last session that was become
    garbage); returns them. With `measured` (inode id -> its storage length, see ``lengths.py``), a linked
    file's length becomes max(stored, storage) as its dead writers' sessions end; the sessions of a linked
    file without a current measurement (none taken, storage did not answer, or truncated since) are kept
    for the next round, so a dead writer's acknowledged bytes are never dropped from the length."""
    pruned: list[FileSession] = []
    by_inode: dict[int, list[FileSession]] = {}
    for session in expired(txn, lease_seconds):
        by_inode.setdefault(session.inode_id, []).append(session)
    for inode_id, ended in by_inode.items():
        data = txn.get(inode_key(inode_id))
        node = None if data is None else Inode.from_bytes(data)
        if measured is not None and node is not None and node.nlink > 0:
            measurement = measured.get(inode_id)
            if measurement is None or measurement.truncations != node.truncations:
                continue
            node = apply_measured(txn, node, measurement)
        for session in ended:
            txn.clear(session_key(session.inode_id, session.session_id))
        pruned += ended
        if node is not None and node.nlink == 0 and not has_entries(txn, session_prefix(inode_id)):
            to_garbage(txn, node)
    return pruned
