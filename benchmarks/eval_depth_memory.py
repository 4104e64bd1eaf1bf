"""Peak memory of the evaluation loop at depth 16 vs 2048, from XLA's compiled memory analysis.

    python benchmarks/eval_depth_memory.py                 # tiny 4x4 model (seconds on CPU)
    python benchmarks/eval_depth_memory.py --preset sudoku --batch 64 --breadth 8

The evaluator's program (`eqr_jax.evaluation.core.evaluate_copies`) iterates with
`lax.while_loop`, keeping only the
current latents, logits and per-row counters, so its temporary memory does not depend on the
depth. For contrast the script also compiles a *materialising* variant (a `lax.scan` that stacks
every step's logits, as a convergence top-k evaluator that keeps all logits would), whose memory
grows linearly with depth. Depth is baked into each program as a constant, so XLA sees the trip
count; nothing is executed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from eqr_jax import config as config_lib
from eqr_jax.evaluation import core
from eqr_jax.model import EqRModel


def stats(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp": m.temp_size_in_bytes, "args": m.argument_size_in_bytes,
            "out": m.output_size_in_bytes,
            "peak": m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--breadth", type=int, default=4)
    p.add_argument("--depths", default="16,2048")
    p.add_argument("--no-baseline", action="store_true", help="skip the materialising scan")
    args = p.parse_args(argv)
    cfg = config_lib.preset(args.preset)
    model = EqRModel(cfg.model)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    n = cfg.model.seq_len
    inputs = jax.ShapeDtypeStruct((args.batch, n), jnp.int32)
    labels = jax.ShapeDtypeStruct((args.batch, n), jnp.int32)
    mask = jax.ShapeDtypeStruct((args.batch,), jnp.bool_)
    ids = jnp.arange(args.breadth, dtype=jnp.int32)
    depths = [int(d) for d in args.depths.split(",")]
    print(f"preset={args.preset} batch={args.batch} breadth={args.breadth} "
          f"backend={jax.default_backend()}")

    def loop_fn(depth):
        return jax.jit(lambda pr, x, y, m: core.evaluate_copies(
            model, pr, x, y, m, 0, 0, ids, args.breadth, depth, core.stopping("convergence"),
            window=3, trace_points=64))

    def scan_fn(depth):  # materialising baseline: all per-step logits kept
        def f(pr, x, y, m):
            xe = model.embed(pr, x)
            init_keys, noise_keys = core.batch_job_keys(0, 0, x.shape[0], ids)
            s0 = core.init_rows(model, init_keys)

            def body(s, t):
                s = core.step_rows(model, pr, s, xe, core.fold_step(noise_keys, t))
                return s, jax.vmap(lambda z: model.readout(pr, z).logits)(s)

            _, logits = jax.lax.scan(body, s0, jnp.arange(depth))
            d = jnp.linalg.norm(jnp.diff(logits.astype(jnp.float32), axis=0), axis=-1)
            return jnp.argmax(logits[-1], -1), d[-3:].mean((0, -1))
        return jax.jit(f)

    rows = {}
    for name, make in [("while_loop (eqr_jax.evaluation.core)", loop_fn)] + (
            [] if args.no_baseline else [("scan keeping logits (baseline)", scan_fn)]):
        rows[name] = [stats(make(d).lower(params, inputs, labels, mask).compile()) for d in depths]
    for name, ss in rows.items():
        print(name)
        for d, s in zip(depths, ss):
            print(f"  D={d:>5}: temp {s['temp'] / 2**20:9.3f} MiB   peak (temp+args+out) "
                  f"{s['peak'] / 2**20:9.3f} MiB")
        print(f"  peak ratio D={depths[-1]} / D={depths[0]}: {ss[-1]['peak'] / ss[0]['peak']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
