"""Atomic publication of a directory on a ``FileClient``: build it under a hidden name, then rename it.

A table dataset or a set of record shards is many files; readers must see all of them or none. The
writer fills a *staging* directory beside the target (``.NAME.staging-<random>``: hidden, so dataset
discovery in polars/pyarrow and ``listdir`` users who skip dot-names ignore it) and publishes it with
one ``rename``: atomic on 3FS (one metadata transaction) and on POSIX. A crash before the rename leaves
only a hidden leftover (``remove_stale_staging`` deletes those), never a partial target.

Replacing an existing directory takes two renames (3FS, like POSIX, renames a directory only over an
empty one): the old one moves aside to a hidden name, the new one moves in, the old one is removed.
Between the two renames a reader finds no target (``FileNotFoundError``), never a mix of both.
"""

from __future__ import annotations

import contextlib
import errno
import posixpath
import uuid
from collections.abc import Iterator

from storage.threefs.client.file_api import FileClient

STAGING_MARK = ".staging-"
RETIRED_MARK = ".retired-"


def staging_path(target: str) -> str:
    """A fresh hidden sibling of ``target`` (client path) to build the new directory in."""
    directory, name = posixpath.split(target.rstrip("/"))
    return posixpath.join(directory, f".{name}{STAGING_MARK}{uuid.uuid4().hex[:16]}")


def publish_directory(client: FileClient, staging: str, target: str, *, replace: bool) -> None:
    """Moves the finished ``staging`` directory to ``target`` atomically.

    replace: an existing ``target`` (file or directory) is replaced; otherwise it is a
    ``FileExistsError`` naming ``target`` and the staging directory is removed.
    """
    try:
        rename_new(client, staging, target)
        return
    except FileExistsError:
        if not replace:
            client.remove(staging, recursive=True)
            raise FileExistsError(f"{target} already exists (pass replace=True to replace it)") from None
    directory, name = posixpath.split(target.rstrip("/"))
    retired = posixpath.join(directory, f".{name}{RETIRED_MARK}{uuid.uuid4().hex[:16]}")
    rename_new(client, target, retired)
    rename_new(client, staging, target)
    client.remove(retired, recursive=True)


def rename_new(client: FileClient, source: str, target: str) -> None:
    """Renames the directory ``source`` to ``target``, which must not exist (``FileExistsError``).

    3FS's rename has a no-replace mode (one transaction). Python has no ``renameat2``, so on a POSIX
    mount a directory is renamed with plain ``rename`` after a check: a target that appears in between is
    still never overwritten when it is a non-empty directory (the kernel refuses: ENOTEMPTY).
    """
    try:
        client.rename(source, target, replace=False)
        return
    except FileExistsError:
        raise FileExistsError(f"{target} already exists") from None
    except PermissionError:  # a MountClient links files for no-replace; directories cannot be linked
        if client.exists(target):
            raise FileExistsError(f"{target} already exists") from None
    try:
        client.rename(source, target, replace=True)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{target} already exists") from None
        raise


@contextlib.contextmanager
def staged_directory(client: FileClient, target: str, *, replace: bool) -> Iterator[str]:
    """``with staged_directory(client, '/t/ds', replace=False) as staging: ...write under staging...``

    The staging directory is created (with the target's parents) on entry and published over ``target``
    on a normal exit; an exception removes it and leaves ``target`` as it was. Refuses at once (before
    any writing) when ``target`` exists and ``replace`` is false.
    """
    if not replace and client.exists(target):
        raise FileExistsError(f"{target} already exists (pass replace=True to replace it)")
    staging = staging_path(target)
    client.makedirs(staging, exist_ok=False)
    try:
        yield staging
    except BaseException:
        with contextlib.suppress(OSError):
            client.remove(staging, recursive=True)
        raise
    publish_directory(client, staging, target, replace=replace)


def remove_stale_staging(client: FileClient, directory: str) -> list[str]:
    """Removes what crashed writers left in ``directory`` (hidden staging and retired directories);
    returns the removed client paths. Call it only when no writer is running there."""
    removed = []
    for name in client.listdir(directory):
        if name.startswith(".") and (STAGING_MARK in name or RETIRED_MARK in name):
            path = posixpath.join(directory, name)
            client.remove(path, recursive=True)
            removed.append(path)
    return removed
