"""The FUSE mount (``storage/threefs/fuse/``, ``python -m storage.threefs mount URL MOUNTPOINT``).

The mount is served by a subprocess (a process must not use its own mount); the tests use it through
plain POSIX calls and polars. References: the same operations on a plain local directory (results,
errnos and the final tree must agree), a bytearray for random-offset IO, the 3FS client's view of the
same cluster before and after the mount. Skipped, with the reason, where FUSE cannot be mounted (not
root, no /dev/fuse). The parts that need no mount: ``test_threefs_fuse_units.py``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage.threefs.cluster import ClusterShape, EmbeddedCluster, ProcessCluster
from storage.threefs.fuse.mount import fuse_unavailable_reason

pytestmark = pytest.mark.timeout(90, method="thread")  # a hang (in a syscall) ends the run; the mounts go too

SHAPE = ClusterShape(nodes=3, targets_per_node=1, replicas=3, chunk_size=64 << 10, stripe=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fuse_usable():
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(f"FUSE cannot be mounted here: {reason}")


class Mount:
    """``python -m storage.threefs mount`` in a subprocess, until ``stop``."""

    def __init__(self, cluster: Path, mountpoint: Path, scheme: str = "3fs+embedded") -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.path = mountpoint
        self.process = subprocess.Popen(
            [sys.executable, "-m", "storage.threefs", "mount", f"{scheme}://{cluster}", str(mountpoint),
             "--exit-with-parent"],  # unmounts if the test process dies first
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the mount did not come up: {self.process.stderr.read()}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, then the exit status; the mountpoint is free afterwards whatever happened."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if os.path.ismount(self.path):
            subprocess.run(["umount", "-l", str(self.path)], check=False)
        return self.process.returncode


def seed_cluster(root: Path, files: dict[str, bytes]) -> None:
    with EmbeddedCluster(root, SHAPE, heartbeat_interval=None) as cluster:
        client = cluster.client()
        for path, data in files.items():
            client.makedirs(os.path.dirname(path))
            with client.open(path, "wb") as f:
                f.write(data)
        client.close()


def client_view(root: Path) -> dict[str, bytes]:
    """Every file of the cluster at `root` (path -> bytes), read through the 3FS client."""
    with EmbeddedCluster(root, SHAPE, heartbeat_interval=None) as cluster:
        client = cluster.client()
        files, todo = {}, ["/"]
        while todo:
            directory = todo.pop()
            for name in client.listdir(directory):
                path = os.path.join(directory, name)
                stat = client.stat(path)
                if stat.type == "directory":
                    todo.append(path)
                else:
                    with client.open(path, "rb") as f:
                        files[path] = f.read()
                    assert stat.size == len(files[path]), path
        client.close()
    return files


@pytest.fixture(scope="module")
def mounted(fuse_usable, tmp_path_factory):
    base = tmp_path_factory.mktemp("fuse")
    seed_cluster(base / "cluster", {"/seeded/data.bin": b"seeded by the client"})
    mount = Mount(base / "cluster", base / "mnt")
    yield mount.path
    assert mount.stop() == 0, mount.process.stderr.read()


def tree(root: Path) -> dict[str, object]:
    """Relative path -> file bytes, 'dir', or ('link', target)."""
    found: dict[str, object] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            key = str(path.relative_to(root))
            found[key] = ("link", os.readlink(path)) if path.is_symlink() else \
                "dir" if path.is_dir() else path.read_bytes()
    return found


RENAME_NOREPLACE = 1


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """renameat2(2) through glibc (Python's os has no flags argument)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags):  # -100: AT_FDCWD
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src))


