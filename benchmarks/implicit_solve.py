"""The implicit mode's solves on a briefly trained model (docs/implicit-gradients.md).

    python benchmarks/implicit_solve.py --quick                  # tiny preset, CPU, ~150 steps
    python benchmarks/implicit_solve.py --checkpoint runs/sudoku6 --batch 64

Three measurements, each printed as numbers:

1. forward: for each (tolerance, cap), the fraction of rows whose per-row solve converges from
   fresh latents (training warm-starts from the carry, so this is the hard case) and the median
   and maximum iterations;
2. converged rows: at the default forward settings, the share of the batch's step-map
   evaluations spent on rows that had already converged (the loop runs until the last row is
   done: rows x loop iterations evaluations, of which sum(per-row iterations) were needed), and
   the wall time of one step-map evaluation on the whole batch against a quarter of it, which
   says how much of that share compacting rows could actually return on this machine;
3. backward: one implicit ACT-step gradient with the old backward (one GMRES(20) cycle) and the
   new defaults, each timed and compared (cosine) with a backward solved to 1e-6.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import dynamics
from eqr_jax.act import init_carry
from eqr_jax.config import TrainConfig
from eqr_jax.data.arrays import ArrayTrainLoader, eval_batches, make_puzzles
from eqr_jax.losses import implicit_gradient_check, loss_and_grad
from eqr_jax.model import EqRModel


def _train_tiny(steps: int, out: str) -> str:
    from eqr_jax import config as C
    from eqr_jax.training import train

    cfg = C.apply_overrides(C.preset("tiny"), [
        f"train.out_dir={out}", f"train.max_steps={steps}", "train.ema=false",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.log_every=100000"])
    xi, yi = make_puzzles(4000, 0, blanks=(6, 10))
    xe, ye = make_puzzles(128, 1, blanks=(6, 10))
    train(cfg, (ArrayTrainLoader(xi, yi, cfg.data.global_batch_size),
                lambda: eval_batches(xe, ye, 128)), progress=False)
    return out


def timed(fn, repeats: int = 3) -> tuple:
    out = jax.block_until_ready(fn())  # compile
    t = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn())
    return out, (time.perf_counter() - t) / repeats


def forward_table(model, params, z0, x, tols, caps) -> None:
    print("1. forward solve from fresh latents (Anderson, history 5)")
    print(f"{'tol':>8} {'cap':>5} {'converged':>9} {'median_it':>9} {'max_it':>6}")
    for tol in tols:
        for cap in caps:
            res = jax.jit(lambda z, xx: dynamics.fixed_point(
                model.step, params, z, xx, tol=tol, maxiter=cap, implicit_diff=False))(z0, x)
            it = np.asarray(res.iterations)
            print(f"{tol:>8.0e} {cap:>5d} {float(np.mean(res.converged)):>9.3f} "
                  f"{np.median(it):>9.0f} {it.max():>6d}")


def converged_rows_cost(model, params, z0, x, tol, cap) -> None:
    res = jax.jit(lambda z, xx: dynamics.fixed_point(
        model.step, params, z, xx, tol=tol, maxiter=cap, implicit_diff=False))(z0, x)
    it = np.asarray(res.iterations)
    rows, loop = len(it), int(it.max())
    wasted = 1.0 - it.sum() / (rows * loop)
    step = jax.jit(lambda z, xx: model.step(params, z, xx, None, truncate=False))
    quarter = jax.tree_util.tree_map(lambda a: a[:rows // 4], z0)
    _, t_all = timed(lambda: step(z0, x), 10)
    _, t_q = timed(lambda: step(quarter, x[:rows // 4]), 10)
    print(f"\n2. converged rows (tol {tol:.0e}, cap {cap}): {rows} rows x {loop} loop "
          f"iterations = {rows * loop} row-evaluations, {it.sum()} needed: "
          f"{100 * wasted:.1f}% spent on converged rows")
    print(f"   one step-map evaluation: {1e3 * t_all:.2f} ms on {rows} rows, {1e3 * t_q:.2f} ms "
          f"on {rows // 4} rows (ratio {t_all / t_q:.2f}; 4.00 = cost proportional to rows)")


def backward_table(model, params, batch, rows) -> None:
    print(f"\n3. backward solve of one implicit ACT step ({rows} rows; reference: GMRES to 1e-6)")
    print(f"{'backward':<28} {'cos_vs_ref':>10} {'residual':>9} {'iters':>6} {'grad_ms':>8}")
    carry = init_carry(model, batch)
    key = jax.random.PRNGKey(0)
    for name, kw in (("old: one GMRES(20) cycle", dict(implicit_backward_iters=20)),
                     ("new defaults", {})):
        tc = TrainConfig(grad_mode="implicit", **kw)
        check = implicit_gradient_check(model, [(params, carry)], batch, key, tc, rows=rows)[0]
        fn = jax.jit(loss_and_grad(model, adjoint=dynamics.adjoint_for(tc), unroll_steps=1,
                                   global_batch_size=rows))
        _, dt = timed(lambda: fn(params, carry, batch, key))
        print(f"{name:<28} {check['cos_vs_exact']:>10.6f} {check['backward_residual']:>9.1e} "
              f"{check['backward_iters']:>6.0f} {1e3 * dt:>8.0f}")
    print(f"{'(reference)':<28} {'':>10} {check['exact_residual']:>9.1e} "
          f"{check['exact_iters']:>6.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--grad-rows", type=int, default=8)
    p.add_argument("--tols", default="1e-3,1e-4")
    p.add_argument("--caps", default="30,100")
    args = p.parse_args(argv)
    from eqr_jax.checkpoint import load_for_inference

    ckpt = args.checkpoint or _train_tiny(150 if args.quick else 600, "/tmp/eqr-implicit-bench")
    cfg, params = load_for_inference(ckpt, use_ema=False)
    model = EqRModel(cfg.model)
    x_np, y_np = make_puzzles(args.batch, 1, blanks=(6, 10))
    inputs = jnp.asarray(x_np)
    x = model.embed(params, inputs)
    z0 = model.init_latents(jax.random.PRNGKey(1), args.batch)
    print(f"checkpoint={ckpt} batch={args.batch} backend={jax.default_backend()} "
          f"jax={jax.__version__}")
    forward_table(model, params, z0, x, [float(t) for t in args.tols.split(",")],
                  [int(c) for c in args.caps.split(",")])
    d = TrainConfig()
    converged_rows_cost(model, params, z0, x, d.implicit_tol, d.implicit_maxiter)
    n = min(args.grad_rows, args.batch)
    batch = {"inputs": inputs[:n], "labels": jnp.asarray(y_np[:n]),
             "puzzle_identifiers": jnp.zeros((n,), jnp.int32)}
    backward_table(model, params, batch, n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
