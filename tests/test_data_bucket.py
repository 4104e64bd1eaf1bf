"""Datasets in a bucket (`eqr_jax.data.bucket`, on the `gcs_bucket` emulator): a gs:// folder is
read through a checked local copy that gives the same batches as the local folder, is reused
while the bucket is unchanged and copied again when it changes; unfinished uploads and missing
folders are one-line errors; builds into a bucket upload train/dataset.json last and read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_array_dataset
from eqr_jax import config as config_lib
from eqr_jax import storage
from eqr_jax.data import bucket
from eqr_jax.data import format as fmt
from eqr_jax.data.arrays import make_puzzles
from eqr_jax.data.loader import EvalLoader, TrainLoader


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """This test's own host cache, and a working directory in which a stray local ``gs:``
    folder would show."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "cache"
    assert not (tmp_path / "gs:").exists()


@pytest.fixture
def copies(monkeypatch):
    """The files `storage.copy_file` writes, in order (to see what is copied and when)."""
    seen, real = [], storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda src, dst: (seen.append(str(dst)),
                                                                real(src, dst))[1])
    return seen


def _batches(root, n=3):
    train = TrainLoader(root, 8, seed=3, prefetch=0)
    out = [next(iter(train)) for _ in range(n)]
    out += list(EvalLoader(root, 5))
    return out


def _upload(local, url):
    storage.copy_tree(local, storage.path(url))


def test_bucket_dataset_reads_as_local_through_a_reused_checked_copy(gcs_bucket, tmp_path, cache,
                                                                     copies):
    local = write_array_dataset(tmp_path / "local", make_puzzles(40, 0), make_puzzles(12, 1))
    url = gcs_bucket.url("data")
    _upload(local, url)
    copies.clear()
    want, got = _batches(local), _batches(url)
    assert len(got) == len(want) == 6
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    copied = storage.cache_dir_for(url, "data")
    # each file once, by the first open, into a temporary folder beside the cache
    assert sorted("/".join(Path(c).relative_to(copied.parent).parts[1:]) for c in copies) == \
        storage.files(local)
    assert bucket.local_dataset(url) == copied and (copied / bucket.MANIFEST).is_file()
    n = len(copies)
    fmt.load_split(url, "test")
    assert len(copies) == n  # unchanged bucket: the copy is reused, nothing downloaded
    assert [p.name for p in copied.parent.iterdir() if p.name.startswith(".")] == [
        f".{copied.name}.lock"]  # no temporary folder left

    # The bucket's test split changes (same sizes, new contents): copied again.
    x, y = make_puzzles(12, 7)
    fmt.write_split(local, "test", x, y, vocab_size=6)
    _upload(local, url)
    copies.clear()
    np.testing.assert_array_equal(fmt.load_split(url, "test").inputs, x)
    assert len(copies) == len(storage.files(local))
    # A damaged local copy (a truncated file) is not used either.
    with open(copied / "train" / "all__inputs.npy", "r+b") as f:
        f.truncate(100)
    copies.clear()
    np.testing.assert_array_equal(fmt.load_split(url, "train").inputs, make_puzzles(40, 0)[0])
    assert copies


def test_unfinished_uploads_and_missing_folders_are_one_line_errors(gcs_bucket, tmp_path,
                                                                      cache):
    local = write_array_dataset(tmp_path / "local", make_puzzles(16, 0), make_puzzles(4, 1))
    missing = gcs_bucket.url("nothing")
    with pytest.raises(config_lib.ConfigError,
                       match=rf"^--data {missing}: no such dataset folder in the bucket"):
        fmt.load_split(missing, "train")
    url = gcs_bucket.url("partial")
    root = storage.path(url)
    for rel in storage.files(local):
        if rel != bucket.COMPLETE_MARKER:
            storage.copy_file(local / rel, root / rel)
    with pytest.raises(fmt.DataFormatError,
                       match=rf"^{url}: no train/dataset.json among its 12 objects: an upload "
                             r"that is unfinished"):
        EvalLoader(url, 4)
    # Complete by its marker, but an array truncated: the dataset check names the bucket file.
    storage.copy_file(local / bucket.COMPLETE_MARKER, root / bucket.COMPLETE_MARKER)
    storage.write_bytes(root / "test" / "all__labels.npy",
                        (local / "test" / "all__labels.npy").read_bytes()[:90])
    with pytest.raises(fmt.DataFormatError,
                       match=rf"^{url}/test/all__labels.npy: cannot read") as e:
        fmt.load_split(url, "train")
    assert "\n" not in str(e.value)
    assert not storage.cache_dir_for(url, "data").exists()   # nothing half-checked kept
    assert [p.name for p in storage.cache_dir_for(url, "data").parent.iterdir()
            if p.name.endswith(".copy")] == []


