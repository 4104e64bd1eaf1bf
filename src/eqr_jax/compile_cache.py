"""JAX's persistent compilation cache for ``eqr train``, ``eqr eval`` and
``experiments/paper_eval.py`` (docs/accelerators.md, "Compilation cache").

A restarted or preempted run compiles the same programs again; with the cache it reads them
from disk instead. The directory is ``--compile-cache DIR``, else ``$EQR_COMPILE_CACHE``, else
``$XDG_CACHE_HOME/eqr-jax/xla`` (``~/.cache/eqr-jax/xla``); ``off`` switches it off. Programs
that compile in under JAX's threshold (``jax_persistent_cache_min_compile_time_secs``, 1 s by
default) are not written.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "EQR_COMPILE_CACHE"
OFF = ("off", "none", "0", "")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eqr-jax" / "xla"


def resolve(setting: str | None = None) -> Path | None:
    """The cache directory the flag / environment / default name, or None when it is off."""
    value = setting if setting is not None else os.environ.get(ENV)
    if value is None:
        return default_dir()
    return None if value.strip().lower() in OFF else Path(value).expanduser()


def enable(setting: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `resolve(setting)` (before the first
    compilation of the process: JAX reads the setting once). Returns the directory, or None
    when off. An unusable directory is a `ConfigError` naming it."""
    path = resolve(setting)
    if path is None:
        return None
    from eqr_jax.config import ConfigError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--compile-cache {path}: cannot create it ({e.strerror or e}); pass "
                          "another directory or --compile-cache off") from None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
