"""Training throughput: optimiser steps/s and puzzles/s per gradient mode, on whatever backend
JAX finds (random token batches; the data pipeline is not measured).

    python benchmarks/train_throughput.py --quick                 # < 1 min on CPU, tiny model
    python benchmarks/train_throughput.py --preset sudoku --modes truncated,full --steps 20
    python benchmarks/train_throughput.py --preset maze train.steps_per_call=4 data.global_batch_size=256

Prints one row per mode and the ratio of its steps/s to the ``truncated`` (reference) mode.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from eqr_jax import config as config_lib
from eqr_jax import modes
from eqr_jax.reporting import format_table
from eqr_jax.sharding import to_global
from eqr_jax.train_program import make_train_program


def bench_mode(cfg, mode: str, calls: int, warmup: int = 1) -> dict:
    cfg = config_lib.apply_overrides(cfg, [f"train.grad_mode={mode}"])
    G, N, S = cfg.data.global_batch_size, cfg.model.seq_len, max(1, cfg.train.steps_per_call)
    program = make_train_program(cfg, 10_000)  # the step `eqr train` runs, on every device
    rng = np.random.default_rng(0)
    state = program.init_state()
    fn = program.step(S)
    host = {"inputs": rng.integers(1, cfg.model.vocab_size, (S, G, N)).astype(np.int32),
            "labels": rng.integers(2, cfg.model.vocab_size, (S, G, N)).astype(np.int32),
            "puzzle_identifiers": np.zeros((S, G), np.int32)}
    batches = to_global(host, program.batch_sharding)
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = fn(state, batches)
    jax.block_until_ready(m)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        state, m = fn(state, batches)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    steps = calls * S
    return {"mode": mode, "steps_per_s": steps / dt, "puzzles_per_s": steps * G / dt,
            "ms_per_step": 1000 * dt / steps, "first_call_s": t_compile}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS))
    p.add_argument("--modes", default="truncated,one_step,full",
                   help=f"comma list of gradient modes ({', '.join(modes.GRAD_MODES)})")
    p.add_argument("--calls", type=int, default=5, help="timed jitted calls per mode")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, batch 32, 2 timed calls of 2 steps (< 1 min on CPU)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = config_lib.preset(a.preset)
    if a.quick:
        cfg = config_lib.apply_overrides(config_lib.preset("tiny"), [
            "data.global_batch_size=32", "train.steps_per_call=2", "model.hidden_size=32",
            "model.L_cycles=1"])
        a.calls = min(a.calls, 2)
    cfg = config_lib.apply_overrides(cfg, a.overrides)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} preset={a.preset}"
          f"{' (quick)' if a.quick else ''} batch={cfg.data.global_batch_size} "
          f"seq={cfg.model.seq_len} hidden={cfg.model.hidden_size} "
          f"blocks/step={cfg.model.blocks_per_step} steps/call={cfg.train.steps_per_call}",
          flush=True)
    rows = [bench_mode(cfg, m.strip(), a.calls) for m in a.modes.split(",") if m.strip()]
    base = next((r["steps_per_s"] for r in rows if r["mode"] == "truncated"), None)
    table = [{"mode": r["mode"], "steps/s": f"{r['steps_per_s']:.2f}",
              "puzzles/s": f"{r['puzzles_per_s']:.1f}", "ms/step": f"{r['ms_per_step']:.1f}",
              "first call s": f"{r['first_call_s']:.1f}",
              "vs truncated": f"{r['steps_per_s'] / base:.2f}x" if base else "n/a"}
             for r in rows]
    print(format_table(table, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