def test_training_builds_a_missing_bucket_dataset_and_uploads_it_last_marker_last(
        gcs_bucket, tmp_path, cache, copies, monkeypatch):
    from eqr_jax.data import build as build_lib
    from eqr_jax.data import prepare

    url = gcs_bucket.url("sudoku4")
    cfg = config_lib.apply_overrides(config_lib.preset("tiny"), [f"data.path={url}",
                                                                 "data.global_batch_size=16"])
    with pytest.raises(config_lib.ConfigError, match=rf"--data {url} does not exist; pass "
                                                     r"--build"):
        prepare.check_data_path(cfg, config_lib.preset("tiny").data.path)
    assert prepare.check_data_path(cfg, None, build=True) is False

    def build(out, **kw):
        (Path(out) / ".cache").mkdir(parents=True)  # a generator's cache: never uploaded
        write_array_dataset(out, make_puzzles(32, 0), make_puzzles(8, 1))
    monkeypatch.setattr(build_lib, "build_sudoku_dataset", build)
    prepare.ensure_dataset(cfg, progress=False)
    uploaded = [c[len(url) + 1:] for c in copies]
    assert uploaded[-1] == bucket.COMPLETE_MARKER and uploaded[-2] == "test/dataset.json"
    assert sorted(uploaded) == gcs_bucket.objects(url) and ".cache" not in str(uploaded)
    assert prepare.check_data_path(cfg, None) is True
    copies.clear()
    splits = prepare.check_dataset(cfg)
    assert copies == []  # the build is this host's copy already: nothing downloaded
    assert splits["train"].num_examples == 32
    np.testing.assert_array_equal(splits["test"].inputs, make_puzzles(8, 1)[0])
    # what `eqr train --dry-run` reads: the metadata in the bucket
    from eqr_jax.plan import plan
    planned = plan(cfg)
    assert planned["data_status"] == "present" and planned["train_examples"] == 32


def test_eqr_data_into_a_bucket(gcs_bucket, cache, capsys):
    from eqr_jax.cli import data as data_cli

    url = gcs_bucket.url("maze8")
    argv = ["maze", "--out", url, "--grid", "8", "--train", "2", "--test", "1", "--min-len",
            "3", "--max-len", "8", "--no-progress"]
    assert data_cli.main(argv) == 0
    assert gcs_bucket.objects(url) == [
        "build_info.json", "identifiers.json", "test/all__group_indices.npy",
        "test/all__inputs.npy", "test/all__labels.npy", "test/all__puzzle_identifiers.npy",
        "test/all__puzzle_indices.npy", "test/dataset.json", "train/all__group_indices.npy",
        "train/all__inputs.npy", "train/all__labels.npy", "train/all__puzzle_identifiers.npy",
        "train/all__puzzle_indices.npy", "train/dataset.json"]
    assert fmt.load_split(url, "train").num_examples == 2
    assert json.loads(storage.read_text(storage.path(url) / "build_info.json"))["grid"] == 8
    capsys.readouterr()
    # A bucket dataset is not overwritten in place (other hosts may be reading it).
    assert data_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"eqr data: {url} already holds 14 files; remove it first") and \
        "\n" not in err
    # Generated puzzles never take Sudoku-Extreme's name, in a bucket either (nothing built).
    named = gcs_bucket.url("my-sudoku-extreme")
    assert data_cli.main(["sudoku", "--out", named, "--size", "4", "--train", "4", "--test", "2",
                          "--num-aug", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"eqr data: {named}: generated puzzles are not")
    assert gcs_bucket.objects(named) == [] and list((cache / "data").glob("*sudoku*")) == []


def test_shared_storage_fingerprint_of_a_bucket_dataset(gcs_bucket, tmp_path, cache):
    from eqr_jax.shared_storage import _fingerprint_data

    local = write_array_dataset(tmp_path / "local", make_puzzles(16, 0), make_puzzles(4, 1))
    url = gcs_bucket.url("fp")
    assert _fingerprint_data(url) == ""
    _upload(local, url)
    # the same dataset whether read in the bucket or on a host's disk
    assert _fingerprint_data(url) == _fingerprint_data(local) != ""
    fmt.write_split(local, "test", *make_puzzles(5, 1), vocab_size=6)
    assert _fingerprint_data(url) != _fingerprint_data(local)


def test_metadata_readers_read_the_bucket_without_copying(gcs_bucket, tmp_path, cache, copies):
    from eqr_jax.interop import reference_data_sizes

    local = write_array_dataset(tmp_path / "local", make_puzzles(16, 0), make_puzzles(4, 1))
    url = gcs_bucket.url("meta")
    _upload(local, url)
    copies.clear()
    assert fmt.dataset_info(url, "test").total_samples == 4
    # `eqr convert/solve --reference X --data gs://...`: seq_len and vocab_size from the bucket
    assert reference_data_sizes({}, data=url) == {"seq_len": 16, "vocab_size": 6}
    assert copies == [] and not storage.cache_dir_for(url, "data").exists()
    with pytest.raises(ValueError, match=r"^gs://b/x: write_split writes a local folder"):
        fmt.write_split("gs://b/x", "train", *make_puzzles(2, 0))


def test_processes_of_one_host_copy_once(gcs_bucket, tmp_path, cache, copies):
    """Three openers at once (threads hold separate lock-file descriptions, as processes do):
    one copies, the others wait and reuse its copy; no temporary folder is left."""
    from concurrent.futures import ThreadPoolExecutor

    local = write_array_dataset(tmp_path / "local", make_puzzles(16, 0), make_puzzles(4, 1))
    url = gcs_bucket.url("together")
    _upload(local, url)
    copies.clear()
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda _: bucket.local_dataset(url), range(3)))
    assert got == [storage.cache_dir_for(url, "data")] * 3
    assert len(copies) == len(storage.files(local))
    assert sorted(p.name for p in got[0].parent.iterdir()) == [f".{got[0].name}.lock",
                                                                got[0].name]
