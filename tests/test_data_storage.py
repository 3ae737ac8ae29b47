"""jaxseek.data.StoredBatches: training windows on storage give SequenceBatches' batches exactly."""

import subprocess
import sys

import numpy as np
import pytest

from jaxseek.data import SequenceBatches, StoredBatches
from storage.location import open_location

WINDOW, BATCH = 33, 4


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, 256, 40 * WINDOW + 7, dtype=np.uint8)  # 40 windows and a tail


def data_sets(location):
    return sorted(n for n in location.client.listdir(location.path) if not n.startswith("."))


def test_stored_batches_equal_the_in_memory_ones(tmp_path, stream):
    with open_location(f"3fs+embedded://{tmp_path}/fs", create=True) as root:
        data = root.child("data")
        memory = SequenceBatches(stream, batch_size=BATCH, window=WINDOW, seed=7)
        stored = StoredBatches.prepare(data, stream, batch_size=BATCH, window=WINDOW, seed=7)
        for index in (0, 3, 9, 10, 11, 10**4):  # across epoch boundaries (10 batches per epoch), far ahead
            got = stored.batch(index)
            assert got.dtype == np.int32 and got.shape == (BATCH, WINDOW)
            np.testing.assert_array_equal(got, memory.batch(index))
        for a, b in zip(stored.first(3), memory.first(3), strict=True):
            np.testing.assert_array_equal(a, b)
        assert len(stored.first(100)) == 10
        stored.close()
        (name,) = data_sets(data)
        # A resumed run (a fresh object) reads the same set, not a new copy, and the same batches.
        again = StoredBatches.prepare(data, stream, batch_size=BATCH, window=WINDOW, seed=7)
        np.testing.assert_array_equal(again.batch(12), memory.batch(12))
        again.close()
        assert data_sets(data) == [name]
        # Another window or another corpus gets its own set; never mixed with the first.
        other = StoredBatches.prepare(data, stream, batch_size=BATCH, window=WINDOW + 1, seed=7)
        np.testing.assert_array_equal(other.batch(2), SequenceBatches(stream, batch_size=BATCH, window=WINDOW + 1, seed=7).batch(2))
        other.close()
        changed = stream.copy()
        changed[5] ^= 1
        StoredBatches.prepare(data, changed, batch_size=BATCH, window=WINDOW, seed=7).close()
        assert len(data_sets(data)) == 3


def test_a_later_process_reads_the_prepared_windows(tmp_path, stream):
    url = f"3fs+embedded://{tmp_path}/fs"
    with open_location(url, create=True) as root:
        StoredBatches.prepare(root.child("data"), stream, batch_size=BATCH, window=WINDOW, seed=3).close()
        (name,) = data_sets(root.child("data"))
    np.save(tmp_path / "stream.npy", stream)
    code = (f"import numpy as np; from jaxseek.data import StoredBatches; from storage.location import open_location\n"
            f"loc = open_location({url + '/data'!r}); s = np.load({str(tmp_path / 'stream.npy')!r})\n"
            f"b = StoredBatches.prepare(loc, s, batch_size={BATCH}, window={WINDOW}, seed=3)\n"
            f"np.save({str(tmp_path / 'batch.npy')!r}, b.batch(5)); b.close(); loc.close()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "batch.npy"),
                                  SequenceBatches(stream, batch_size=BATCH, window=WINDOW, seed=3).batch(5))
    with open_location(url + "/data") as data:
        assert data_sets(data) == [name]


def test_bad_streams_are_refused(tmp_path, stream):
    with open_location(tmp_path / "plain", create=True) as location:
        with pytest.raises(TypeError, match="stream"):
            StoredBatches.prepare(location, stream.astype(np.int32), batch_size=BATCH, window=WINDOW, seed=0)
        with pytest.raises(ValueError, match="stream"):
            StoredBatches.prepare(location, stream[:100], batch_size=BATCH, window=WINDOW, seed=0)
        stored = StoredBatches.prepare(location, stream, batch_size=BATCH, window=WINDOW, seed=0)  # plain dirs work too
        np.testing.assert_array_equal(stored.batch(1), SequenceBatches(stream, batch_size=BATCH, window=WINDOW, seed=0).batch(1))
        stored.close()


def test_a_set_another_process_published_first_is_used(tmp_path, stream, monkeypatch):
    """Two processes preparing at once: the one whose publish finds the set already there uses it."""
    from jaxseek.data import write_windows

    with open_location(tmp_path / "plain", create=True) as data:
        name, fingerprint = write_windows(data, stream, WINDOW)
        monkeypatch.setattr(data.client, "exists", lambda path: False)  # it checked before the other published
        assert write_windows(data, stream, WINDOW) == (name, fingerprint)
        assert data_sets(data) == [name]
