"""Streaming vs batched (frozen-row) evaluation on a mixed-difficulty set: executed puzzle-steps
and wall time at the same accuracy, in one run.

    python benchmarks/streaming_eval.py --checkpoint runs/six --data data/sudoku6 --puzzles 128
    python benchmarks/streaming_eval.py --checkpoint RUN --data DIR --halt q_halt --depth 256

The puzzle set mixes ``--puzzles`` puzzles of the test split (as they are: the hard half) with
an easy version of each (all but ``--easy-blanks`` of its blanks filled in from its solution),
shuffled with a fixed seed, so every batch holds puzzles that halt after a few steps and puzzles
that run long or to the depth cap. Three ways to evaluate it, each timed after a warm-up that
compiles it (``--repeats`` interleaved runs, the median wall time):

* ``batched``: the frozen-row loop (`Evaluator`, ``stream=False``): a batch runs until its
  slowest row halts; halted rows are still computed (and discarded) every step;
* ``stream``: the streaming pool with its job queue on device (``eqr eval --stream``): a slot
  whose job halts takes the next job inside the same jitted loop;
* ``host-refill-K``: the same pool refilled by the host every K steps (`stream.stream_jobs` given
  only as many jobs as there are free slots and ``min_iterations=K``; one round trip per call).

All runs use the same rows per step (``--batch`` x ``--breadth`` slots) and give the same
per-job results (checked: exactness and steps of every (puzzle, copy) job). Printed: exact
accuracy, executed puzzle-steps (rows x loop iterations), the useful ones (steps the jobs took),
wall time, and the ratios batched / other. Puzzle-steps count whole-model steps of one
(puzzle, copy) row, so on a device whose step time grows with the rows the time ratio follows
the puzzle-step ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

import common as bm
from eqr_jax import modes
from eqr_jax.config import EvalConfig
from eqr_jax.data.arrays import eval_batches
from eqr_jax.evaluation import Evaluator, core, stream
from eqr_jax.evaluation.aggregate import SettingAccumulator, summarize_setting
from eqr_jax.model import EqRModel
from eqr_jax.sharding import fetch, replicated

BLANK = 1  # the blank token of the Sudoku datasets


def mixed_set(inputs: np.ndarray, labels: np.ndarray, easy_blanks: int, seed: int):
    """The puzzles plus an easy version of each (blanks beyond ``easy_blanks`` filled from the
    solution), shuffled: (inputs, labels, is_easy) of 2x the rows."""
    rng = np.random.default_rng(seed)
    easy = inputs.copy()
    for i, row in enumerate(easy):
        blanks = np.nonzero(row == BLANK)[0]
        fill = rng.permutation(blanks)[easy_blanks:]
        row[fill] = labels[i, fill]
    x = np.concatenate([inputs, easy])
    y = np.concatenate([labels, labels])
    is_easy = np.r_[np.zeros(len(inputs), bool), np.ones(len(inputs), bool)]
    order = rng.permutation(len(x))
    return x[order], y[order], is_easy[order]


def run_evaluator(ev: Evaluator, params, batches, depth: int, breadth: int):
    """(per-job exact (P, n), steps (P, n), summary metrics, seconds) of one Evaluator run."""
    acc = SettingAccumulator()
    t0 = time.perf_counter()
    for _, r in ev.results(params, batches, depth=depth, breadth=breadth, accumulator=acc):
        acc.add(r)
    seconds = time.perf_counter() - t0
    acc.seconds = seconds
    m = summarize_setting(acc, depth, breadth, ev.cfg.convergence_top_k)["metrics"]
    return acc.get("exact"), acc.get("steps"), m, seconds


def run_host_refill(ev: Evaluator, params, x, y, depth: int, breadth: int, slots: int,
                    every: int):
    """The pool refilled from the host every ``every`` steps: (exact, steps, executed puzzle-
    steps, calls, seconds). One device (the comparison is about where the refill happens)."""
    if ev.mesh.devices.size != 1:
        raise SystemExit("host-refill runs on one device (set --host-refill '' to skip)")
    c = ev.cfg
    p, n = len(x), breadth
    rows, copies = np.repeat(np.arange(p, dtype=np.int32), n), np.tile(
        np.arange(n, dtype=np.int32), p)
    repl = replicated(ev.mesh)
    put = lambda a: jax.device_put(a, repl)
    inputs, labels = put(np.asarray(x, np.int32)), put(np.asarray(y, np.int32))
    stop = core.stopping(c.halt, c.convergence_metric, c.convergence_tol)
    params = ev.place_params(params)
    pool = put(stream.empty_pool(ev.model, slots, int(c.convergence_window)))
    exact, steps = np.zeros((p, n), bool), np.zeros((p, n), np.int32)
    free, nxt, executed, calls = slots, 0, 0, 0
    t0 = time.perf_counter()
    while nxt < len(rows) or free < slots:
        q = min(free, len(rows) - nxt)
        jr, jc = np.zeros((slots,), np.int32), np.zeros((slots,), np.int32)
        jr[:q], jc[:q] = rows[nxt:nxt + q], copies[nxt:nxt + q]
        pool, out = stream.stream_jobs(
            ev.model, ev.mesh, params, pool, inputs, labels, put(jr), put(jc),
            put(np.array([nxt], np.int32)), put(np.array([q], np.int32)), 0, c.seed, depth,
            stop, False, every, window=int(c.convergence_window),
            trace_points=int(c.trace_points))
        out = fetch(out)  # the round trip: the host needs the free slots before the next call
        done = int(out.done[0])
        job = out.job[:done]
        exact[rows[job], copies[job]] = out.exact[:done]
        steps[rows[job], copies[job]] = out.steps[:done]
        executed += int(out.iterations[0]) * slots
        nxt, free, calls = nxt + q, free - q + done, calls + 1
    return exact, steps, executed, calls, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory (EMA weights)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--data", required=True, help="dataset directory (its test split)")
    p.add_argument("--puzzles", type=int, default=128, help="test puzzles (plus as many easy)")
    p.add_argument("--easy-blanks", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--breadth", type=int, default=4)
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--halt", default="convergence", choices=modes.HALT_RULES)
    p.add_argument("--tol", type=float, default=1.0, help="convergence tolerance")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--metric", default="logits", choices=modes.CONVERGENCE_METRICS)
    p.add_argument("--noise", type=float, help="test-time noise (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-refill", default="1,8",
                   help="K values of the host-refill variant ('' to skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (interleaved)")
    p.add_argument("--out", help="JSON file (default benchmarks/results/<backend>-streaming_eval"
                   ".json)")
    args = p.parse_args(argv)
    from eqr_jax.checkpoint import load_for_inference
    from eqr_jax.data.format import load_split

    cfg, params = load_for_inference(args.checkpoint, use_ema=not args.no_ema)
    model = EqRModel(cfg.model)
    split = load_split(args.data, "test", mmap=True)
    hard_x = np.asarray(split.inputs[:args.puzzles], np.int32)
    hard_y = np.asarray(split.labels[:args.puzzles], np.int32)
    x, y, is_easy = mixed_set(hard_x, hard_y, args.easy_blanks, args.seed)
    batches = list(eval_batches(x, y, args.batch))
    slots = args.batch * args.breadth
    base = EvalConfig(halt=args.halt, convergence_tol=args.tol, convergence_window=args.window,
                      convergence_metric=args.metric, noise_scale=args.noise, seed=args.seed,
                      convergence_top_k=0)
    evs = {"batched": Evaluator(model, base),
           "stream": Evaluator(model, dataclasses.replace(base, stream=True, stream_slots=slots))}
    print(f"[streaming_eval] {args.checkpoint}: {len(x)} puzzles ({int(is_easy.sum())} easy, "
          f"{args.easy_blanks} blanks; {len(x) - int(is_easy.sum())} from {args.data}), batch "
          f"{args.batch} x breadth {args.breadth} = {slots} rows per step, depth {args.depth}, "
          f"halt={args.halt} tol={args.tol:g} ({args.metric}), noise "
          f"{evs['batched'].noise_scale:g}; {bm.describe_machine()}", flush=True)
    def evaluator_mode(ev):
        def run(sub):
            exact, steps, m, sec = run_evaluator(ev, params, batches if sub is None else sub,
                                                 args.depth, args.breadth)
            return exact, steps, m["halting/executed_row_steps"], sec
        return run

    def host_mode(k):
        def run(sub):
            xs, ys = (x, y) if sub is None else (x[:args.batch], y[:args.batch])
            exact, steps, executed, _, sec = run_host_refill(evs["stream"], params, xs, ys,
                                                             args.depth, args.breadth, slots, k)
            return exact, steps, executed, sec
        return run

    runs = {name: evaluator_mode(ev) for name, ev in evs.items()}
    runs.update({f"host-refill-{k}": host_mode(int(k)) for k in args.host_refill.split(",") if k})
    for run in runs.values():
        run(batches[:1])  # compile
    # Interleaved repeats: the machine's load changes over a run; the median of each mode.
    times = {name: [] for name in runs}
    per_job, executed = {}, {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            exact, steps, ex, sec = run(None)
            per_job[name], executed[name] = (exact, steps), ex
            times[name].append(sec)
    rows = []
    for name in runs:
        exact, steps = per_job[name]
        rows.append({"mode": name, "exact_accuracy": float(exact.mean()),
                     "executed_puzzle_steps": int(executed[name]),
                     "useful_puzzle_steps": int(steps.sum()),
                     "utilisation": float(steps.sum() / executed[name]),
                     "wall_s": float(np.median(times[name])), "wall_s_all": times[name]})
    ref_exact, ref_steps = per_job["batched"]
    same = {name: bool(np.array_equal(e, ref_exact) and np.array_equal(s, ref_steps))
            for name, (e, s) in per_job.items()}
    base_row = rows[0]
    for r in rows:
        r["same_per_job_results"] = same[r["mode"]]
        r["puzzle_steps_ratio"] = base_row["executed_puzzle_steps"] / r["executed_puzzle_steps"]
        r["wall_ratio"] = base_row["wall_s"] / r["wall_s"]
        r["puzzles_per_s"] = len(x) / r["wall_s"]
    steps_easy = ref_steps[is_easy].mean()
    steps_hard = ref_steps[~is_easy].mean()
    print(f"mean steps per job: easy {steps_easy:.2f}, test-split {steps_hard:.2f}; jobs at the "
          f"depth cap: {float((ref_steps == args.depth).mean()):.3f}")
    print(bm.format_table(rows, ["mode", "exact_accuracy", "executed_puzzle_steps",
                                 "useful_puzzle_steps", "utilisation", "wall_s",
                                 "puzzles_per_s", "puzzle_steps_ratio", "wall_ratio",
                                 "same_per_job_results"]))
    s = next(r for r in rows if r["mode"] == "stream")
    print(f"streaming saves {1 - 1 / s['puzzle_steps_ratio']:.1%} of the executed puzzle-steps "
          f"(ratio {s['puzzle_steps_ratio']:.2f}) and {1 - 1 / s['wall_ratio']:.1%} of the wall "
          f"time (ratio {s['wall_ratio']:.2f}) at exact accuracy {s['exact_accuracy']:.4f}",
          flush=True)
    out = Path(args.out) if args.out else bm.default_out("streaming_eval")
    bm.write_json(out, {"args": vars(args), "rows": rows, "mean_steps_easy": float(steps_easy),
                        "mean_steps_test": float(steps_hard)})
    print(f"wrote {out}")
    return {"rows": rows, "out": str(out)}


if __name__ == "__main__":
    main()
