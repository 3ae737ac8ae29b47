"""``jaxseek prepare-data``: the DataFrame job writes exactly the record sets ``StoredBatches.prepare``
writes for the same corpus and window; its per-partition steps against direct computations; errors."""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import polars as pl
import pytest

from jaxseek import prepare_data as prep
from jaxseek.data import FILE_SEPARATOR, StoredBatches, corpus_files, held_out, load_stdlib_corpus, unigram_entropy
from storage.location import open_location

WINDOW = 33


def _corpus(root: pathlib.Path) -> pathlib.Path:
    """30 small files in two directories (pkg/m18.py and pkg/m24.py are held out), plus files to skip."""
    rng = np.random.default_rng(0)
    for i in range(30):
        path = root / ("pkg" if i % 2 == 0 else "lib/sub") / f"m{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(rng.integers(0, 256, 200 + 37 * i, dtype=np.uint8)))
    (root / "notes.txt").write_text("not python")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "x.py").write_text("skipped")
    return root


def test_corpus_files_are_load_stdlib_corpus_order_and_cut(tmp_path):
    root = _corpus(tmp_path / "c")
    for max_bytes in (None, 3000):
        files, count = corpus_files(root, max_bytes)
        corpus = load_stdlib_corpus(root, max_bytes)
        train = b"".join(f.path.read_bytes() + FILE_SEPARATOR for f in files if not held_out(f.relative))
        valid = b"".join(f.path.read_bytes() + FILE_SEPARATOR for f in files if held_out(f.relative))
        assert (train, valid, count) == (corpus.train.tobytes(), corpus.valid.tobytes(), corpus.num_files) == (
            train, valid, 30)
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)  # the rule, restated
    cut = int(np.searchsorted(np.cumsum([p.stat().st_size + len(FILE_SEPARATOR) for p in paths]), 3000)) + 1
    assert [f.path for f in corpus_files(root, 3000)[0]] == paths[:cut] and cut < 30
    assert any(held_out(f.relative) for f in corpus_files(root)[0])
    assert [f.relative for f in corpus_files(root, pattern="*.txt")[0]] == ["notes.txt"]


def test_partition_steps_match_direct_computation(tmp_path):
    root = _corpus(tmp_path / "c")
    files, _ = corpus_files(root)
    items = pl.DataFrame({"order": [5, 6], "path": [str(files[0].path), str(files[1].path)],
                          "relative": ["pkg/m18.py", "pkg/m0.py"]})
    rows = prep.read_files(items)
    assert rows["valid"].to_list() == [True, False] and rows["order"].to_list() == [5, 6]
    assert rows["tokens"].to_list() == [files[0].path.read_bytes() + FILE_SEPARATOR, files[1].path.read_bytes() + FILE_SEPARATOR]
    texts = pl.DataFrame({"text": ["héllo", "doc", ""], "id": ["doc11", "a", "b"]})
    tokenized = prep.tokenize_texts(texts)
    assert tokenized["tokens"].to_list() == ["héllo\n\n".encode(), b"doc\n\n", b"\n\n"]
    assert tokenized["valid"].to_list() == [True, False, False]
    assert prep.tokenize_texts(texts.drop("id"))["valid"].to_list() == [held_out(t) for t in texts["text"]]
    stream = prep.concat_tokens(pl.Series([b"ab", b"", b"cde"], dtype=pl.Binary))
    assert stream.dtype == np.uint8 and stream.tobytes() == b"abcde"
    assert prep.concat_tokens(pl.Series([], dtype=pl.Binary)).size == 0
    with pytest.raises(TypeError, match="text: expected a string column"):
        prep.tokenize_texts(pl.DataFrame({"text": [1]}))
    with pytest.raises(ValueError, match="text: 1 null values"):
        prep.tokenize_texts(pl.DataFrame({"text": ["a", None]}))


