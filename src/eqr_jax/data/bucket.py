"""Datasets in a Cloud Storage bucket (``gs://bucket/data/sudoku4``): read through a local copy,
built locally and uploaded (docs/data.md, "Datasets in a bucket").

Reading: the loaders memory-map their arrays, which a bucket cannot offer, so `local_dataset`
copies the folder once per host into ``storage.cache_dir_for(url, "data")`` (under
``$EQR_CACHE_DIR``, else ``~/.cache/eqr-jax``) and returns that local folder. The copy

* is made in a temporary sibling folder, checked with `load_split` (the project's dataset check:
  every array present and readable, row counts against ``dataset.json``), then renamed into
  place, so a killed copy is never taken for a complete one;
* is made by one process at a time per host (a lock file); the others wait and reuse it;
* records the bucket's listing (sizes and CRC32C of every object); the next open lists the
  bucket again (one request) and reuses the copy only when the listing is unchanged and the
  local files still have their sizes, else copies again.

Writing: a bucket has no atomic folder rename, so a dataset is uploaded with its
``dataset.json`` files last and ``train/dataset.json`` the very last object: while
``train/dataset.json`` is absent the folder is a partial upload, and `local_dataset` says so in
one line instead of reading it. `building_into` gives the local folder a builder writes into
and uploads it on success (used by `eqr data --out gs://...` and by `eqr train` building its
missing ``gs://`` dataset).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from eqr_jax import storage
from eqr_jax.config import ConfigError
from eqr_jax.data.format import DataFormatError

__all__ = ["local_dataset", "dataset_dir", "building_into", "upload_dataset", "MANIFEST",
           "COMPLETE_MARKER"]

#: Written into a local copy: the bucket listing it was copied from.
MANIFEST = ".eqr-bucket-copy.json"
#: The object uploaded last; a folder without it is an unfinished upload.
COMPLETE_MARKER = "train/dataset.json"
#: How often a copy is retried when the bucket changes while it is being copied.
_COPY_TRIES = 3


def dataset_dir(value, name: str = "--data"):
    """``value`` as a folder path: `pathlib.Path` when local (as given, not expanded, as the
    loaders have always read it), `etils.epath.Path` for ``gs://`` (another scheme raises
    `StorageError` naming ``name``)."""
    if "://" in str(value):
        return storage.path(value, name=name)
    return Path(value)


def _hidden(rel: str) -> bool:
    """A name no dataset reads: a generator's ``.cache`` folder, this module's manifest."""
    return any(part.startswith(".") for part in rel.split("/"))


def _dataset_listing(url) -> dict[str, list]:
    return {rel: list(v) for rel, v in storage.listing(url).items() if not _hidden(rel)}


def _splits(names) -> list[str]:
    return sorted(rel.split("/")[0] for rel in names
                  if rel.count("/") == 1 and rel.endswith("/dataset.json"))


def _check_complete(url: str, remote: dict) -> None:
    if not remote:
        raise ConfigError(f"--data {url}: no such dataset folder in the bucket (nothing is "
                          "stored under this prefix)")
    if COMPLETE_MARKER not in remote:
        raise DataFormatError(
            f"{url}: no {COMPLETE_MARKER} among its {len(remote)} objects: an upload that is "
            f"unfinished or was interrupted (it is uploaded last); finish the upload, or remove "
            f"the folder (gcloud storage rm -r {url}) and build it again")
    unfinished = sorted({rel.split("/")[0] for rel in remote if rel.count("/") == 1}
                        - set(_splits(remote)))
    if unfinished:
        raise DataFormatError(f"{url}/{unfinished[0]}: no dataset.json (a partial upload?)")


def _cache_matches(cache: Path, remote: dict) -> bool:
    """Whether ``cache`` is a complete copy of the bucket folder whose listing is ``remote``."""
    try:
        recorded = json.loads((cache / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if recorded != remote:
        return False
    try:
        return all((cache / rel).stat().st_size == size for rel, (size, _) in remote.items())
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path, busy: str | None = None) -> Iterator[None]:
    """An advisory lock on file ``path`` for this host's processes, held inside the block;
    with ``busy`` a lock held elsewhere raises `ConfigError` (``busy``) at once instead of
    waiting. Without flock (Windows) nothing is locked: the renames still keep copies whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl
        except ImportError:
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except OSError:
            if busy is None:
                raise
            raise ConfigError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _host_lock(cache: Path):
    """One process per host at a time copies or installs ``cache``."""
    return _file_lock(cache.parent / f".{cache.name}.lock")


def _record_copy(folder: Path, url: str, files: dict) -> None:
    """Write into ``folder`` the bucket listing ``files`` of ``url`` it is a copy of."""
    (folder / MANIFEST).write_text(json.dumps({"url": url, "files": files}))


