"""JAX's persistent compilation cache for ``eqr train``, ``eqr eval`` and
``experiments/paper_eval.py`` (docs/accelerators.md, "Compilation cache").

A restarted or preempted run compiles the same programs again; with the cache it reads them
from disk instead. The directory is ``--compile-cache DIR``, else ``$EQR_COMPILE_CACHE``, else
``$XDG_CACHE_HOME/eqr-jax/xla`` (``~/.cache/eqr-jax/xla``); ``off`` switches it off. A
``gs://`` URL keeps the cache in a bucket, shared by every host of a pod (JAX reads and writes
it through etils epath). Programs that compile in under JAX's threshold
(``jax_persistent_cache_min_compile_time_secs``, 1 s by default) are not written.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "EQR_COMPILE_CACHE"
OFF = ("off", "none", "0", "")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eqr-jax" / "xla"


def resolve(setting: str | None = None):
    """The cache directory the flag / environment / default name (a `pathlib.Path`, or an
    `etils.epath.Path` for a ``gs://`` URL), or None when it is off. Another URL scheme is a
    `ConfigError` naming it."""
    value = setting if setting is not None else os.environ.get(ENV)
    if value is None:
        return default_dir()
    if value.strip().lower() in OFF:
        return None
    from eqr_jax import storage

    return storage.path(value, name="--compile-cache")


def enable(setting: str | None = None):
    """Point JAX's persistent compilation cache at `resolve(setting)` (before the first
    compilation of the process: JAX reads the setting once). Returns the directory, or None
    when off. An unusable local directory is a `ConfigError` naming it. A ``gs://`` URL is
    passed to JAX as it is: JAX opens its cache through etils epath, which reads and writes
    the bucket itself (every host of a pod then shares one cache); nothing is created
    beforehand, a bucket has no folders."""
    path = resolve(setting)
    if path is None:
        return None
    from eqr_jax import storage
    from eqr_jax.config import ConfigError

    if not storage.is_remote(path):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--compile-cache {path}: cannot create it ({e.strerror or e}); "
                              "pass another directory or --compile-cache off") from None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