def posix_script(root: Path) -> list[object]:
    """A sequence of POSIX calls under `root`; returns what each observed (values or errnos)."""
    rng = random.Random(7)
    seen: list[object] = []

    def attempt(fn, *args):
        try:
            seen.append(fn(*args))
        except OSError as error:
            seen.append(("errno", errno.errorcode[error.errno]))

    payload = rng.randbytes(200_000)  # crosses chunk boundaries (64 KiB chunks)
    os.makedirs(root / "a/b/c")
    (root / "a/f1").write_bytes(payload)
    with open(root / "a/f1", "ab") as f:
        f.write(b"appended")
    with open(root / "a/f1", "r+b") as f:
        f.seek(70_000)
        f.write(b"X" * 100)
        seen.append(f.tell())
    seen.append(os.stat(root / "a/f1").st_size)
    seen.append(sorted(os.listdir(root / "a")))
    os.rename(root / "a/f1", root / "a/b/f2")
    (root / "a/other").write_bytes(b"to be replaced")
    os.replace(root / "a/b/f2", root / "a/other")
    os.rename(root / "a/b", root / "a/b2")
    seen.append(sorted(os.listdir(root / "a/b2")))
    os.truncate(root / "a/other", 66_000)
    with open(root / "a/other", "r+b") as f:
        f.truncate(140_000)  # grows: zeros
        seen.append(os.fstat(f.fileno()).st_size)
    (root / "a/gone").write_bytes(b"x")
    os.remove(root / "a/gone")
    os.symlink("other", root / "a/link")
    seen.append(os.readlink(root / "a/link"))
    seen.append((root / "a/link").read_bytes()[:10])
    attempt(os.rmdir, root / "a")                   # ENOTEMPTY
    attempt(os.mkdir, root / "a/b2")                # EEXIST
    attempt(open, root / "a/missing")               # ENOENT
    attempt(os.remove, root / "a/b2")               # EISDIR
    attempt(os.rmdir, root / "a/other")             # ENOTDIR
    attempt(os.rename, root / "a/other", root / "a/b2")  # EISDIR
    attempt(os.listdir, root / "a/other")           # ENOTDIR
    attempt(os.open, root / "a/other", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # EEXIST
    attempt(os.utime, root / "a/other")             # touch: accepted
    attempt(os.chmod, root / "a/other", 0o644)      # accepted
    attempt(renameat2, root / "a/link", root / "a/other", RENAME_NOREPLACE)  # EEXIST
    os.rmdir(root / "a/b2/c")
    seen.append(sorted(os.listdir(root / "a/b2")))
    return seen


def test_posix_calls_through_the_mount_agree_with_a_plain_directory(mounted, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (mounted / "posix").mkdir()
    assert posix_script(mounted / "posix") == posix_script(plain)
    assert tree(mounted / "posix") == tree(plain)


def test_a_file_written_by_the_client_before_mounting_reads_through_the_mount(mounted):
    assert (mounted / "seeded/data.bin").read_bytes() == b"seeded by the client"
    assert os.stat(mounted / "seeded/data.bin").st_size == len(b"seeded by the client")


def test_random_offset_writes_and_reads_match_a_reference_buffer(mounted):
    rng = random.Random(11)
    reference = bytearray()
    path = mounted / "random.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(40):
            offset, data = rng.randrange(600_000), rng.randbytes(rng.choice([1, 4096, 70_000, 1 << 20]))
            assert os.pwrite(fd, data, offset) == len(data)
            if offset > len(reference):
                reference += bytes(offset - len(reference))  # a hole reads as zeros
            reference[offset:offset + len(data)] = data
        assert os.fstat(fd).st_size == len(reference)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)  # a fresh open: the kernel's page cache is dropped, 3FS answers
    try:
        for _ in range(40):
            offset, length = rng.randrange(len(reference) + 10), rng.randrange(1, 300_000)
            assert os.pread(fd, length, offset) == bytes(reference[offset:offset + length])
    finally:
        os.close(fd)
    assert path.read_bytes() == reference


def test_an_unlinked_open_file_stays_readable_and_writable(mounted):
    path = mounted / "unlinked.bin"
    path.write_bytes(b"before")
    with open(path, "r+b") as f:
        os.remove(path)
        assert not path.exists()
        f.seek(0, os.SEEK_END)
        f.write(b" and after")
        f.flush()
        f.seek(0)
        assert f.read() == b"before and after"
        assert os.fstat(f.fileno()).st_size == len(b"before and after")


def test_concurrent_writers_and_readers_and_a_long_listing(mounted):
    """8 threads write and read back their own files at once; READDIR pages through 300 names."""
    directory = mounted / "many"
    directory.mkdir()

    def write_and_read(index: int) -> bool:
        data = random.Random(index).randbytes(150_000 + index)
        (directory / f"thread-{index}.bin").write_bytes(data)
        return (directory / f"thread-{index}.bin").read_bytes() == data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(write_and_read, range(8)))
    names = {f"thread-{i}.bin" for i in range(8)} | {f"name-{i:03d}-{'x' * 40}" for i in range(300)}
    for name in names - {f"thread-{i}.bin" for i in range(8)}:
        (directory / name).write_bytes(b"")
    assert sorted(os.listdir(directory)) == sorted(names)


def test_the_package_s_mount_client_runs_over_the_mount(mounted):
    """``connect("3fs:///mountpoint")`` (``MountClient``, written for hf3fs_fuse mounts) works on this one."""
    from storage.threefs import connect

    client = connect(f"3fs://{mounted}")
    try:
        client.makedirs("/via-mount-client")
        with client.open("/via-mount-client/f.bin", "wb") as f:
            f.write(b"m" * 300_000)
        assert client.stat("/via-mount-client/f.bin").size == 300_000
        assert client.listdir("/via-mount-client") == ["f.bin"]
        with client.open("/via-mount-client/f.bin", "rb") as f:
            assert f.pread(10, 299_995) == b"m" * 5
        client.remove("/via-mount-client", recursive=True)
        assert not (mounted / "via-mount-client").exists()
    finally:
        client.close()


