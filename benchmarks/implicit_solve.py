"""The implicit mode's solves on a briefly trained model (docs/implicit-gradients.md).

    python benchmarks/implicit_solve.py --quick                  # tiny preset, CPU, ~150 steps
    python benchmarks/implicit_solve.py --checkpoint runs/sudoku6 --batch 64
    python benchmarks/implicit_solve.py --near-critical          # the backward's accuracy table

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

``--near-critical`` prints instead the backward's accuracy on a micro model whose step map has
spectral radius ~0.99 at its fixed points (16 tokens, hidden 32, the L level's weights x 0.43; the
model of tests/test_dynamics.py), against the exact gradient: a dense float64
implicit-function-theorem solve per row at a fixed point from thousands of iterations.
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


def near_critical(rows: int = 2):
    """(model, params, inputs, labels, z0) of the near-critical micro model (module docstring)."""
    from eqr_jax.config import ModelConfig

    cfg = ModelConfig(seq_len=16, vocab_size=6, H_cycles=1, L_cycles=2, L_layers=1,
                      hidden_size=32, num_heads=2, expansion=2.0, mlp_t=True,
                      pos_encodings="none", forward_dtype="float32", noise_scale=0.0)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.43 * a, params["L_level"]))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (rows, cfg.seq_len), 1, cfg.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), (rows, cfg.seq_len), 2, cfg.vocab_size)
    return model, params, inputs, labels, model.init_latents(jax.random.PRNGKey(3), rows)


# (label, fixed_point keywords) of the backward settings compared by `near_critical_table`.
BACKWARDS = (
    ("one GMRES(20) cycle (before issue 28)", dict(backward_iters=20, backward_restart=20)),
    ("iteration, 20 updates", dict(backward="iteration", backward_iters=20)),
    ("defaults: GMRES(30) to 1e-4", {}),
    ("GMRES(20) to 1e-4", dict(backward_restart=20)),
    ("GMRES(30) to 1e-5", dict(backward_tol=1e-5)),
    ("GMRES(30) to 1e-6", dict(backward_tol=1e-6, backward_iters=400)),
    ("iteration to 1e-5", dict(backward="iteration", backward_tol=1e-5, backward_iters=2000)),
)


def near_critical_table(backwards=BACKWARDS) -> list[dict]:
    """Relative error and cosine of each backward setting's parameter gradient against the dense
    IFT gradient on the near-critical micro model; prints a table and returns its rows."""
    from eqr_jax import losses

    model, params, inputs, labels, z0 = near_critical()
    rows = inputs.shape[0]

    def loss_at(p, state):
        return losses.stablemax_cross_entropy(model.readout(p, state).logits, labels).mean()

    state = dynamics.fixed_point(model.step, params, z0, model.embed(params, inputs), tol=1e-7,
                                 maxiter=4000, implicit_diff=False).state
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(t)])
    exact, radius = dynamics.dense_implicit_gradient(model, params, state, inputs, loss_at)
    exact = flat(exact)
    print(f"near-critical micro model: {rows} rows, spectral radius "
          f"{', '.join(f'{r:.3f}' for r in radius)}; exact: dense float64 IFT per row")
    print(f"{'backward':<40} {'rel_err':>8} {'cosine':>9} {'residual':>9} {'iters':>9} "
          f"{'grad_ms':>8}")
    out = []
    for label, kw in backwards:
        def grad(p, probe, kw=kw):
            def loss(p, probe):  # warm start at the fixed point: the forward is not compared
                res = dynamics.fixed_point(model.step, p, state, model.embed(p, inputs),
                                           tol=1e-6, maxiter=10, probe=probe, **kw)
                return loss_at(p, res.state)
            return jax.grad(loss, argnums=(0, 1))(p, probe)
        fn = jax.jit(grad)
        (g, stats), dt = timed(lambda: fn(params, dynamics.backward_probe(rows)))
        g = flat(g)
        rel = float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
        cos = float(jnp.dot(g, exact) / (jnp.linalg.norm(g) * jnp.linalg.norm(exact)))
        its = np.asarray(stats[:, 1]).astype(int)
        row = dict(backward=label, rel_err=rel, cosine=cos,
                   residual=float(np.max(stats[:, 0])), iters=its.tolist(), grad_ms=1e3 * dt)
        print(f"{label:<40} {rel:>8.1e} {cos:>9.6f} {row['residual']:>9.1e} "
              f"{'-'.join(str(i) for i in sorted(set(its))):>9} {row['grad_ms']:>8.0f}")
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--grad-rows", type=int, default=8)
    p.add_argument("--tols", default="1e-3,1e-4")
    p.add_argument("--caps", default="30,100")
    p.add_argument("--near-critical", action="store_true",
                   help="only the backward's accuracy table on the near-critical micro model")
    args = p.parse_args(argv)
    if args.near_critical:
        print(f"backend={jax.default_backend()} jax={jax.__version__}")
        near_critical_table()
        return 0
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
