"""Anderson acceleration vs plain fixed-point iteration of the noise-free step map at inference.

    python benchmarks/fixed_point_eval.py --quick                       # tiny model, CPU
    python benchmarks/fixed_point_eval.py --checkpoint runs/tiny --data-seed 1 --batch 128

For each target tolerance (RMS of f(z) - z per latent element) both fixed-point solvers run from the
same random initial latents with a generous iteration cap; the script reports the iterations
needed, the wall time (second call, after compilation), the reached residual and the exact
accuracy, next to plain noisy unrolling (the reference evaluation) at the same number of steps.
Without ``--checkpoint`` a tiny model is trained for a few hundred steps first (``--quick``: 150).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from eqr_jax.config import EvalConfig
from eqr_jax.data.arrays import ArrayTrainLoader, eval_batches, make_puzzles
from eqr_jax.evaluation import Evaluator
from eqr_jax.model import EqRModel


def _puzzles(n, seed):
    return make_puzzles(n, seed, blanks=(6, 10))


def _train_tiny(steps: int, out: str):
    from eqr_jax import config as C
    from eqr_jax.training import train

    cfg = C.apply_overrides(C.preset("tiny"), [
        f"train.out_dir={out}", f"train.max_steps={steps}", "train.ema=false",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.log_every=100000"])
    xi, yi = _puzzles(4000, 0)
    xe, ye = _puzzles(128, 1)
    train(cfg, (ArrayTrainLoader(xi, yi, cfg.data.global_batch_size),
                lambda: eval_batches(xe, ye, 128)), progress=False)
    return out


def timed(fn):
    fn()  # compile
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tols", default="1e-2,1e-3,1e-4")
    p.add_argument("--maxiter", type=int, default=200)
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--no-ema", action="store_true")
    args = p.parse_args(argv)
    from eqr_jax.checkpoint import load_for_inference

    ckpt = args.checkpoint or _train_tiny(150 if args.quick else 600, "/tmp/eqr-fp-bench")
    cfg, params = load_for_inference(ckpt, use_ema=not args.no_ema)
    model = EqRModel(cfg.model)
    x, y = _puzzles(args.batch, args.data_seed)
    batch = {"inputs": x, "labels": y, "mask": np.ones(len(x), bool)}
    unroll = Evaluator(model, EvalConfig())
    print(f"checkpoint={ckpt} batch={args.batch} backend={jax.default_backend()}")
    print(f"{'solver':<12} {'tol':>8} {'iters':>6} {'time_s':>8} {'residual_rms':>13} "
          f"{'exact_acc':>9} | unroll@iters exact_acc  time_s")
    numel = 2 * cfg.model.seq_len * cfg.model.hidden_size
    for tol in (float(t) for t in args.tols.split(",")):
        for solver in ("anderson", "fixed_point"):
            ev = Evaluator(model, dataclasses.replace(EvalConfig(), solver=solver,
                                                      convergence_tol=tol))
            r, dt = timed(lambda: ev.evaluate_batch(params, batch, 0, depth=args.maxiter))
            iters = int(r.steps.max())
            u, du = timed(lambda: unroll.evaluate_batch(params, batch, 0, depth=max(iters, 1)))
            print(f"{solver:<12} {tol:>8.0e} {iters:>6d} {dt:>8.3f} "
                  f"{float(np.sqrt(np.mean(r.residual ** 2)) / np.sqrt(numel)):>13.2e} "
                  f"{r.exact.mean():>9.4f} | {u.exact.mean():>21.4f} {du:>7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
