"""The default training data: the Python standard library's own source, as byte-level tokens.

Every machine with Python has it, so training needs no network. Files are read in sorted path order;
a stable hash of each file's relative path puts about 1 in 20 files in the held-out split. The
streams are cut into non-overlapping windows of ``seq_len + 1 + mtp_depth`` bytes (inputs, the
next-token target and the MTP look-ahead). Training batch ``i`` is a pure function of (seed, i), so a
resumed run sees exactly the batches an uninterrupted run would.

Two holders of the windows, with the same batches for the same (stream, window, batch_size, seed):
``SequenceBatches`` keeps them in memory; ``StoredBatches`` keeps them as a record set on storage
(``storage.loader``: shard files on 3FS or a directory, read in batches with checksums), written once
per stream and window and read back by every later run and process.
"""

from __future__ import annotations

import pathlib
import sysconfig
import zlib
import hashlib
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from storage.loader import RecordSource
    from storage.location import Location

HELD_OUT_EVERY = 20  # ~5% of the files are validation data
FILE_SEPARATOR = b"\n\n"


class ByteCorpus(NamedTuple):
    train: np.ndarray  # [train_bytes] uint8
    valid: np.ndarray  # [valid_bytes] uint8
    num_files: int
    root: str


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


class CorpusFile(NamedTuple):
    """One file of a byte corpus: ``relative`` (posix, to the root) decides its split (``held_out``)."""

    path: pathlib.Path
    relative: str
    size: int


def held_out(relative: str) -> bool:
    """Whether the file at ``relative`` (posix path under the corpus root) is validation data."""
    return zlib.crc32(relative.encode()) % HELD_OUT_EVERY == 0


def corpus_files(root: pathlib.Path | None = None, max_bytes: int | None = None,
                 pattern: str = "*.py") -> tuple[list[CorpusFile], int]:
    """(the files ``load_stdlib_corpus`` reads, in its order, the number of matching files).

    Files matching ``pattern`` under ``root`` (default: the standard library), site-packages
    excluded, in sorted path order; with ``max_bytes`` the list stops at the first file that brings
    the total (each file's size plus ``FILE_SEPARATOR``) to ``max_bytes`` or more.
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    files = sorted(p for p in root.rglob(pattern) if "site-packages" not in p.parts and p.is_file())
    if not files:
        raise ValueError(f"root: no {pattern} files under {root}")
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        chosen.append(CorpusFile(path, path.relative_to(root).as_posix(), size))
        total += size + len(FILE_SEPARATOR)
        if max_bytes is not None and total >= max_bytes:
            break
    return chosen, len(files)


def load_stdlib_corpus(root: pathlib.Path | None = None, max_bytes: int | None = None) -> ByteCorpus:
    """Reads every ``*.py`` file under the standard library (site-packages excluded).

    Args:
      root: directory to read instead of the standard library.
      max_bytes: stop after this many bytes in total (None reads everything, ~30 MB on CPython 3.11).
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    files, num_files = corpus_files(root, max_bytes)
    train, valid = [], []
    for file in files:
        (valid if held_out(file.relative) else train).append(file.path.read_bytes() + FILE_SEPARATOR)
    as_array = lambda chunks: np.frombuffer(b"".join(chunks), dtype=np.uint8)  # noqa: E731
    return ByteCorpus(as_array(train), as_array(valid), num_files, str(root))


def unigram_entropy(tokens: np.ndarray, vocab_size: int = 256) -> float:
    """Entropy in nats of the byte histogram: the loss of the best model that ignores context."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class WindowOrder:
    """Which windows make batch ``i``: epoch e walks the permutation drawn from (seed, e).

    Args:
      num_windows: windows in the stream (>= batch_size).
      batch_size: windows per batch.
      seed: the shuffle seed.
    """

    def __init__(self, num_windows: int, batch_size: int, seed: int):
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """[num_windows] int64, the order of epoch ``epoch`` (the latest one is cached)."""
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)}
        return self._permutations[epoch]

    def rows(self, index: int) -> np.ndarray:
        """[batch_size] int64, the windows of batch ``index``."""
        samples = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        epochs, offsets = np.divmod(samples, self.num_windows)
        return np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


def _count_windows(stream: np.ndarray, batch_size: int, window: int) -> int:
    num_windows = len(stream) // window
    if num_windows < batch_size:
        raise ValueError(f"stream: {len(stream)} tokens hold {num_windows} windows of {window}, "
                         f"fewer than batch_size={batch_size}")
    return num_windows


class SequenceBatches:
    """Deterministic batches of fixed-length windows over one byte stream, in memory.

    Args:
      stream: [n] uint8 tokens.
      batch_size: sequences per batch.
      window: tokens per sequence (seq_len + 1 + mtp_depth).
      seed: the shuffle seed; epoch e uses the permutation drawn from (seed, e).
    """

    def __init__(self, stream: np.ndarray, *, batch_size: int, window: int, seed: int):
        self.num_windows = _count_windows(stream, batch_size, window)
        self.windows = stream[: self.num_windows * window].reshape(self.num_windows, window)
        self.batch_size, self.seed = batch_size, seed
        self.order = WindowOrder(self.num_windows, batch_size, seed)

    def _permutation(self, epoch: int) -> np.ndarray:
        return self.order.permutation(epoch)

    def batch(self, index: int) -> np.ndarray:
        """[batch_size, window] int32, the ``index``-th batch of the shuffled stream."""
        return self.windows[self.order.rows(index)].astype(np.int32)

    def first(self, count: int) -> list[np.ndarray]:
        """The first ``count`` batches in stream order (no shuffle): fixed validation batches."""
        count = min(count, self.num_windows // self.batch_size)
        return [self.windows[i * self.batch_size:(i + 1) * self.batch_size].astype(np.int32) for i in range(count)]


def windows_fingerprint(stream: np.ndarray, window: int) -> str:
    """sha256 hex of the window length and the stream's bytes: the key of its record set on storage."""
    digest = hashlib.sha256(f"jaxseek.windows:{window}:".encode())
    digest.update(np.ascontiguousarray(stream, dtype=np.uint8).data)
    return digest.hexdigest()


