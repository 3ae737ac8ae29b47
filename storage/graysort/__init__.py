"""GraySort on this repository's storage: a gensort-compatible generator, a valsort-equivalent validator
and the sort as a ``storage.dataframe`` pipeline (``benchmarks/graysort.py`` runs it beside DuckDB).

``gensort``: 100-byte records, bit for bit gensort 1.5's binary records, as parquet partitions
(``key`` binary(10), ``record`` binary(100)). ``valsort``: order, count, duplicate keys and the sum of
the records' CRC32s, over partitions in order, as valsort -o / -s combine partition summaries.
``sort``: the per-partition functions and the DataFrame pipeline (read -> range repartition by key
prefix -> sort inside each partition -> write).
"""
