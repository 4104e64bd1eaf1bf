"""Training-step speed of eqr-jax beside the official PyTorch EqR: same model, same batches.

    # both frameworks (needs torch and a checkout of github.com/locuslab/EqR)
    python benchmarks/official_speed.py --official ~/src/EqR \\
        --json benchmarks/results/cpu-sandbox-official-speed.json
    # the JAX side alone (no torch needed)
    python benchmarks/official_speed.py --steps 10

The model and hyper-parameters are those of ``official_learning_curves.py`` (9x9 Sudoku, mlp_t,
hidden 64, batch 32 by default; the same options). Per dtype it times ``--steps`` optimiser steps
after ``--warmup-steps`` untimed ones (eqr-jax compiles in those) of:

* ``official``: the official model, ACT loss head, AdamATan2 rule and EMA as its ``pretrain.py``
  runs them (eager PyTorch), once per ``--torch-threads`` setting;
* ``eqr-jax (sync every step)``: the jitted train step fed one batch at a time and its metrics
  fetched after every step, as the official loop does;
* ``eqr-jax (S steps per call)``: ``train.steps_per_call=S`` as ``eqr train`` runs it (a
  `lax.scan` over S steps, no host sync inside).

Each row's ratio is the official step time with the most torch threads divided by its own (> 1:
faster than the official code). It prints a table and, with ``--json``, writes it with the
machine's description.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import interop
from eqr_jax.model import EqRModel
from eqr_jax.reporting import format_table
# The sibling script: `python benchmarks/NAME.py` makes this folder the first place imports look.
from official_learning_curves import (JaxTrainer, add_run_options, draw_batches, ensure_data,
                                      jax_run_config, machine, official_trainer,
                                      reference_model_dict, round_floats)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(p)
    p.add_argument("--steps", type=int, default=40, help="timed optimiser steps per row")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="untimed steps first (eqr-jax compiles in them)")
    p.add_argument("--steps-per-call", type=int, default=10,
                   help="S of the eqr-jax row that runs S steps per jitted call")
    p.add_argument("--torch-threads", default="1,0",
                   help="torch intra-op thread counts to time, comma list (0: torch's default, "
                        "all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p


def time_steps(step, batches, warmup: int) -> float:
    """Seconds per step of ``step(batch)`` over ``batches[warmup:]`` after the warm-up ones."""
    for b in batches[:warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return (time.perf_counter() - t0) / (len(batches) - warmup)


def time_scanned(cfg, init, batches, warmup: int, per_call: int, seed: int) -> float:
    """Seconds per step of the jitted train step running ``per_call`` steps per call, with no
    host sync until the end (``eqr train``'s loop fetches metrics a call late)."""
    jt = JaxTrainer(cfg, init, seed)  # its state, built from the same weights
    fn = jt.program.step(per_call)
    stack = lambda bs: {k: jnp.asarray(np.stack([b[k] for b in bs])) for k in bs[0]}
    calls = [stack(batches[i:i + per_call])
             for i in range(0, len(batches) - per_call + 1, per_call)]
    state = jt.state
    for c in calls[:max(1, warmup // per_call)]:
        state, m = fn(state, c)
    jax.block_until_ready(m)
    timed = calls[max(1, warmup // per_call):]
    if not timed:
        raise SystemExit(f"--steps {len(batches) - warmup} too few for --steps-per-call "
                         f"{per_call}: at least one timed call is needed")
    t0 = time.perf_counter()
    for c in timed:
        state, m = fn(state, c)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t0) / (len(timed) * per_call)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    threads = [int(t) for t in a.torch_threads.split(",") if t.strip()]
    if a.official:
        import torch
        from _official import import_official
        import_official(a.official)  # fails early with a clear message
        default_threads = torch.get_num_threads()
    seq_len, vocab = ensure_data(a)
    # The step schedule covers every batch drawn (warm-up + timed, rounded up to whole calls).
    a.steps = a.warmup_steps + max(a.steps, a.steps_per_call) + a.steps_per_call
    batches = draw_batches(a, a.seed)
    rows = []
    for dtype in [d for d in a.dtypes.split(",") if d]:
        ref = reference_model_dict(a, seq_len, vocab, dtype, "preset")
        cfg = jax_run_config(ref, a, a.seed)
        if a.official:
            for t in threads:
                torch.set_num_threads(t or default_threads)
                off = official_trainer(a, ref, a.seed)
                init = off.state_dict()
                s = time_steps(off.train_step, batches, a.warmup_steps)
                rows.append({"dtype": dtype, "framework": "official",
                             "setting": f"torch {torch.get_num_threads()} thread(s)",
                             "threads": torch.get_num_threads(), "s_per_step": s})
            torch.set_num_threads(default_threads)
        else:
            init = interop.params_to_reference(
                EqRModel(cfg.model).init(jax.random.PRNGKey(a.seed)), cfg.model)
        jt = JaxTrainer(cfg, init, a.seed)
        rows.append({"dtype": dtype, "framework": "eqr-jax", "setting": "sync every step",
                     "s_per_step": time_steps(jt.train_step, batches, a.warmup_steps)})
        rows.append({"dtype": dtype, "framework": "eqr-jax",
                     "setting": f"{a.steps_per_call} steps per call",
                     "s_per_step": time_scanned(cfg, init, batches, a.warmup_steps,
                                                a.steps_per_call, a.seed)})
        print(f"[speed] {dtype} done", flush=True)
    for r in rows:
        # The baseline: the official code with the most torch threads timed, same dtype.
        base = max((o for o in rows if o["dtype"] == r["dtype"] and o["framework"] == "official"),
                   key=lambda o: o["threads"], default=None)
        r["vs_official"] = base["s_per_step"] / r["s_per_step"] if base else None
    print(format_table([{"dtype": r["dtype"], "framework": r["framework"], "setting": r["setting"],
                         "ms/step": f"{1000 * r['s_per_step']:.1f}",
                         "vs official": (f"{r['vs_official']:.2f}x" if r["vs_official"]
                                         else "n/a")} for r in rows], markdown=True))
    if a.json:
        result = {"benchmark": "official_speed", "command": " ".join(sys.argv),
                  "config": (f"9x9 Sudoku, mlp_t, hidden {a.hidden}, {a.layers} layers, "
                             f"H_cycles {a.h_cycles}, L_cycles {a.l_cycles}, batch {a.batch}"),
                  "args": {k: v for k, v in vars(a).items() if k != "json"},
                  "machine": machine(a.official is not None), "rows": rows}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(round_floats(result), indent=1) + "\n")
        print(f"[speed] wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
