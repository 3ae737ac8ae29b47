"""meta: the file-system namespace, stateless, as transactions on the KV store (3FS's meta service).

Roles: `schema.py` (inode, directory-entry and file-session keys and values), `layout.py` (how a file's
chunks stripe over chains), `paths.py` (path resolution inside a transaction), `remove.py` (dropping
links, garbage, purging removed trees), `sessions.py` (write-session leases), `lengths.py` (file lengths
from writers' reports and from storage, truncation counts, append reservations), `service.py`
(`MetaService`: every namespace operation as one transaction). Contract: any number of `MetaService` objects, in any
number of processes, may share one KV store; errors are the POSIX `OSError` subclasses with the path.
"""

from storage.threefs.meta.layout import Layout, LayoutPolicy
from storage.threefs.meta.schema import DirEntry, FileSession, Inode, InodeType
from storage.threefs.meta.service import MetaService

__all__ = ["DirEntry", "FileSession", "Inode", "InodeType", "Layout", "LayoutPolicy", "MetaService"]
