"""jaxseek.storage: a Python 3FS and the adapters that put checkpoints, tables and samples on it.

``threefs``: a compact Python 3FS (metadata on a transactional KV store, CRAQ-replicated chunk storage on
chains of targets, a manager for routing and target states, a client with USRBIO-style batched IO, an
fsspec filesystem, a FUSE mount, and a backend for a real 3FS FUSE mount). On top of it, for any storage
URL (``location``): ``checkpoint`` (Orbax on the 3FS client), ``tables`` (polars parquet with pushdown),
``loader`` (training records as a Grain data source), ``kvcache`` (MLA KV-cache blocks by hash chain), and
``publish`` (atomic publication), ``dataframe`` (a smallpond-style lazy DataFrame on polars) and
``graysort`` (gensort/valsort-exact records for the sort benchmark).

This is the ``storage`` package of jaxseek (``import storage`` resolves here after
``pip install jaxseek``), not an unrelated PyPI project of the same name.
"""
