"""storage.location: URLs -> (file client, directory inside it)."""

import pytest

from storage.location import open_location, split_url


def test_plain_directory_and_file_url(tmp_path):
    with open_location(tmp_path / "run", create=True) as loc:
        with loc.client.open(loc.join("a.txt"), "wb") as f:
            f.write(b"hello")
    assert (tmp_path / "run" / "a.txt").read_bytes() == b"hello"
    with open_location(f"file://{tmp_path}/run") as loc:
        assert loc.client.listdir(loc.path) == ["a.txt"]
        assert loc.child("sub").os_path == str(tmp_path / "run" / "sub")


def test_embedded_cluster_found_above_the_path(tmp_path):
    url = f"3fs+embedded://{tmp_path}/fs"
    with open_location(url, create=True) as root:
        assert root.path == "/"
        root.client.makedirs("/data")
        with root.client.open("/data/x.bin", "wb") as f:
            f.write(b"xyz")
    with open_location(f"{url}/data") as inner:
        assert inner.path == "/data"
        assert inner.client.listdir(inner.path) == ["x.bin"]
        assert inner.child("sub").join("y") == "/data/sub/y"
        assert inner.os_path is None
    with open_location(f"{url}/new/dir", create=True) as made:
        assert made.client.exists("/new/dir")


@pytest.mark.parametrize("url, words", [
    ("s3://bucket/x", "unknown scheme 's3'"),
    ("3fs+embedded://host/x", "no host"),
])
def test_bad_urls_name_the_problem(url, words):
    with pytest.raises(ValueError, match=words):
        split_url(url)


def test_missing_things_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_location(tmp_path / "nope")
    with pytest.raises(ValueError, match="no 3FS cluster"):
        open_location(f"3fs+embedded://{tmp_path}/nope")
    with pytest.raises(ValueError, match="only 3fs\\+embedded"):
        open_location(f"3fs+tcp://{tmp_path}/nope", create=True)
    with open_location(f"3fs+embedded://{tmp_path}/fs", create=True):
        pass
    with pytest.raises(ValueError, match="/missing does not exist in the 3FS"):
        open_location(f"3fs+embedded://{tmp_path}/fs/missing")
