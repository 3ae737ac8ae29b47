"""storage.checkpoint: Orbax checkpoints of sharded pytrees through the 3FS client (8 fake CPU devices)."""

import errno
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxseek.checkpoint import Checkpointer
from jaxseek.config import TrainConfig
from jaxseek.train_state import sharded_abstract_state
from sharding.mesh import make_mesh
from storage.checkpoint import (CheckpointCorruptionError, ThreeFSCheckpointHandler, ThreeFSCheckpointManager,
                                ThreeFSRestore, ThreeFSSave)
from storage.checkpoint.crash_drill import crash_trials
from storage.location import Location, open_location


@pytest.fixture(scope="module")
def threefs(tmp_path_factory):
    """One embedded 3FS (3 replicas) for the module; each test works in its own directory."""
    with open_location(f"3fs+embedded://{tmp_path_factory.mktemp('ckpt')}/3fs", create=True) as location:
        yield location


@pytest.fixture
def location(threefs, request):
    return threefs.child(request.node.name.replace("[", "_").replace("]", ""))


class Spy:
    """A FileClient around another: counts bytes read from data files, can hold or fail writes."""

    def __init__(self, client):
        self.client, self.data_bytes_read, self.fail_writes = client, 0, False
        self.writes_open = threading.Event()
        self.writes_open.set()

    def __getattr__(self, name):
        return getattr(self.client, name)

    def open(self, path, mode="rb"):
        return SpyFile(self, self.client.open(path, mode))


class SpyFile:
    def __init__(self, spy, file):
        self.spy, self.file = spy, file

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()

    def pread_into(self, buffer, offset):
        count = self.file.pread_into(buffer, offset)
        if "/data-" in self.file.path:
            self.spy.data_bytes_read += count
        return count

    def pwrite(self, data, offset):
        self.spy.writes_open.wait()
        if self.spy.fail_writes:
            raise OSError(errno.EIO, "injected write failure", self.file.path)
        return self.file.pwrite(data, offset)


def spied(location):
    spy = Spy(location.client)
    return spy, Location(spy, location.path, location.url)


def _mesh(shape, devices):
    return jax.sharding.Mesh(np.array(devices).reshape(shape), ("x", "y"))


def _tree(devices):
    """A train-state-like tree on a (4, 2) mesh: several dtypes and PartitionSpecs, a scalar, nested dicts."""
    mesh = _mesh((4, 2), devices)
    rng = np.random.default_rng(0)
    put = lambda value, spec: jax.device_put(value, NamedSharding(mesh, spec))  # noqa: E731
    return {"params": {"w": put(jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16), P("x", "y")),
                       "b": put(rng.normal(size=(8,)).astype(np.float32), P()),
                       "e": put(rng.normal(size=(4, 6, 8)).astype(np.float32), P(None, None, "x"))},
            "opt": {"count": put(np.int32(7), P()), "mu": put(rng.integers(-9, 9, (8, 3)).astype(np.int8), P("y"))},
            "host": {"table": np.arange(10, dtype=np.int64)}, "step": 7}


