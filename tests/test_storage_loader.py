"""storage.loader: record sets on 3FS, the Grain data source and the sampler order, against numpy indexing."""

import json

import grain.python as grain
import numpy as np
import pytest

from storage import loader
from storage.loader import CorruptRecords, RecordSource, record_order, write_records
from storage.location import open_location

NUM, LEN, PER_SHARD = 201, 17, 50  # 5 shards, the last one short


@pytest.fixture(scope="module")
def records():
    return np.random.default_rng(0).integers(-2**31, 2**31 - 1, size=(NUM, LEN), dtype=np.int32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader3fs")
    with open_location(f"3fs+embedded://{root}/fs", create=True) as location:
        yield location


@pytest.fixture(scope="module")
def written(cluster, records):
    """The record set 'tokens' on the module's 3FS, and an open source over it."""
    index = write_records(cluster, "tokens", records, records_per_shard=PER_SHARD, metadata={"window": LEN})
    with RecordSource(cluster, "tokens") as source:
        yield index, source


def test_source_returns_exactly_the_written_records(written, records, tmp_path):
    index, source = written
    assert index.shard_counts == (50, 50, 50, 50, 1) and index.metadata == {"window": LEN}
    assert index.fingerprint == loader.records_fingerprint(records)
    assert len(source) == NUM and "tokens" in repr(source)
    for key in (0, 49, 50, 199, 200):
        np.testing.assert_array_equal(source[key], records[key])
    keys = np.random.default_rng(1).integers(0, NUM, 300)  # repeats, every shard, any order
    np.testing.assert_array_equal(source.read_many(keys), records[keys])
    np.testing.assert_array_equal(source.read_many(np.arange(NUM)), records)  # runs merged across a whole shard
    assert source.read_many([]).shape == (0, LEN)
    np.testing.assert_array_equal(source.read_many([10, 61, 112]), records[[10, 61, 112]])  # rows 10, 11, 12 of 3 shards
    with RecordSource(source.location, "tokens", io_workers=2) as ring:  # batches on an IoRing
        np.testing.assert_array_equal(ring.read_many(keys), records[keys])
        np.testing.assert_array_equal(ring.read_many(keys[::-1]), records[keys[::-1]])
        np.testing.assert_array_equal(ring.read_many([10, 61, 112]), records[[10, 61, 112]])
    with pytest.raises(IndexError, match="201"):
        source.read_many([3, NUM])
    with open_location(tmp_path / "plain", create=True) as plain:  # a plain directory works the same
        write_records(plain, "u8", records.astype(np.uint8), records_per_shard=64)
        with RecordSource(plain, "u8") as local:
            np.testing.assert_array_equal(local.read_many(keys), records.astype(np.uint8)[keys])


def test_loader_follows_the_sampler_order_and_grain_pipelines(written, records):
    _, source = written
    order = record_order(NUM, shuffle=True, seed=3)
    sampler = grain.IndexSampler(NUM, shard_options=grain.ShardOptions(0, 1, drop_remainder=True), shuffle=True, seed=3)
    expected_keys = np.array([sampler[i].record_key for i in range(2 * NUM)])  # two epochs
    keys = np.concatenate([order.batch(step, 67) for step in range(6)])
    np.testing.assert_array_equal(keys, expected_keys)
    np.testing.assert_array_equal(np.sort(keys[:NUM]), np.arange(NUM))  # an epoch is a permutation
    assert not np.array_equal(keys[:NUM], keys[NUM:])  # and the next epoch another one
    np.testing.assert_array_equal(source.read_many(order.batch(1, 67)), records[expected_keys[67:134]])
    # Grain's own DataLoader and MapDataset over the source.
    loader_ = grain.DataLoader(data_source=source, sampler=sampler, worker_count=0)
    got = [next(iter_) for iter_ in [iter(loader_)] for _ in range(30)]
    np.testing.assert_array_equal(np.stack(got), records[expected_keys[:30]])
    batches = grain.MapDataset.source(source).batch(8)
    np.testing.assert_array_equal(batches[2], records[16:24])


def test_resume_mid_epoch_continues_exactly(written, records):
    _, source = written
    uninterrupted = record_order(NUM, seed=11).keys(0, 300)
    k = 123
    resumed = record_order(NUM, seed=11).keys(k, 300 - k)  # a fresh process at position k
    np.testing.assert_array_equal(resumed, uninterrupted[k:])
    # Grain's DataLoader state resumes too.
    sampler = grain.IndexSampler(NUM, shard_options=grain.NoSharding(), shuffle=True, seed=11)
    first = iter(grain.DataLoader(data_source=source, sampler=sampler, worker_count=0))
    head = [next(first) for _ in range(k)]
    state = first.get_state()
    tail = iter(grain.DataLoader(data_source=source, sampler=sampler, worker_count=0))
    tail.set_state(state)
    rest = [next(tail) for _ in range(NUM - k + 10)]
    full = iter(grain.DataLoader(data_source=source, sampler=sampler, worker_count=0))
    np.testing.assert_array_equal(np.stack(head + rest), np.stack([next(full) for _ in range(NUM + 10)]))


def test_host_shards_are_disjoint_and_cover_the_epoch():
    hosts = 3
    per_host = NUM // hosts
    orders = [record_order(NUM, shard_index=h, shard_count=hosts, seed=5) for h in range(hosts)]
    epochs = [set(o.keys(0, per_host).tolist()) for o in orders]
    assert all(len(e) == per_host for e in epochs)
    assert set().union(*epochs) == set(range(NUM))
    assert sum(len(e) for e in epochs) == NUM  # disjoint
    with pytest.raises(ValueError, match="shard_index"):
        record_order(NUM, shard_index=3, shard_count=3)


def test_corrupt_truncated_or_missing_files_are_named(cluster, records):
    write_records(cluster, "bad", records, records_per_shard=PER_SHARD)
    shard = cluster.join("bad", loader.shard_file(2))
    data = bytearray(cluster.client.open(shard, "rb").read())
    data[5 * LEN * 4 + 3] ^= 0xFF  # one byte of record 105 (shard 2, row 5)
    with cluster.client.open(shard, "wb") as file:
        file.write(bytes(data))
    with RecordSource(cluster, "bad") as source:
        np.testing.assert_array_equal(source[104], records[104])
        with pytest.raises(CorruptRecords, match=r"bad/shard-00002.rec: record 5 fails"):
            source[105]
        with pytest.raises(CorruptRecords, match=r"shard-00002.rec: record 5"):
            source.read_many([1, 105, 7])
    with RecordSource(cluster, "bad", io_workers=2) as source:
        with pytest.raises(CorruptRecords, match=r"shard-00002.rec: record 5"):
            source.read_many([1, 105, 7])
        np.testing.assert_array_equal(source.read_many([1, 7]), records[[1, 7]])  # the ring recovers
    with cluster.client.open(shard, "wb") as file:
        file.write(bytes(data[:-10]))
    with pytest.raises(CorruptRecords, match=r"bad/shard-00002.rec: .* truncated"):
        RecordSource(cluster, "bad")
    cluster.client.remove(shard)
    with pytest.raises(FileNotFoundError, match=r"bad/shard-00002.rec"):
        RecordSource(cluster, "bad")
    index = cluster.join("bad", loader.INDEX_FILE)
    with cluster.client.open(index, "wb") as file:
        file.write(json.dumps({"format": "other"}).encode())
    with pytest.raises(CorruptRecords, match=r"bad/index.json"):
        RecordSource(cluster, "bad")
    cluster.client.remove(index)
    with pytest.raises(FileNotFoundError, match=r"bad/index.json"):
        RecordSource(cluster, "bad")
    with pytest.raises(FileNotFoundError, match=r"nothing/index.json"):
        RecordSource(cluster, "nothing")


def test_writes_are_atomic_and_validated(cluster, records, monkeypatch):
    write_records(cluster, "once", records[:10], records_per_shard=4)
    with pytest.raises(FileExistsError, match="once"):
        write_records(cluster, "once", records, records_per_shard=4)
    calls = []

    def failing(part):  # the third shard's checksums fail: nothing may become visible
        calls.append(len(part))
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(part)
    real = loader._record_checksums
    monkeypatch.setattr(loader, "_record_checksums", failing)
    with pytest.raises(OSError, match="disk gone"):
        write_records(cluster, "half", records, records_per_shard=PER_SHARD)
    monkeypatch.undo()
    assert not cluster.client.exists(cluster.join("half"))
    assert not [n for n in cluster.client.listdir(cluster.path) if n.startswith(".")]
    write_records(cluster, "once", records[:20], records_per_shard=4, replace=True)
    with RecordSource(cluster, "once") as source:
        np.testing.assert_array_equal(source.read_many(np.arange(20)), records[:20])
    for bad, words in (((records[0],), "records"), ((records.astype(float),), "integer")):
        with pytest.raises((ValueError, TypeError), match=words):
            write_records(cluster, "x", *bad, records_per_shard=4)
    with pytest.raises(ValueError, match="name"):
        write_records(cluster, "a/b", records, records_per_shard=4)
