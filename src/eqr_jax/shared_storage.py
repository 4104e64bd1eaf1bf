"""The processes of one multi-process run must see the same storage: checked at start-up.

Every process of a run writes and reads its run directory (Orbax checkpoints are written by all
of them together and committed by process 0; a resume reads them everywhere). On a pod slice
without a shared mount each host has its own local disk, and such a run used to
hang at its first checkpoint. `check_shared_storage` finds that out before anything is built,
loaded or trained: process 0 writes a fresh random token into the run directory, every process
reads it back, and the processes exchange what they saw (and what they see of ``--data`` and
``--init-from``) through the coordination service's key-value store, so every process reaches
the same verdict and stops with the same one line.

What must be shared:

* the run directory (``--out``): the same directory, seen by every process (the token);
* ``--data``: every process reads only its own rows of each global batch, but the batches are
  drawn from a permutation of the whole dataset, so every process needs the *same* dataset:
  one shared folder, or an identical copy per host (compared by its ``dataset.json`` files and
  the sizes of its arrays); a ``gs://`` dataset is one shared folder (each host reads its own
  checked local copy, `eqr_jax.data.bucket`). Present on some processes and not on others is an error; absent on
  all of them is left to the build (process 0 builds, `eqr_jax.data.prepare.ensure_dataset`);
* ``--init-from``: every process loads the weights itself, so it must exist for every process
  and be the same source (the same file size, or the same checkpoint steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time

import jax

from eqr_jax import storage
from eqr_jax.config import ConfigError

TOKEN_NAME = ".eqr-shared-storage-check"
FIX = ("put it on storage every process sees: a shared mount (NFS, Filestore, or a bucket "
       "mounted with gcsfuse)")


class SharedStorageError(ConfigError):
    """The processes of one run do not see the same files (the message names what and how)."""


def _fingerprint_data(path) -> str:
    """What identifies a dataset folder's content cheaply: its splits' ``dataset.json`` and the
    sizes of their arrays ("" when absent). ``path``: a local folder or a ``gs://`` URL (one
    listing request and two small reads)."""
    from eqr_jax import storage
    from eqr_jax.data.bucket import dataset_dir

    root = dataset_dir(path)
    if not root.exists():
        return ""
    h = hashlib.sha256()
    for rel, (size, _) in storage.listing(root).items():
        split, _, name = rel.partition("/")
        if split not in ("train", "test") or "/" in name:
            continue
        h.update(rel.encode())
        h.update((root / rel).read_bytes() if name == "dataset.json" else str(size).encode())
    return "dataset " + h.hexdigest()[:16]


def _fingerprint_source(path) -> str:
    """What identifies an ``--init-from`` source (local or gs://) cheaply: a file's size, a run
    directory's checkpoint steps ("" when absent)."""
    if path.is_file():
        return f"file of {storage.size(path)} bytes"
    if not path.is_dir():
        return ""
    steps = sorted({p.name for d in (path, path / "checkpoints") if d.is_dir()
                    for p in d.iterdir() if p.name.isdigit()}, key=int)
    return "directory" + (f" with checkpoint steps {','.join(steps)}" if steps else "")


def _write_token(out_dir) -> str:
    nonce = secrets.token_hex(16)
    storage.makedirs(out_dir)
    storage.write_text(out_dir / TOKEN_NAME, nonce)  # readers see the whole nonce or none
    return nonce


def _sees_token(out_dir, nonce: str, wait_s: float = 5.0) -> bool:
    """Whether ``out_dir`` holds process 0's token (retried briefly: a network file system
    may show a new file to other hosts a moment later)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if storage.read_text(out_dir / TOKEN_NAME) == nonce:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _which(processes: list[int]) -> str:
    return ("process " if len(processes) == 1 else "processes ") + ", ".join(map(str, processes))


def check_shared_storage(out_dir: str | os.PathLike, data: str | os.PathLike | None = None,
                         init_from: str | os.PathLike | None = None) -> None:
    """Raise `SharedStorageError` on every process, with the same message, unless all processes
    see the same run directory ``out_dir`` (created when missing), the same dataset ``data``
    and the same ``init_from`` source (module docstring). One token file written and removed,
    one key-value exchange; nothing with one process.

    Raises `eqr_jax.sharding.PeerTimeoutError` when a peer does not reach the check within
    the distributed timeout.
    """
    if jax.process_count() == 1:
        return
    from eqr_jax.sharding import exchange

    out = storage.path(out_dir, name="--out")
    pi = jax.process_index()
    nonce = problem = ""
    if pi == 0:
        try:
            nonce = _write_token(out)
        except OSError as e:
            problem = f"process 0 cannot write its token in --out {out} ({e.strerror or e})"
    nonce = exchange(nonce or "!" + problem, "the shared-storage check")[0]
    if nonce.startswith("!"):
        raise SharedStorageError(nonce[1:])
    view = {"out": pi == 0 or _sees_token(out, nonce),
            "data": _fingerprint_data(data) if data else "",
            "init": (_fingerprint_source(storage.path(init_from, name="--init-from"))
                     if init_from else "")}
    views = [json.loads(v) for v in exchange(json.dumps(view), "the shared-storage check")]
    if pi == 0:  # every process has read it by now
        (out / TOKEN_NAME).unlink(missing_ok=True)
    problem = verdict(views, out, data, init_from)
    if problem:
        raise SharedStorageError(problem)


def verdict(views: list[dict], out, data=None, init_from=None) -> str | None:
    """What is wrong with the processes' ``views`` (one dict per process, in process order:
    ``out`` whether it saw process 0's token, ``data`` / ``init`` the fingerprints of ``data``
    and ``init_from``, "" when absent), or None when they agree."""
    pc = len(views)
    blind = [i for i, v in enumerate(views) if not v["out"]]
    if blind:
        return (f"{_which(blind)} of {pc} {'does' if len(blind) == 1 else 'do'} not see the "
                f"run directory --out {out} that process 0 writes (each host has its own "
                f"disk?): every process writes and reads the run's checkpoints, so {FIX}")
    for key, flag, path, what in (
            ("data", "--data", data, "every process draws its rows from the same shuffled "
             "dataset"),
            ("init", "--init-from", init_from, "every process loads these weights")):
        seen = [v[key] for v in views]
        if len(set(seen)) == 1:
            continue
        missing = [i for i, s in enumerate(seen) if not s]
        if missing:
            return (f"{flag} {path} is missing on {_which(missing)} of {pc} but present on "
                    f"{_which([i for i, s in enumerate(seen) if s])}: {what}, so {FIX}, or "
                    "copy the same files to every host")
        other = next(i for i, s in enumerate(seen) if s != seen[0])
        return (f"{flag} {path} differs between process 0 ({seen[0]}) and process {other} "
                f"({seen[other]}): {what}, so {FIX}, or copy the same files to every host")
    return None


def check_all_see(path: str | os.PathLike, what: str, or_else: str = "") -> None:
    """Raise `SharedStorageError` on every process unless every process sees ``path`` (e.g. a
    dataset process 0 has just built; ``what`` names it, ``or_else`` is the fix without shared
    storage); nothing with one process."""
    if jax.process_count() == 1:
        return
    from eqr_jax.sharding import exchange

    from eqr_jax.data.bucket import dataset_dir

    seen = exchange("1" if dataset_dir(path).exists() else "", f"the check of {what}")
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise SharedStorageError(
            f"{what} {path} is missing on {_which(missing)} of {len(seen)} after process 0 "
            f"wrote it: {FIX}" + (f", or {or_else}" if or_else else ""))