def _assert_equal(restored, original):
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                 jax.tree_util.tree_flatten_with_path(original)[0]):
        assert np.asarray(a).dtype == np.asarray(b).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _target(tree, devices):
    """The same tree wanted on a (2, 4) mesh with other specs (and one leaf on one device)."""
    mesh = _mesh((2, 4), devices)
    specs = {"w": P("y", None), "b": P("y"), "e": P("y", "x", None), "count": P(), "mu": P(None, None)}
    def like(path, leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        name = path[-1].key
        sharding = jax.sharding.SingleDeviceSharding(devices[5]) if name == "mu" else NamedSharding(mesh, specs[name])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return jax.tree_util.tree_map_with_path(like, tree)


def test_round_trip_onto_another_mesh(location, devices):
    tree = _tree(devices)
    with ThreeFSCheckpointManager(location) as manager:
        assert manager.save(3, args=ThreeFSSave(tree))
        manager.wait_until_finished()
        assert manager.all_steps() == [3] and manager.latest_step() == 3
        target = _target(tree, devices)
        restored = manager.restore(3, args=ThreeFSRestore(target))
        _assert_equal(restored, tree)
        assert restored["params"]["e"].sharding == target["params"]["e"].sharding
        assert restored["opt"]["mu"].sharding == target["opt"]["mu"].sharding
        pointers = {shard.data.unsafe_buffer_pointer() for shard in restored["params"]["b"].addressable_shards}
        assert len(pointers) == 8  # a replicated leaf: every device owns its buffer (donation stays safe)
        assert restored["step"] == 7 and isinstance(restored["host"]["table"], np.ndarray)
        same = manager.restore(args=ocp.args.StandardRestore(jax.tree.map(  # Orbax's args work too; latest
            lambda x: x if not isinstance(x, jax.Array) else ocp.utils.to_shape_dtype_struct(x), tree)))
        _assert_equal(same, tree)
        assert same["params"]["w"].sharding == tree["params"]["w"].sharding
        _assert_equal(manager.restore(3), jax.tree.map(np.asarray, tree))  # no target: nested dicts of numpy
        assert manager.item_metadata(3)["params"]["w"] == jax.ShapeDtypeStruct((16, 8), jnp.bfloat16)
    assert ocp.args.get_registered_handler_cls(ThreeFSSave) is ThreeFSCheckpointHandler


def test_restore_reads_only_the_overlapping_byte_ranges(location, devices):
    """(64, 64) f32 saved in 4 row blocks, restored as 8 row blocks: each target block reads half a saved
    shard (checksum blocks of 256 bytes), so the data read is the array once, not each shard twice."""
    spy, spy_location = spied(location)
    value = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    saved = jax.device_put(value, NamedSharding(_mesh((4, 2), devices), P("x", None)))
    with ThreeFSCheckpointManager(spy_location, block_size=256) as manager:
        manager.save(1, args=ThreeFSSave({"a": saved}))
        manager.wait_until_finished()
        target = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(_mesh((8, 1), devices), P("x")))
        restored = manager.restore(1, args=ThreeFSRestore({"a": target}))
    np.testing.assert_array_equal(np.asarray(restored["a"]), value)
    assert spy.data_bytes_read == value.nbytes


def test_async_save_keeps_the_values_of_the_moment_of_save(location, devices):
    spy, spy_location = spied(location)
    tree = _tree(devices)
    expected = jax.tree.map(lambda x: np.array(x) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)
    with ThreeFSCheckpointManager(spy_location) as manager:
        spy.writes_open.clear()  # the background write waits at its first pwrite
        assert manager.save(1, args=ThreeFSSave(tree))
        assert manager.latest_step() is None  # save returned before the write: training goes on
        tree["host"]["table"][:] = -1  # the caller changes its buffers...
        tree["params"]["w"].delete()  # ...and donates its device arrays
        spy.writes_open.set()
        manager.wait_until_finished()
        assert manager.latest_step() == 1
        _assert_equal(manager.restore(1), expected)


def test_a_failed_background_save_is_raised_and_leaves_nothing(location, devices):
    spy, spy_location = spied(location)
    with ThreeFSCheckpointManager(spy_location) as manager:
        spy.fail_writes = True
        manager.save(1, args=ThreeFSSave({"a": np.ones(4)}))
        with pytest.raises(OSError, match="injected write failure"):
            manager.save(2, args=ThreeFSSave({"a": np.ones(4)}))  # the next save joins the failed one
        spy.fail_writes = False
        assert manager.all_steps() == [] and location.client.listdir(location.path) == []
        assert manager.save(3, args=ThreeFSSave({"a": np.ones(4)}))
    assert location.client.listdir(location.path) == ["3"]


def test_max_to_keep_and_the_save_interval(location):
    options = ocp.CheckpointManagerOptions(save_interval_steps=2, max_to_keep=2)
    with ThreeFSCheckpointManager(location, options) as manager:
        saved = [step for step in range(1, 8) if manager.save(step, args=ThreeFSSave({"s": np.full(3, step)}))]
        manager.wait_until_finished()
        assert saved == [1, 2, 4, 6]  # the first save, then the interval (as Orbax)
        assert not manager.save(6, args=ThreeFSSave({"s": np.zeros(3)}))  # not after the last one
        assert manager.save(7, args=ThreeFSSave({"s": np.full(3, 7)}), force=True)
        manager.wait_until_finished()
        assert manager.all_steps() == [6, 7]
        np.testing.assert_array_equal(manager.restore(6)["s"], np.full(3, 6))
    assert location.client.listdir(location.path) == ["6", "7"]
    with pytest.raises(ValueError, match="keep_period"):
        ThreeFSCheckpointManager(location, ocp.CheckpointManagerOptions(keep_period=2))


