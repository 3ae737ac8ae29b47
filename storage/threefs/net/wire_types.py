"""The types 3FS's services pass to each other over RPC: the registry of the cluster's ``Codec``.

A value of any other type (beyond the codec's builtins) cannot be sent; an exception of another type
arrives as a ``RuntimeError`` naming it. Add a type here when a service method starts taking or
returning it.
"""

from __future__ import annotations

from storage.threefs import errors
from storage.threefs.meta.layout import Layout, LayoutPolicy
from storage.threefs.meta.schema import DirEntry, FileSession, Inode, InodeType
from storage.threefs.mgmtd.routing import Chain, ChainTable, LocalState, RoutingInfo, TargetState
from storage.threefs.net.codec import Codec
from storage.threefs.storage.chunk_id import ChunkId, ChunkMeta
from storage.threefs.storage.chunk_store import ChunkStoreFormatError, ChunkVersionMismatch, PendingVersionExists
from storage.threefs.storage.resync import ResyncReport


def threefs_codec() -> Codec:
    """A codec for the values 3FS's services exchange (routing, metadata, chunk ids, their errors)."""
    return Codec([
        TargetState, LocalState, Chain, ChainTable, RoutingInfo,  # mgmtd's routing
        Inode, InodeType, DirEntry, FileSession, Layout, LayoutPolicy,  # metadata
        ChunkId, ChunkMeta, ResyncReport,  # storage
        *_error_classes(),  # every error of errors.py: they cross service boundaries by design
        ChunkStoreFormatError, PendingVersionExists, ChunkVersionMismatch,  # raised by a storage target
    ])


def _error_classes() -> list[type[BaseException]]:
    return [value for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == errors.__name__]
