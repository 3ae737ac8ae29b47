import numpy as np
import pytest

from jaxseek.data import SequenceBatches, load_stdlib_corpus, unigram_entropy


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_corpus(max_bytes=2_000_000)


def test_stdlib_corpus_is_python_source_with_a_held_out_split(corpus):
    assert corpus.num_files > 100
    assert len(corpus.train) > 20 * len(corpus.valid) / 2 > 0
    assert b"def " in corpus.train[:200_000].tobytes() and b"import" in corpus.valid.tobytes()
    again = load_stdlib_corpus(max_bytes=2_000_000)
    np.testing.assert_array_equal(corpus.train, again.train)
    np.testing.assert_array_equal(corpus.valid, again.valid)


def test_held_out_files_never_appear_in_training(tmp_path):
    for i in range(60):
        (tmp_path / f"m{i}.py").write_bytes(f"# unique marker {i:04d}\n".encode())
    split = load_stdlib_corpus(tmp_path)
    train, valid = split.train.tobytes(), split.valid.tobytes()
    markers = [f"marker {i:04d}".encode() for i in range(60)]
    assert all((m in train) != (m in valid) for m in markers)
    assert 0 < sum(m in valid for m in markers) < 15


def test_batches_are_a_pure_function_of_seed_and_index(corpus):
    a = SequenceBatches(corpus.train, batch_size=4, window=33, seed=7)
    b = SequenceBatches(corpus.train, batch_size=4, window=33, seed=7)
    for index in (5, 0, 5, 10**5):  # out of order, repeated, and past the first epoch
        np.testing.assert_array_equal(a.batch(index), b.batch(index))
    assert a.batch(0).shape == (4, 33) and a.batch(0).dtype == np.int32
    assert not np.array_equal(a.batch(0), SequenceBatches(corpus.train, batch_size=4, window=33, seed=8).batch(0))
    # An epoch walks a permutation of all windows: each is seen once.
    epoch = np.concatenate([a.batch(i) for i in range(a.num_windows // 4)])
    order = a._permutation(0)
    np.testing.assert_array_equal(np.sort(order), np.arange(a.num_windows))
    np.testing.assert_array_equal(epoch, a.windows[order[: len(epoch)]])


def test_unigram_entropy():
    assert unigram_entropy(np.zeros(100, np.uint8)) == 0.0
    np.testing.assert_allclose(unigram_entropy(np.arange(256, dtype=np.uint8)), np.log(256))


def test_too_little_data_names_the_argument():
    with pytest.raises(ValueError, match="stream"):
        SequenceBatches(np.zeros(100, np.uint8), batch_size=4, window=33, seed=0)
