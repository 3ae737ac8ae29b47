"""The default training data: the Python standard library's own source, as byte-level tokens.

Every machine with Python has it, so training needs no network. Files are read in sorted path order;
a stable hash of each file's relative path puts about 1 in 20 files in the held-out split. The
streams are cut into non-overlapping windows of ``seq_len + 1 + mtp_depth`` bytes (inputs, the
next-token target and the MTP look-ahead). Training batch ``i`` is a pure function of (seed, i), so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import pathlib
import sysconfig
import zlib
from typing import NamedTuple

import numpy as np

HELD_OUT_EVERY = 20  # ~5% of the files are validation data
FILE_SEPARATOR = b"\n\n"


class ByteCorpus(NamedTuple):
    train: np.ndarray  # [train_bytes] uint8
    valid: np.ndarray  # [valid_bytes] uint8
    num_files: int
    root: str


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def load_stdlib_corpus(root: pathlib.Path | None = None, max_bytes: int | None = None) -> ByteCorpus:
    """Reads every ``*.py`` file under the standard library (site-packages excluded).

    Args:
      root: directory to read instead of the standard library.
      max_bytes: stop after this many bytes in total (None reads everything, ~30 MB on CPython 3.11).
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise ValueError(f"root: no *.py files under {root}")
    train, valid, total = [], [], 0
    for path in files:
        data = path.read_bytes() + FILE_SEPARATOR
        relative = path.relative_to(root).as_posix().encode()
        (valid if zlib.crc32(relative) % HELD_OUT_EVERY == 0 else train).append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    as_array = lambda chunks: np.frombuffer(b"".join(chunks), dtype=np.uint8)  # noqa: E731
    return ByteCorpus(as_array(train), as_array(valid), len(files), str(root))


def unigram_entropy(tokens: np.ndarray, vocab_size: int = 256) -> float:
    """Entropy in nats of the byte histogram: the loss of the best model that ignores context."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class SequenceBatches:
    """Deterministic batches of fixed-length windows over one byte stream.

    Args:
      stream: [n] uint8 tokens.
      batch_size: sequences per batch.
      window: tokens per sequence (seq_len + 1 + mtp_depth).
      seed: the shuffle seed; epoch e uses the permutation drawn from (seed, e).
    """

    def __init__(self, stream: np.ndarray, *, batch_size: int, window: int, seed: int):
        self.num_windows = len(stream) // window
        if self.num_windows < batch_size:
            raise ValueError(f"stream: {len(stream)} tokens hold {self.num_windows} windows of {window}, "
                             f"fewer than batch_size={batch_size}")
        self.windows = stream[: self.num_windows * window].reshape(self.num_windows, window)
        self.batch_size, self.seed = batch_size, seed
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)}
        return self._permutations[epoch]

    def batch(self, index: int) -> np.ndarray:
        """[batch_size, window] int32, the ``index``-th batch of the shuffled stream."""
        samples = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        epochs, offsets = np.divmod(samples, self.num_windows)
        rows = [self._permutation(int(e))[o] for e, o in zip(epochs, offsets)]
        return self.windows[rows].astype(np.int32)

    def first(self, count: int) -> list[np.ndarray]:
        """The first ``count`` batches in stream order (no shuffle): fixed validation batches."""
        count = min(count, self.num_windows // self.batch_size)
        return [self.windows[i * self.batch_size:(i + 1) * self.batch_size].astype(np.int32) for i in range(count)]
