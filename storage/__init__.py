"""jaxseek.storage: a Python 3FS and the adapters that put checkpoints, tables and samples on it.

``threefs``: a compact Python 3FS (metadata on a transactional KV store, CRAQ-replicated chunk storage on
chains of targets, a manager for routing and target states, a client with USRBIO-style batched IO, an
fsspec filesystem, and a backend for a real 3FS FUSE mount). Planned: ``checkpoint`` (Orbax),
``dataframe`` (a smallpond-style lazy DataFrame on polars), ``loader`` (a Grain data source) and
``kvcache`` (MLA KV-cache blocks by prefix hash).

This is the ``storage`` package of jaxseek (``import storage`` resolves here after
``pip install jaxseek``), not an unrelated PyPI project of the same name.
"""
