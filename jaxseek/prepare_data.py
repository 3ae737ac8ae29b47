"""``jaxseek prepare-data``: training text -> byte tokens -> fixed windows -> the loader's record sets.

    jaxseek prepare-data --source stdlib --out 3fs+embedded:///runs/tiny/3fs/data
    jaxseek prepare-data --source ~/corpus --glob '*.txt' --out /data/prepared --window 257
    jaxseek prepare-data --source docs.parquet --out 3fs+tcp:///cluster/data      # a `text` column

Sources: ``stdlib`` (the standard library's ``*.py`` files, as ``jaxseek.data.load_stdlib_corpus``
reads them), a directory (the files matching ``--glob``, default ``*.py``, in the same order and with
the same train/validation split by path), or parquet (any ``storage.location`` URL, a file or a
directory of files, one document per row of a ``text`` column; a row is validation data when
``jaxseek.data.held_out`` holds for its ``id`` column, or for its text when there is no ``id``).

The documents are read and tokenized (UTF-8 bytes, each followed by ``FILE_SEPARATOR``) as a
``storage.dataframe`` job, one task per group of files / per parquet file, on local processes by
default. Each split's documents are concatenated in order and cut into windows of ``--window`` tokens,
written with ``jaxseek.data.write_windows``: the very record sets (names, shards, checksums) that
``StoredBatches.prepare`` writes for the same stream and window, so training reads them unchanged.
A manifest ``prepared-w<window>-<source hash>.json`` beside them names both sets, with the token
counts and the train split's byte histogram; it is written last (atomically), so its presence means
the data is prepared. ``ensure_prepared`` is what a trainer calls: it reads the manifest, or runs the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from jaxseek.data import FILE_SEPARATOR, corpus_files, held_out, stdlib_root, write_windows

if TYPE_CHECKING:
    import polars as pl

    from storage.location import Location

MANIFEST_FORMAT = "jaxseek.prepared/1"
FILES_PER_TASK = 64


class SourceSpec(NamedTuple):
    """What to read. kind: "files" (a local directory and a glob) or "parquet" (a storage URL)."""

    kind: str
    where: str
    pattern: str | None = None
    max_bytes: int | None = None

    def key(self) -> str:
        """The identity of the source in manifest names: sha256 of its fields, 16 hex digits."""
        return hashlib.sha256(json.dumps(list(self)).encode()).hexdigest()[:16]


class PreparedData(NamedTuple):
    """A manifest: the record sets (``train``, ``valid``: names at the location) of one source and window."""

    source: SourceSpec
    window: int
    train: str
    valid: str
    train_tokens: int
    valid_tokens: int
    documents: int
    byte_counts: tuple[int, ...]  # [256] histogram of the train split's tokens
    manifest: str

    def unigram_entropy(self) -> float:
        """``jaxseek.data.unigram_entropy`` of the train tokens, from the stored histogram."""
        counts = np.asarray(self.byte_counts, dtype=np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def parse_source(source: str, *, pattern: str | None = None, max_bytes: int | None = None) -> SourceSpec:
    """``stdlib``, a directory, or a parquet file / directory / URL -> a ``SourceSpec``; errors name the source."""
    if source == "stdlib":
        return SourceSpec("files", str(stdlib_root()), pattern or "*.py", max_bytes)
    if "://" in source or source.endswith(".parquet"):
        if pattern is not None or max_bytes is not None:
            raise ValueError(f"source: --glob and --max-bytes apply to stdlib or a directory, not {source!r}")
        return SourceSpec("parquet", source)
    path = pathlib.Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(f"source: {source!r} is not 'stdlib', a directory or a .parquet file / URL"
                         + ("" if path.exists() else " (it does not exist)"))
    return SourceSpec("files", str(path.absolute()), pattern or "*.py", max_bytes)


def manifest_name(spec: SourceSpec, window: int) -> str:
    return f"prepared-w{window}-{spec.key()}.json"


# ---- per-partition steps (plain polars functions, run inside the DataFrame's tasks) ----

def read_files(frame: "pl.DataFrame") -> "pl.DataFrame":
    """Rows (order, path, relative) -> (order, valid, tokens): each file's bytes plus FILE_SEPARATOR;
    ``valid`` by ``held_out(relative)``."""
    import polars as pl

    tokens = [pathlib.Path(p).read_bytes() + FILE_SEPARATOR for p in frame["path"].to_list()]
    return pl.DataFrame({"order": frame["order"], "valid": [held_out(r) for r in frame["relative"].to_list()],
                         "tokens": pl.Series(tokens, dtype=pl.Binary)})


def tokenize_texts(frame: "pl.DataFrame") -> "pl.DataFrame":
    """Rows with ``text`` (and optionally ``id``) -> (valid, tokens): the UTF-8 bytes plus FILE_SEPARATOR."""
    import polars as pl

    if frame.schema["text"] not in (pl.String, pl.Utf8):
        raise TypeError(f"text: expected a string column, got {frame.schema['text']}")
    if frame["text"].null_count():
        raise ValueError(f"text: {frame['text'].null_count()} null values; every row must hold a document")
    keys = frame["id"].cast(pl.String).to_list() if "id" in frame.columns else frame["text"].to_list()
    separator = FILE_SEPARATOR.decode()
    if None in keys:
        raise ValueError("id: null values; every row needs an id (or drop the column to split by text)")
    return pl.DataFrame({"valid": [held_out(k) for k in keys], "tokens": (frame["text"] + separator).cast(pl.Binary)})


def concat_tokens(tokens: "pl.Series") -> np.ndarray:
    """[n] uint8: the binary values of ``tokens`` concatenated in order."""
    import pyarrow as pa

    array = tokens.to_arrow()
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = array.cast(pa.large_binary())
    if len(array) == 0:
        return np.empty(0, np.uint8)
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset:array.offset + len(array) + 1]
    return np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].copy()


# ---- the DataFrame job ----

def _check_parquet_source(url: str) -> None:
    """A readable ``text`` column of strings, before any task runs (errors name the file and column)."""
    from storage import tables

    schema = tables.scan_parquet(url).collect_schema()
    if "text" not in schema:
        raise ValueError(f"{url}: no 'text' column (columns: {list(schema)})")
    if str(schema["text"]) not in ("String", "Utf8"):
        raise TypeError(f"{url}: column 'text' is {schema['text']}, expected strings")


def tokenize_documents(session, spec: SourceSpec) -> tuple["pl.DataFrame", int]:
    """(rows (valid, tokens) in stream order, documents read) for ``spec`` on a ``storage.dataframe`` session."""
    import polars as pl

    if spec.kind == "parquet":
        _check_parquet_source(spec.where)
        frame = session.read_parquet(spec.where).map_batches(tokenize_texts)
        rows = frame.to_polars()
        return rows, len(rows)
    files, _ = corpus_files(pathlib.Path(spec.where), spec.max_bytes, spec.pattern)
    items = [{"order": i, "path": str(f.path), "relative": f.relative} for i, f in enumerate(files)]
    tasks = max(1, min(len(items) // FILES_PER_TASK, 4 * (os.cpu_count() or 1)))  # ~64 files a task
    rows = session.from_items(items, npartitions=tasks).map_batches(read_files).to_polars().sort("order")
    return rows.select(pl.col("valid"), pl.col("tokens")), len(rows)


def _write_manifest(location: "Location", prepared: PreparedData) -> None:
    payload = {"format": MANIFEST_FORMAT, **prepared._asdict(), "source": prepared.source._asdict()}
    temporary = location.join(f".{prepared.manifest}.tmp-{uuid.uuid4().hex[:12]}")
    with location.client.open(temporary, "wb") as file:
        file.write(json.dumps(payload, indent=1).encode())
        file.fsync()
    location.client.rename(temporary, location.join(prepared.manifest))


def find_prepared(location: "Location", spec: SourceSpec, window: int) -> PreparedData | None:
    """The manifest of ``spec`` and ``window`` at ``location``, or None where it is not prepared yet."""
    name = manifest_name(spec, window)
    if not location.client.exists(location.join(name)):
        return None
    with location.client.open(location.join(name), "rb") as file:
        fields = json.loads(file.read())
    if fields.pop("format", None) != MANIFEST_FORMAT:
        raise ValueError(f"{location.url}/{name}: not a {MANIFEST_FORMAT} manifest")
    fields["source"] = SourceSpec(**fields["source"])
    fields["byte_counts"] = tuple(fields["byte_counts"])
    return PreparedData(**fields)


def prepare_data(location: "Location", spec: SourceSpec, *, window: int, executor: str = "process",
                 num_executors: int | None = None, work_dir: str | None = None, progress: bool = True) -> PreparedData:
    """Runs the job (see the module docstring) and writes the record sets and the manifest at ``location``.

    executor, num_executors: the ``storage.dataframe`` session's. work_dir: where the job's stages
    keep their files (default: a temporary local directory, removed afterwards). progress: a bar per stage.
    """
    import storage.dataframe as spd

    if window <= 1:
        raise ValueError(f"window={window}: expected at least 2 tokens (an input and its target)")
    scratch = work_dir or tempfile.mkdtemp(prefix="jaxseek-prepare-")
    session = spd.init(data_root=scratch, num_executors=num_executors, executor=executor, progress=progress)
    try:
        rows, documents = tokenize_documents(session, spec)
    finally:
        session.shutdown()
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    train = concat_tokens(rows.filter(~rows["valid"])["tokens"])
    valid = concat_tokens(rows.filter(rows["valid"])["tokens"])
    names = {}
    for split, stream in (("train", train), ("valid", valid)):
        if len(stream) < window:
            raise ValueError(f"source {spec.where}: the {split} split holds {len(stream)} tokens, fewer than one "
                             f"window of {window}")
        names[split] = write_windows(location, stream, window)[0]
    prepared = PreparedData(spec, window, names["train"], names["valid"], len(train), len(valid), documents,
                            tuple(int(c) for c in np.bincount(train, minlength=256)), manifest_name(spec, window))
    _write_manifest(location, prepared)
    return prepared


def ensure_prepared(location: "Location", source: str = "stdlib", *, window: int, max_bytes: int | None = None,
                    pattern: str | None = None, executor: str = "process",
                    num_executors: int | None = None, progress: bool = True) -> PreparedData:
    """The prepared data of ``source`` and ``window`` at ``location``: read from its manifest, or prepared
    now (``prepare_data``) when there is none. Concurrent callers are safe (each publication is atomic)."""
    spec = parse_source(source, pattern=pattern, max_bytes=max_bytes)
    location.client.makedirs(location.path, exist_ok=True)
    found = find_prepared(location, spec, window)
    if found is not None:
        return found
    return prepare_data(location, spec, window=window, executor=executor, num_executors=num_executors,
                        progress=progress)


# ---- the command ----

def register(subparsers) -> None:
    """Adds ``prepare-data`` to ``jaxseek``'s subcommands (``set_defaults(handler=run)``)."""
    from jaxseek.presets import PRESET_BUILDERS

    p = subparsers.add_parser("prepare-data", help="tokenize and pack training data into the loader's record "
                                                    "format on storage, with the DataFrame")
    p.add_argument("--source", default="stdlib", help="stdlib (default), a directory, or a parquet file / URL "
                                                      "with a 'text' column")
    p.add_argument("--out", required=True, metavar="URL",
                   help="where the record sets go: 3fs+embedded:///DIR, 3fs+tcp:///DIR, 3fs:///MOUNT/PATH "
                        "or a directory")
    p.add_argument("--window", type=int, help="tokens per record (default: the preset's seq_len + 1 + mtp_depth)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESET_BUILDERS), help="the preset whose window to use")
    p.add_argument("--glob", dest="pattern", help="files of a directory source to read (default *.py)")
    p.add_argument("--max-bytes", type=int, help="stop a directory source after this many bytes")
    p.add_argument("--executor", default="process", choices=("process", "inprocess", "ray"),
                   help="the DataFrame's executor (default: local processes)")
    p.add_argument("--workers", type=int, help="DataFrame executors (default: all cores)")
    p.set_defaults(handler=run)


def run(args, console) -> int:
    """The ``prepare-data`` handler: prepares (or finds prepared) data and prints what is where."""
    from rich.table import Table

    from jaxseek.presets import get_preset
    from storage.location import open_location

    window = args.window
    if window is None:
        mc, tc = get_preset(args.preset)
        window = tc.seq_len + 1 + mc.mtp_depth
    spec = parse_source(args.source, pattern=args.pattern, max_bytes=args.max_bytes)
    start = time.perf_counter()
    with open_location(args.out, create=True) as location:
        prepared = find_prepared(location, spec, window)
        reused = prepared is not None
        if prepared is None:
            prepared = prepare_data(location, spec, window=window, executor=args.executor,
                                    num_executors=args.workers)
    table = Table(title=f"prepare-data ({'already prepared' if reused else f'{time.perf_counter() - start:.1f} s'})")
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("source", f"{spec.kind}: {spec.where}" + (f" ({spec.pattern})" if spec.pattern else ""))
    table.add_row("documents", f"{prepared.documents:,}")
    table.add_row("window (tokens per record)", str(window))
    for split, tokens, name in (("train", prepared.train_tokens, prepared.train),
                                ("valid", prepared.valid_tokens, prepared.valid)):
        table.add_row(f"{split}: tokens / records", f"{tokens:,} / {tokens // window:,}")
        table.add_row(f"{split}: record set", f"{args.out.rstrip('/')}/{name}")
    table.add_row("manifest", f"{args.out.rstrip('/')}/{prepared.manifest}")
    console.print(table)
    return 0