def _install(tmp: Path, cache: Path) -> None:
    """Rename the finished copy ``tmp`` into ``cache``, replacing a stale copy (a process still
    memory-mapping the old files keeps reading them: unlinked files live until unmapped)."""
    old = None
    if cache.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", suffix=".old", dir=cache.parent))
        os.replace(cache, old / "copy")
    os.rename(tmp, cache)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _verify(folder: Path, url: str, splits: list[str]) -> None:
    """The loader's own check on every split of a fresh copy; errors name the bucket, not the
    temporary folder."""
    from eqr_jax.data.format import load_split

    for split in splits:
        try:
            load_split(folder, split, mmap=True)
        except DataFormatError as e:
            raise DataFormatError(str(e).replace(str(folder), url)) from None


def local_dataset(root) -> Path:
    """The local folder to read dataset ``root`` from: ``root`` itself when local; for a
    ``gs://`` folder this host's checked copy of it (module docstring), copied when missing or
    when the bucket's files changed since.

    Raises `ConfigError` (no such folder in the bucket) or `DataFormatError` (an unfinished
    upload, or a copy that fails the dataset check), each one line naming the URL.
    """
    if "://" not in str(root):
        return Path(root)
    url = str(storage.path(root, name="--data")).rstrip("/")
    remote = _dataset_listing(url)
    _check_complete(url, remote)
    cache = storage.cache_dir_for(url, "data")
    if _cache_matches(cache, remote):
        return cache
    with _host_lock(cache):
        for _ in range(_COPY_TRIES):
            if _cache_matches(cache, remote):  # another process on this host copied it
                return cache
            tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", suffix=".copy",
                                        dir=cache.parent))
            try:
                src = storage.path(url)
                for rel in remote:
                    storage.copy_file(src / rel, tmp / rel)
                now = _dataset_listing(url)
                if now != remote:  # changed while copying: the copy may mix two versions
                    shutil.rmtree(tmp, ignore_errors=True)
                    _check_complete(url, now)
                    remote = now
                    continue
                _verify(tmp, url, _splits(remote))
                _record_copy(tmp, url, remote)
                _install(tmp, cache)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            print(f"[eqr] copied {url} to {cache} ({len(remote)} files)", flush=True)
            return cache
    raise DataFormatError(f"{url}: its files kept changing while they were copied "
                          f"({_COPY_TRIES} tries); is an upload still running?")


def upload_dataset(local: str | os.PathLike, url: str) -> list[str]:
    """Upload the dataset folder ``local`` to ``url`` so that it appears complete at once to
    `local_dataset`: the arrays first, then the ``dataset.json`` files, ``train/dataset.json``
    last (hidden names, e.g. a generator's ``.cache``, stay local). Returns the paths uploaded."""
    local = Path(local)
    if not (local / COMPLETE_MARKER).is_file():
        raise DataFormatError(f"{local}: no {COMPLETE_MARKER}; not a dataset folder to upload")
    names = sorted((rel for rel in storage.files(local) if not _hidden(rel)),
                   key=lambda r: (r.endswith("/dataset.json"), r == COMPLETE_MARKER, r))
    dst = storage.path(url)
    for rel in names:
        storage.copy_file(local / rel, dst / rel)
    return names


@contextlib.contextmanager
def building_into(url: str) -> Iterator[Path]:
    """A local folder to build the bucket dataset ``url`` in. On a clean exit it is uploaded
    (`upload_dataset`) and kept as this host's checked copy of ``url`` (nothing downloaded
    afterwards); on an error it is removed, unless it holds a generator's ``.cache`` that the
    next build resumes from (it lives in this host's cache folder, so the next build finds it).

    Raises `ConfigError` when ``url`` already holds files (a bucket dataset is never
    overwritten in place: readers on other hosts could see a mix), or when another build into
    ``url`` is running on this host.
    """
    url = str(storage.path(url, name="--out")).rstrip("/")
    held = _dataset_listing(url)
    if held:
        raise ConfigError(f"{url} already holds {len(held)} files; remove it first "
                          f"(gcloud storage rm -r {url}) or choose another folder")
    cache = storage.cache_dir_for(url, "data")
    stage = cache.parent / f".{cache.name}.partial"
    with _file_lock(cache.parent / f".{cache.name}.build-lock",
                    busy=f"another build into {url} is running on this host ({stage})"):
        stage.mkdir(exist_ok=True)
        try:
            yield stage
            upload_dataset(stage, url)
        except BaseException:
            if not (stage / ".cache").exists():
                shutil.rmtree(stage, ignore_errors=True)
            raise
        shutil.rmtree(stage / ".cache", ignore_errors=True)
        remote = _dataset_listing(url)
        _record_copy(stage, url, remote)
        with _host_lock(cache):
            _install(stage, cache)
    print(f"[eqr] uploaded {url} ({len(remote)} files)", flush=True)
