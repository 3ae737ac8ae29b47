"""client: what applications use: `Client` (namespace + data path), files, USRBIO batches, fsspec, mounts.

Roles: `file_api.py` (the `FileClient` / `File` protocols both clients implement), `stream_file.py`
(read/write/seek over positional IO), `chunk_io.py` (byte ranges -> chunk requests on chains),
`file.py` (`ThreeFSFile`), `client.py` (`Client`), `garbage.py` (the background garbage collector that
the meta server and `EmbeddedCluster` run), `usrbio.py` (`IoVec`, `IoRing`), `mount.py`
(`MountClient` over a real 3FS FUSE mount), `fsspec_fs.py` (fsspec protocol `3fs`).
Contract: metadata is off the data path (a client computes chunk ids and chains from the layout).
"""
