"""Write-session leases: the sessions of clients that died are ended by the meta service.

A write-mode open holds a file session (``meta_schema.FileSession``), and a removed file keeps its chunks
until its last session ends. A client that dies without closing would keep them forever, so, as in 3FS,
sessions are leases: a live client renews the timestamps of its sessions (``renew_sessions``) more often
than the lease length, and the cluster periodically ends sessions whose lease ran out
(``prune_sessions``), making removed files garbage as a close would. A client whose session was pruned
(paused longer than the lease) can still report its length with ``sync``.

These are the transaction bodies; ``MetaService.renew_sessions`` / ``prune_sessions`` run them.
"""

from __future__ import annotations

import dataclasses
import time

from storage.threefs.kv.store import Transaction, prefix_end
from storage.threefs.meta.paths import get_inode
from storage.threefs.meta.remove import has_entries, to_garbage
from storage.threefs.meta.schema import SESSION_PREFIX, FileSession, inode_key, session_key, session_prefix


def renew(txn: Transaction, client_id: str) -> int:
    """Renews every write session of `client_id`; returns how many it holds."""
    now, renewed = time.time(), 0
    for key, value in txn.get_range(SESSION_PREFIX, prefix_end(SESSION_PREFIX)):
        session = FileSession.from_bytes(value)
        if session.client_id == client_id:
            txn.set(key, dataclasses.replace(session, timestamp=now).to_bytes())
            renewed += 1
    return renewed


def prune(txn: Transaction, lease_seconds: float) -> list[FileSession]:
    """Ends the sessions not renewed for `lease_seconds` (removed files whose last session that was become
    garbage); returns them."""
    expired_before = time.time() - lease_seconds
    expired = [FileSession.from_bytes(value) for _, value in txn.get_range(SESSION_PREFIX, prefix_end(SESSION_PREFIX))]
    expired = [s for s in expired if s.timestamp < expired_before]
    for session in expired:
        txn.clear(session_key(session.inode_id, session.session_id))
    for inode_id in {s.inode_id for s in expired}:
        if txn.get(inode_key(inode_id)) is None:
            continue
        node = get_inode(txn, inode_id)
        if node.nlink == 0 and not has_entries(txn, session_prefix(inode_id)):
            to_garbage(txn, node)
    return expired