def test_parse_source_errors(tmp_path):
    assert prep.parse_source("stdlib").pattern == "*.py"
    assert prep.parse_source(str(tmp_path), pattern="*.txt", max_bytes=9) == prep.SourceSpec("files", str(tmp_path), "*.txt", 9)
    assert prep.parse_source("3fs+embedded:///x/docs.parquet").kind == "parquet"
    with pytest.raises(ValueError, match="does not exist"):
        prep.parse_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--glob and --max-bytes"):
        prep.parse_source("d.parquet", pattern="*.txt")
    assert prep.manifest_name(prep.parse_source(str(tmp_path)), 9) != prep.manifest_name(prep.parse_source(str(tmp_path)), 10)


@pytest.fixture()
def dataframe():
    return pytest.importorskip("storage.dataframe", reason="storage.dataframe (part P) is not in this tree")


def test_prepared_directory_is_what_stored_batches_writes(tmp_path, dataframe, monkeypatch):
    root = _corpus(tmp_path / "c")
    with open_location(str(tmp_path / "ours"), create=True) as ours:
        prepared = prep.ensure_prepared(ours, str(root), window=WINDOW, executor="inprocess")
        listing = sorted(ours.client.listdir(ours.path))
    corpus = load_stdlib_corpus(root)
    with open_location(str(tmp_path / "theirs"), create=True) as theirs:
        reference = [StoredBatches.prepare(theirs, s, batch_size=2, window=WINDOW, seed=0) for s in (corpus.train, corpus.valid)]
    assert [prepared.train, prepared.valid] == [r.source.name for r in reference]
    assert listing == sorted([prepared.manifest, prepared.train, prepared.valid])
    for name in (prepared.train, prepared.valid):  # byte-identical record sets (shards, checksums, index)
        for file in sorted((tmp_path / "theirs" / name).iterdir()):
            assert (tmp_path / "ours" / name / file.name).read_bytes() == file.read_bytes(), file.name
    assert (prepared.train_tokens, prepared.valid_tokens) == (len(corpus.train), len(corpus.valid))
    assert prepared.documents == 30 and prepared.unigram_entropy() == pytest.approx(unigram_entropy(corpus.train))
    with open_location(str(tmp_path / "ours")) as ours:
        batches = StoredBatches.open(ours, prepared.train, batch_size=2, seed=0)
        assert np.array_equal(batches.batch(3), reference[0].batch(3))
        batches.close()
        monkeypatch.setattr(prep, "prepare_data", lambda *a, **k: pytest.fail("prepared data was not found"))
        assert prep.ensure_prepared(ours, str(root), window=WINDOW) == prepared
    for r in reference:
        r.close()


def test_parquet_source_and_command(tmp_path, dataframe):
    texts = [f"document {i} " * (i + 3) for i in range(40)]
    ids = [f"doc{i}" for i in range(40)]
    pl.DataFrame({"id": ids, "text": texts}).write_parquet(tmp_path / "docs.parquet")
    parser = argparse.ArgumentParser()
    prep.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-data", "--source", str(tmp_path / "docs.parquet"), "--out",
                              str(tmp_path / "out"), "--window", "17", "--executor", "inprocess"])
    from rich.console import Console
    assert args.handler(args, Console(quiet=True)) == 0
    with open_location(str(tmp_path / "out")) as out:
        prepared = prep.find_prepared(out, prep.parse_source(str(tmp_path / "docs.parquet")), 17)
        train = b"".join(t.encode() + FILE_SEPARATOR for t, i in zip(texts, ids) if not held_out(i))
        expected = np.frombuffer(train, np.uint8)[: len(train) // 17 * 17].reshape(-1, 17)
        batches = StoredBatches.open(out, prepared.train, batch_size=1, seed=0)
        assert np.array_equal(batches.source.read_many(np.arange(len(expected))), expected)
        batches.close()
    pl.DataFrame({"body": ["x"]}).write_parquet(tmp_path / "bad.parquet")
    with open_location(str(tmp_path / "out2"), create=True) as out:
        with pytest.raises(ValueError, match="no 'text' column"):
            prep.ensure_prepared(out, str(tmp_path / "bad.parquet"), window=17, executor="inprocess")
        with pytest.raises(ValueError, match="fewer than one window of 4096"):
            prep.ensure_prepared(out, str(tmp_path / "docs.parquet"), window=4096, executor="inprocess")