def test_polars_scan_parquet_reads_what_polars_wrote_through_the_mount(mounted):
    polars = pytest.importorskip("polars")
    frame = polars.DataFrame({"id": list(range(5000)), "name": [f"row-{i}" for i in range(5000)],
                              "value": [i * 0.5 for i in range(5000)]})
    (mounted / "tables").mkdir()
    frame.write_parquet(mounted / "tables/part-0.parquet")
    assert polars.scan_parquet(mounted / "tables/part-0.parquet").collect().equals(frame)
    lazy = polars.scan_parquet(str(mounted / "tables") + "/*.parquet").filter(polars.col("id") < 10)
    assert lazy.collect()["name"].to_list() == [f"row-{i}" for i in range(10)]


def test_the_client_sees_what_the_mount_wrote_and_the_mount_goes_with_its_process(fuse_usable, tmp_path):
    cluster = tmp_path / "cluster"
    seed_cluster(cluster, {"/in/from-client.bin": b"client bytes" * 1000})
    mount = Mount(cluster, tmp_path / "mnt")
    try:
        assert (mount.path / "in/from-client.bin").read_bytes() == b"client bytes" * 1000
        (mount.path / "out").mkdir()
        (mount.path / "out/from-mount.bin").write_bytes(b"mount bytes" * 30_000)
        (mount.path / "out/tmp.bin").write_bytes(b"renamed")
        os.rename(mount.path / "out/tmp.bin", mount.path / "in/renamed.bin")
    finally:
        status = mount.stop()
    assert status == 0, mount.process.stderr.read()
    assert not os.path.ismount(mount.path) and os.listdir(mount.path) == []
    assert client_view(cluster) == {"/in/from-client.bin": b"client bytes" * 1000,
                                    "/out/from-mount.bin": b"mount bytes" * 30_000,
                                    "/in/renamed.bin": b"renamed"}


def test_a_mount_started_with_exit_with_parent_unmounts_when_its_parent_is_killed(fuse_usable, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    launcher = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-m', 'storage.threefs', 'mount', "
                f"'3fs+embedded://{tmp_path / 'cluster'}', '{mountpoint}', '--exit-with-parent']); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert time.monotonic() < deadline, "the mount did not come up"
            time.sleep(0.05)
        parent.kill()  # SIGKILL: the launcher cannot clean up; the kernel tells the mount
        parent.wait()
        deadline = time.monotonic() + 20
        while os.path.ismount(mountpoint):
            assert time.monotonic() < deadline, "the mount outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_tcp_cluster_mount_and_a_client_see_each_other_at_close_fsync_and_open(fuse_usable, tmp_path):
    with ProcessCluster(tmp_path / "cluster", SHAPE, mgmtd_standbys=0) as cluster:
        client = cluster.client()
        mount = Mount(tmp_path / "cluster", tmp_path / "mnt", scheme="3fs+tcp")
        try:
            with client.open("/shared.bin", "wb") as f:
                f.write(b"version 1")
            assert (mount.path / "shared.bin").read_bytes() == b"version 1"
            with client.open("/shared.bin", "wb") as f:
                f.write(b"version 2, longer")
            assert (mount.path / "shared.bin").read_bytes() == b"version 2, longer"  # close-to-open
            client.rename("/shared.bin", "/moved.bin")
            assert not (mount.path / "shared.bin").exists()
            assert (mount.path / "moved.bin").read_bytes() == b"version 2, longer"

            fd = os.open(mount.path / "growing.bin", os.O_WRONLY | os.O_CREAT)
            try:
                os.write(fd, b"a" * 100_000)
                os.close(os.dup(fd))  # close(2) of a duplicate: FLUSH, the file stays open
                assert client.stat("/growing.bin").size == 100_000
                os.write(fd, b"b" * 50_000)
                os.fsync(fd)
                assert client.stat("/growing.bin").size == 150_000
            finally:
                os.close(fd)
            with client.open("/growing.bin", "rb") as f:
                assert f.read() == b"a" * 100_000 + b"b" * 50_000
        finally:
            status = mount.stop()
            client.close()
    assert status == 0, mount.process.stderr.read()


def test_mounting_on_a_non_empty_directory_fails_with_the_reason(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_bytes(b"")
    try:
        result = subprocess.run([sys.executable, "-m", "storage.threefs", "mount",
                                 f"3fs+embedded://{tmp_path / 'cluster'}", str(tmp_path / "busy")],
                                cwd=REPO, capture_output=True, text=True, timeout=30)
    finally:
        if os.path.ismount(tmp_path / "busy"):  # it mounted after all: never leave a mount behind
            subprocess.run(["umount", "-l", str(tmp_path / "busy")], check=False)
    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert not (tmp_path / "cluster").exists()  # refused before connecting
