"""Memory of a compiled program from XLA's buffer assignment (no run needed), shared by the
benchmarks (``benchmarks/common.py`` re-exports it) and the gradient ablation
(`eqr_jax.ablation.step_cost`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax


def compiled_memory(fn: Callable, *args, **kwargs) -> dict:
    """Compile ``fn`` (a `jax.jit` function or a plain one, which is jitted) for these arguments
    and return XLA's buffer-assignment sizes in bytes, plus ``compile_s``.

    ``peak_bytes`` is ``argument + output + temp - alias``: the device memory the program needs
    while it runs (inputs, results and scratch; donated inputs counted once). XLA's own
    ``peak_memory_in_bytes`` is reported as ``xla_peak_bytes`` (0 where the backend leaves it
    out). ``temp_bytes`` alone is the activation / scratch memory, the part that grows with
    unrolled depth under autodiff.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    return {**memory_of(compiled), "compile_s": compile_s}


def memory_of(compiled: Any) -> dict:
    """Sizes from ``compiled.memory_analysis()`` (see `compiled_memory`); zeros if unavailable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        m = None
    if m is None:
        return {"argument_bytes": 0, "output_bytes": 0, "temp_bytes": 0, "alias_bytes": 0,
                "generated_code_bytes": 0, "peak_bytes": 0, "xla_peak_bytes": 0,
                "peak_source": "unavailable"}
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                         - out["alias_bytes"])
    out["peak_source"] = "argument+output+temp-alias"
    # XLA's own estimate, where the backend fills it in (it is not comparable across backends:
    # on CPU it can be far below temp_bytes); reported, never used as `peak_bytes`.
    out["xla_peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return out