def _flip_byte(client, path, offset):
    with client.open(path, "r+b") as file:
        byte = file.pread(1, offset)
        file.pwrite(bytes([byte[0] ^ 0x40]), offset)


def test_corruption_and_missing_files_name_the_file(location):
    with ThreeFSCheckpointManager(location) as manager:
        for step in (1, 2):
            manager.save(step, args=ThreeFSSave({"a": np.arange(1000, dtype=np.float32), "b": {"c": np.ones(7)}}),
                         force=True)
        manager.wait_until_finished()
        _flip_byte(location.client, location.join("1", "data-00000.bin"), 1234)
        with pytest.raises(CheckpointCorruptionError, match="CRC32C mismatch in block 0") as caught:
            manager.restore(1)
        assert caught.value.filename == location.join("1", "data-00000.bin") and caught.value.errno == errno.EIO
        _flip_byte(location.client, location.join("2", "manifest.json"), 20)
        with pytest.raises(CheckpointCorruptionError) as caught:
            manager.restore(2)
        assert caught.value.filename == location.join("2", "manifest.json")
        location.client.remove(location.join("2", "manifest.json"))
        with pytest.raises(FileNotFoundError, match="manifest.json"):
            manager.restore(2)
        with pytest.raises(FileNotFoundError, match="no step 9"):
            manager.restore(9)
        with pytest.raises(ValueError, match=r"not saved: \['zzz'\]; not in the target: \['a'\], \['b'\]\['c'\]"):
            manager.restore(1, args=ThreeFSRestore({"zzz": np.zeros(1)}))


def test_partial_checkpoints_are_invisible_and_cleaned(location):
    with ThreeFSCheckpointManager(location) as manager:
        manager.save(1, args=ThreeFSSave({"a": np.arange(5)}))
    client = location.client
    for leftover in (".tmp-2", ".deleting-0"):  # a save and a deletion cut short by a crash
        client.makedirs(location.join(leftover))
        with client.open(location.join(leftover, "data-00000.bin"), "wb") as file:
            file.write(b"partial")
    with ThreeFSCheckpointManager(location) as manager:
        assert manager.all_steps() == [1]
        assert client.listdir(location.path) == ["1"]
        np.testing.assert_array_equal(manager.restore()["a"], np.arange(5))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ThreeFSCheckpointManager(location.child("nope"), ocp.CheckpointManagerOptions(create=False))


def _random_state(abstract):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda leaf: jax.device_put(rng.normal(size=leaf.shape).astype(leaf.dtype), leaf.sharding),
                        abstract)


def test_checkpointer_keeps_the_train_state_on_3fs(location, micro_config, tmp_path, devices):
    tc = TrainConfig(steps=4, batch_size=8, seq_len=16, warmup_steps=1, checkpoint_every=2)
    state = _random_state(sharded_abstract_state(micro_config, tc, make_mesh(ep=2), "ep"))
    checkpointer = Checkpointer(tmp_path / "run", save_every=tc.checkpoint_every, location=location)
    assert [checkpointer.save(step, state) for step in (1, 2, 3)] == [True, True, False]
    checkpointer.wait()
    assert checkpointer.latest_step() == 2 and location.client.listdir(location.path) == ["1", "2"]
    target = sharded_abstract_state(micro_config, tc, make_mesh(), "zero1")  # another layout
    restored = checkpointer.restore(2, target)
    checkpointer.close()
    _assert_equal(restored, state)
    assert type(restored) is type(state)
    assert all(r.sharding == t.sharding for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with open_location(tmp_path / "plain", create=True) as plain:  # an OS path: plain Orbax there
        local = Checkpointer(tmp_path / "run", save_every=1, location=plain)
        local.save(1, {"a": jnp.arange(3)})  # (a small tree: Orbax takes seconds for the state's 165 leaves)
        local.close()
        assert (tmp_path / "plain" / "1").is_dir()
        again = Checkpointer(tmp_path / "run", save_every=1, location=plain)
        assert again.latest_step() == 1
        again.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_never_exposes_a_partial_checkpoint(tmp_path):
    report = crash_trials(30, tmp_path)
    assert report.failures == []
    assert report.partial > 0  # some kills landed inside a save, not only between saves
    assert report.steps[-1] > 10
