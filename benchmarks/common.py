"""Helpers shared by the benchmark scripts in this folder.

Timing, compiled and runtime memory, a peak-matmul measurement (the MFU denominator), the model
configurations of the benchmarks; tables and JSON come from `eqr_jax.reporting` (re-exported
here). Nothing here asserts on speed: scripts print numbers and ratios measured in the same run,
tests check only that the numbers exist. The scripts import it as a sibling module
(``python benchmarks/<script>.py`` makes this folder the first place imports look).

Typical use::

    import common as bm

    f = jax.jit(step)
    mem = bm.compiled_memory(f, params, state)          # compile once, sizes from XLA
    t = bm.time_fn(f, params, state, warmup=1, repeats=5) # Timing(median_s, ...)
    peak = bm.peak_matmul_tflops("bfloat16")              # {"tflops": ..., "n": ...}
    rows.append({"batch": 64, "time_ms": t.median_s * 1e3, "peak_MiB": mem["peak_bytes"] / 2**20})
    bm.print_table(rows, title="my sweep")
    bm.write_json("benchmarks/results/x.json", {"rows": rows})  # adds bm.machine_info()
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from eqr_jax.measure import compiled_memory, memory_of  # noqa: F401
from eqr_jax.reporting import (describe_machine, format_table, machine_info,  # noqa: F401
                               print_table, write_json)

MiB = 2 ** 20


# ----------------------------------------------------------------------------------------------
# Backend and sizes


def backend() -> str:
    """``cpu``, ``gpu`` or ``tpu`` (the default backend of this process)."""
    return jax.default_backend()


def on_accelerator() -> bool:
    return backend() != "cpu"


def by_backend(cpu: Any, accelerator: Any, *, quick: Any = None, is_quick: bool = False) -> Any:
    """Pick a size: ``quick`` (when ``is_quick`` and given), else ``cpu`` or ``accelerator``."""
    if is_quick and quick is not None:
        return quick
    return accelerator if on_accelerator() else cpu


# ----------------------------------------------------------------------------------------------
# Timing


class Timing(NamedTuple):
    """Wall-clock seconds of ``repeats`` timed calls (after warm-up), each waited to completion."""

    median_s: float
    min_s: float
    mean_s: float
    repeats: int
    times_s: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "mean_s": self.mean_s,
                "repeats": self.repeats}


def block(tree: Any) -> Any:
    """`jax.block_until_ready` on every array leaf (non-arrays are ignored)."""
    return jax.block_until_ready(tree)


def time_fn(fn: Callable, *args, warmup: int = 1, repeats: int = 5, min_total_s: float = 0.0,
            max_repeats: int = 1000, **kwargs) -> Timing:
    """Time ``fn(*args, **kwargs)``: ``warmup`` untimed calls (compilation), then at least
    ``repeats`` timed calls, more while their total is under ``min_total_s`` (capped at
    ``max_repeats``). Each call is waited for with `block_until_ready`; returns median/min/mean.
    """
    for _ in range(warmup):
        block(fn(*args, **kwargs))
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < max_repeats):
        t0 = time.perf_counter()
        block(fn(*args, **kwargs))
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), statistics.fmean(times), len(times),
                  tuple(times))


# ----------------------------------------------------------------------------------------------
# Memory (compiled sizes: `eqr_jax.measure`, re-exported above)


def device_memory_stats(device: Any = None) -> dict | None:
    """The runtime allocator's statistics (``bytes_in_use``, ``peak_bytes_in_use``, ...) on GPU/TPU;
    None on CPU. The peak is a process-wide high-water mark (it never goes down)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return dict(stats) if stats else None


def runtime_peak_bytes(device: Any = None) -> int | None:
    stats = device_memory_stats(device)
    return None if stats is None else int(stats.get("peak_bytes_in_use", 0))


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an out-of-memory error from XLA."""
    msg = str(err)
    return "RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg or "out of memory" in msg


# ----------------------------------------------------------------------------------------------
# Peak matmul rate (the MFU denominator)


def peak_matmul_tflops(dtype: str = "bfloat16", n: int | None = None, *, repeats: int = 5,
                       chain: int | None = None) -> dict:
    """Measured TFLOP/s of square ``n x n`` matmuls in ``dtype`` on the default device.

    A jitted chain of ``chain`` dependent matmuls (so dispatch overhead is amortised) is timed;
    the best of ``repeats`` calls is used (peak, not typical). Default ``n``: 8192 on an
    accelerator, 1024 on CPU. Returns ``{"dtype", "n", "chain", "tflops", "seconds"}``.
    """
    dt = jnp.dtype(dtype)
    n = n or (8192 if on_accelerator() else 1024)
    chain = chain or (8 if on_accelerator() else 2)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    # Scaled so repeated products stay O(1) in any dtype.
    a = (jax.random.normal(ka, (n, n), jnp.float32) / math.sqrt(n)).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)

    @jax.jit
    def run(a, b):
        def body(x, _):
            return jnp.dot(a, x, preferred_element_type=dt), None
        return jax.lax.scan(body, b, None, length=chain)[0]

    t = time_fn(run, a, b, warmup=1, repeats=repeats)
    flops = chain * 2 * n ** 3
    return {"dtype": str(dt), "n": n, "chain": chain, "tflops": flops / t.min_s / 1e12,
            "seconds": t.min_s}


# ----------------------------------------------------------------------------------------------
# Output


def default_out(name: str, directory: str | os.PathLike = "benchmarks/results") -> Path:
    """``benchmarks/results/<backend>-<name>.json`` (e.g. ``cpu-sandbox-...`` is chosen by hand)."""
    return Path(directory) / f"{backend()}-{name}.json"


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 90) -> Path:
    """Save a matplotlib figure (PNG, small dpi to keep it light) and close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# ----------------------------------------------------------------------------------------------
# Model configurations used by the benchmarks

BENCH_PRESETS = ("sudoku", "maze", "tiny", "tiny-attn", "micro")


def model_preset(name: str, **overrides):
    """`ModelConfig` of a benchmark preset: the ``sudoku`` / ``maze`` / ``tiny`` run presets, or
    ``tiny-attn`` (the tiny model with attention + RoPE instead of mlp_t, to exercise the
    attention path at test size) or ``micro`` (the tiny model cut to one recursion of one
    L-cycle, 2 blocks per step: the smallest program, for smoke tests).
    ``overrides`` are `ModelConfig` fields (e.g. forward_dtype)."""
    import dataclasses  # noqa: PLC0415

    from eqr_jax.config import preset  # noqa: PLC0415

    if name == "tiny-attn":
        cfg = dataclasses.replace(preset("tiny").model, mlp_t=False, pos_encodings="rope")
    elif name == "micro":
        cfg = dataclasses.replace(preset("tiny").model, H_cycles=1, L_cycles=1, hidden_size=32)
    elif name in ("sudoku", "maze", "tiny"):
        cfg = preset(name).model
    else:
        raise ValueError(f"unknown benchmark preset {name!r}; choose from {BENCH_PRESETS}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
