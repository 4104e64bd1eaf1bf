"""The persistent compilation cache of `eqr train` / `eqr eval` / paper_eval
(`eqr_jax.compile_cache`): where it goes, how it is switched off, and that compiled programs
land there (in a subprocess: JAX reads the setting once per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from eqr_jax import compile_cache
from eqr_jax.config import ConfigError


def test_the_flag_then_the_environment_then_a_per_user_default(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == tmp_path / "xdg" / "eqr-jax" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve() == tmp_path / "env"
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compile_cache.resolve("off") is None and compile_cache.enable("OFF") is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.resolve() is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create it"):
        compile_cache.enable(str(blocker / "cache"))


def test_tests_do_not_write_the_users_cache():
    assert os.environ[compile_cache.ENV] == "off"  # conftest


def test_compiled_programs_are_written_there(tmp_path):
    """(The restart time it saves is measured by benchmarks/compile_cache_restart.py.)"""
    code = ("import sys, jax, jax.numpy as jnp\n"
            "from eqr_jax import compile_cache\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "compile_cache.enable(sys.argv[1])\n"
            "print(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(3)).sum())\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert [f for f in (tmp_path / "c").rglob("*") if f.is_file()]


def test_compiled_programs_are_written_to_a_bucket(gcs_bucket, tmp_path):
    """JAX's cache takes the gs:// URL itself (etils epath): entries land as objects, and no
    local ``gs:`` folder is made."""
    url = gcs_bucket.url("xla")
    code = ("import sys, jax, jax.numpy as jnp\n"
            "from eqr_jax import compile_cache\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "print(compile_cache.enable(sys.argv[1]))\n"
            "print(jax.jit(lambda x: jnp.cos(x) * 3 - 1)(jnp.ones(3)).sum())\n")
    p = subprocess.run([sys.executable, "-c", code, url], cwd=tmp_path,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == url
    assert [o for o in gcs_bucket.objects(url) if o.endswith("-cache")], gcs_bucket.objects(url)
    assert not (tmp_path / "gs:").exists()
    with pytest.raises(ConfigError, match="--compile-cache=s3://b/x: .*not supported"):
        compile_cache.enable("s3://b/x")
