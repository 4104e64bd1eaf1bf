"""The path layer (`eqr_jax.storage`): the same calls on local paths and on a bucket (the
emulator of `gcs_bucket`), atomic writes, copies both ways, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from eqr_jax import storage


def test_local_paths_stay_pathlib_and_other_schemes_are_refused(tmp_path):
    p = storage.path(str(tmp_path / "a"))
    assert isinstance(p, Path)
    storage.write_text(p / "x.json", "{}")
    assert storage.read_text(p / "x.json") == "{}"
    assert [f.name for f in p.iterdir()] == ["x.json"]  # no temporary file left beside it
    for url in ("s3://b/run", "http://host/run"):
        with pytest.raises(storage.StorageError, match=r"--out=.*:// is not supported"):
            storage.path(url, name="--out")


def test_bucket_round_trip_and_tree_copies(gcs_bucket, tmp_path):
    url = gcs_bucket.url("storage")
    root = storage.path(url)
    assert storage.is_remote(root) and str(root) == url
    storage.write_text(root / "a" / "x.txt", "hello")
    storage.write_bytes(root / "b.bin", b"\x00\x01")
    assert storage.read_text(root / "a" / "x.txt") == "hello"
    assert (root / "a").is_dir() and not (root / "nope").exists()
    assert storage.files(root) == ["a/x.txt", "b.bin"]
    local = tmp_path / "copy"
    assert storage.copy_tree(root, local) == ["a/x.txt", "b.bin"]
    assert (local / "b.bin").read_bytes() == b"\x00\x01"
    # upload only what changed since the last call
    seen: dict = {}
    assert storage.upload_tree(local, root / "up", only_changed=seen) == ["a/x.txt", "b.bin"]
    assert storage.upload_tree(local, root / "up", only_changed=seen) == []
    (local / "b.bin").write_bytes(b"\x02" * 3)
    assert storage.upload_tree(local, root / "up", only_changed=seen) == ["b.bin"]
    assert gcs_bucket.objects(url + "/up") == ["a/x.txt", "b.bin"]
    with storage.local_file(root / "plot.png") as f:
        f.write_bytes(b"png")
    assert storage.read_text(root / "plot.png") == "png"
    assert storage.cache_dir_for(url + "/data", "data").name.startswith("data-")


def test_upload_tree_tries_a_failed_file_again(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "events").write_bytes(b"abc")
    real, calls = storage.copy_file, []

    def flaky(a, b):
        calls.append(Path(b).name)
        if len(calls) == 1:
            raise OSError("connection reset")
        real(a, b)

    monkeypatch.setattr(storage, "copy_file", flaky)
    seen: dict = {}
    with pytest.raises(OSError, match="connection reset"):
        storage.upload_tree(src, dst, only_changed=seen)
    assert storage.upload_tree(src, dst, only_changed=seen) == ["events"]
    assert (dst / "events").read_bytes() == b"abc" and calls == ["events", "events"]


def test_listing_gives_sizes_and_versions_in_one_pass(gcs_bucket, tmp_path):
    local = tmp_path / "d"
    storage.write_bytes(local / "a" / "x.bin", b"123")
    storage.write_bytes(local / "b.json", b"{}")
    url = gcs_bucket.url("listing")
    assert storage.listing(url) == {} and storage.listing(local / "nope") == {}
    storage.copy_tree(local, storage.path(url))
    for root in (local, storage.path(url)):
        listed = storage.listing(root)
        assert {k: v[0] for k, v in listed.items()} == {"a/x.bin": 3, "b.json": 2}
    before = storage.listing(url)["a/x.bin"][1]
    storage.write_bytes(storage.path(url) / "a" / "x.bin", b"456")  # same size, new content
    size, after = storage.listing(url)["a/x.bin"]
    assert size == 3 and after != before
    # a sibling whose name starts with the folder's is not under it
    storage.write_bytes(storage.path(url + "x") / "c.bin", b"0")
    assert sorted(storage.listing(url)) == ["a/x.bin", "b.json"]