def _token_stream(stream: np.ndarray) -> np.ndarray:
    stream = np.asarray(stream)
    if stream.ndim != 1 or stream.dtype != np.uint8:
        raise TypeError(f"stream: expected [n] uint8 tokens, got {stream.dtype}{list(stream.shape)}")
    return stream


def windows_name(window: int, fingerprint: str) -> str:
    """The record set name of a stream's windows: ``windows-<window>-<fingerprint[:16]>``."""
    return f"windows-{window}-{fingerprint[:16]}"


def write_windows(location: "Location", stream: np.ndarray, window: int) -> tuple[str, str]:
    """(name, fingerprint) of the record set of ``stream``'s whole windows at ``location``, written
    unless it exists (concurrent writers: one publication wins): the set ``StoredBatches.prepare`` opens.

    The records are ``stream[: n * window]`` as ``[n, window]`` uint8 windows in ~64 MiB shards, with
    metadata ``{"window", "windows_fingerprint"}`` (fingerprint: ``windows_fingerprint``).
    """
    from storage.loader import write_records  # storage imports grain/pyarrow: only when used

    stream = _token_stream(stream)
    num_windows = len(stream) // window
    if num_windows == 0:
        raise ValueError(f"stream: {len(stream)} tokens hold no window of {window}")
    fingerprint = windows_fingerprint(stream[: num_windows * window], window)
    name = windows_name(window, fingerprint)
    location.client.makedirs(location.path, exist_ok=True)
    if not location.client.exists(location.join(name)):
        try:
            write_records(location, name, stream[: num_windows * window].reshape(num_windows, window),
                          records_per_shard=max(1, StoredBatches.RECORDS_PER_SHARD_BYTES // window),
                          metadata={"window": window, "windows_fingerprint": fingerprint})
        except FileExistsError:
            pass  # another process published the same windows first
    return name, fingerprint


class StoredBatches:
    """The batches of ``SequenceBatches`` (the same arrays for the same arguments), read from a record set
    of windows on storage. Build it with ``prepare``; ``close()`` closes the shard files.

    Attributes: source (the ``storage.loader.RecordSource``), num_windows, batch_size, seed, order.
    """

    RECORDS_PER_SHARD_BYTES = 64 << 20  # shard files of about 64 MiB

    def __init__(self, source: "RecordSource", *, batch_size: int, seed: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.num_windows = len(source)
        if self.num_windows < batch_size:
            raise ValueError(f"source: {self.num_windows} windows, fewer than batch_size={batch_size}")
        self.order = WindowOrder(self.num_windows, batch_size, seed)

    @classmethod
    def prepare(cls, location: "Location", stream: np.ndarray, *, batch_size: int, window: int,
                seed: int) -> "StoredBatches":
        """Batches of ``stream``'s windows kept at ``location`` (a ``storage.location.Location``).

        The windows are written the first time, as the record set ``windows-<window>-<fingerprint>``
        (fingerprint: ``windows_fingerprint(stream, window)``), so another corpus or window gets its
        own set and is never mixed in; later calls, in this or another process, open the existing set.
        Concurrent first calls are safe: one publication wins, the others open it.

        Args:
          location: the data directory (the trainer passes ``run_location.child("data")``).
          stream: [n] uint8 tokens.
          batch_size, window, seed: as for ``SequenceBatches``.
        """
        from storage.loader import RecordSource  # storage imports grain/pyarrow: only when used

        _count_windows(_token_stream(stream), batch_size, window)
        name, fingerprint = write_windows(location, stream, window)
        source = RecordSource(location, name)
        if source.index.metadata.get("windows_fingerprint") != fingerprint or source.index.record_len != window:
            source.close()
            raise ValueError(f"{location.url}/{name}: holds other windows than this stream's (fingerprint "
                             f"{source.index.metadata.get('windows_fingerprint')!r}, expected {fingerprint!r})")
        return cls(source, batch_size=batch_size, seed=seed)

    @classmethod
    def open(cls, location: "Location", name: str, *, batch_size: int, seed: int) -> "StoredBatches":
        """Batches over the existing record set ``location/name`` (e.g. written by ``jaxseek prepare-data``)."""
        from storage.loader import RecordSource

        return cls(RecordSource(location, name), batch_size=batch_size, seed=seed)

    def batch(self, index: int) -> np.ndarray:
        """[batch_size, window] int32, the ``index``-th batch (one batched read)."""
        return self.source.read_many(self.order.rows(index)).astype(np.int32)

    def first(self, count: int) -> list[np.ndarray]:
        """The first ``count`` batches in stream order (no shuffle): fixed validation batches."""
        count = min(count, self.num_windows // self.batch_size)
        rows = self.source.read_many(np.arange(count * self.batch_size)).astype(np.int32)
        return [rows[i * self.batch_size:(i + 1) * self.batch_size] for i in range(count)]

    def close(self) -> None:
        self.source.close()
