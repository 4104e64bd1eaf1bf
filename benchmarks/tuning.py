"""Before/after measurements of performance options that do not change the math.

Each section times a baseline and its alternatives in the same process on the same inputs, prints
a table with the ratio to the baseline, and (where the output can differ by rounding) the largest
absolute difference from the baseline in float32, so a faster option that breaks parity shows up.

Sections:
  mlp_t      token-mixing SwiGLU formulation: einsum over (batch, seq, hidden) (the model's),
             explicit transpose to a (batch*hidden, seq) matrix, and zero-padding the token axis to
             a multiple of ``--token-pad`` (exact: padded rows/columns of the weights are zero).
  attention  `jax.nn.dot_product_attention` implementation: backend default vs ``xla`` vs ``cudnn``
             (cuDNN only on NVIDIA GPUs; skipped with a message elsewhere).
  remat      full-gradient training step through ``--remat-steps`` steps: no remat, per-step remat
             (`dynamics.Full(remat=True)`), per-block remat (``ModelConfig.remat_blocks``), both.
  host       steps per host call: K jitted single-step calls vs one `lax.scan` of K steps vs one
             `fori_loop` with a runtime K.
  donation   a K-step call with the latent state donated (`donate_argnums`) or not.
  flags      XLA flags on GPU (each set measured in a fresh subprocess on the `host` scan); skipped
             on CPU/TPU unless ``--xla-flag-sets`` is given.

    python benchmarks/tuning.py --quick
    python benchmarks/tuning.py --preset sudoku --batch 768 \
        --out benchmarks/results/h200-tuning.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import common as bm
from eqr_jax import dynamics, losses
from eqr_jax.model import EqRModel, apply_blocks, compute_dtype, rms_norm

SECTIONS = ("mlp_t", "attention", "remat", "host", "donation", "flags")
GPU_FLAG_SETS = [
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_autotune_level=4",
    "--xla_gpu_enable_command_buffer=",
]


# ----------------------------------------------------------------------------------------------
# Alternative token-mixing formulations (same parameters, same math as model.TokenSwiGLU)


def token_swiglu(h, w_gu, w_d, dtype, impl: str, pad: int = 128):
    """mlp_t SwiGLU over the token axis of h (batch, seq, hidden); kernels (N, 2I) and (I, N)."""
    w_gu, w_d = w_gu.astype(dtype), w_d.astype(dtype)
    b, n, hid = h.shape
    if impl == "einsum":  # the model's formulation
        gu = jnp.einsum("bnh,nk->bkh", h, w_gu)
        g, u = jnp.split(gu, 2, axis=1)
        return jnp.einsum("bkh,kn->bnh", jax.nn.silu(g) * u, w_d)
    if impl in ("transpose", "padded"):
        t = jnp.swapaxes(h, 1, 2).reshape(b * hid, n)  # (rows, tokens): one plain 2-D matmul
        if impl == "padded":
            n_pad = -(-n // pad) * pad
            t = jnp.pad(t, ((0, 0), (0, n_pad - n)))
            w_gu = jnp.pad(w_gu, ((0, n_pad - n), (0, 0)))
            w_d = jnp.pad(w_d, ((0, 0), (0, n_pad - n)))
        g, u = jnp.split(t @ w_gu, 2, axis=-1)
        out = (jax.nn.silu(g) * u) @ w_d
        return jnp.swapaxes(out[:, :n].reshape(b, hid, n), 1, 2)
    raise ValueError(impl)


def block_stack(cfg, params, h, impl: str, pad: int):
    """The mlp_t block stack with a chosen token-mixing formulation (channel MLP as the model)."""
    dt = compute_dtype(cfg)
    for i in range(cfg.L_layers):
        lp = params["L_level"][f"layers_{i}"]
        mix = token_swiglu(h, lp["mlp_t"]["gate_up_proj"], lp["mlp_t"]["down_proj"], dt, impl, pad)
        h = rms_norm(h + mix, cfg.rms_norm_eps, axis=-2)
        gu = h @ lp["mlp"]["gate_up_proj"]["kernel"].astype(dt)
        g, u = jnp.split(gu, 2, axis=-1)
        h = rms_norm(h + (jax.nn.silu(g) * u) @ lp["mlp"]["down_proj"]["kernel"].astype(dt),
                     cfg.rms_norm_eps)
    return h


def _timing(args) -> dict:
    return {"repeats": args.repeats, "min_total_s": args.min_time}


def _row(name, t: bm.Timing, base: bm.Timing | None, **extra):
    return {"variant": name, "time_ms": t.median_s * 1e3,
            "speedup_vs_baseline": None if base is None else base.median_s / t.median_s, **extra}


def section_mlp_t(args, cfg):
    if not cfg.mlp_t:
        cfg = bm.model_preset("sudoku" if not args.quick else "tiny")
    rows = []
    for dtype in ("float32",) if args.quick else ("float32", "bfloat16"):
        c = dataclasses.replace(cfg, forward_dtype=dtype)
        params = EqRModel(c).init(jax.random.PRNGKey(0))
        h = jax.random.normal(jax.random.PRNGKey(1), (args.batch, c.seq_len, c.hidden_size),
                              jnp.float32).astype(compute_dtype(c))
        ref_fn = jax.jit(lambda p, h: apply_blocks(c, p, h))
        ref_t = bm.time_fn(ref_fn, params, h, **_timing(args))
        ref = np.asarray(ref_fn(params, h), np.float32)
        rows.append(_row("model (einsum)", ref_t, ref_t, dtype=dtype, max_abs_diff=0.0))
        for impl in ("einsum", "transpose", "padded"):
            fn = jax.jit(lambda p, h, impl=impl: block_stack(c, p, h, impl, args.token_pad))
            t = bm.time_fn(fn, params, h, **_timing(args))
            diff = float(np.max(np.abs(np.asarray(fn(params, h), np.float32) - ref)))
            name = impl if impl != "padded" else f"padded to {args.token_pad}"
            rows.append(_row(name, t, ref_t, dtype=dtype, max_abs_diff=diff))
    return rows, f"block stack forward ({cfg.L_layers} blocks), batch {args.batch}, N={cfg.seq_len}"


def _step_setup(cfg, batch, key=0):
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(key))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (batch, cfg.seq_len), 1, cfg.vocab_size)
    x = model.embed(params, inputs)
    state = model.init_latents(jax.random.PRNGKey(2), batch)
    return model, params, x, state, inputs


def section_attention(args, cfg):
    if cfg.mlp_t:
        cfg = bm.model_preset("tiny-attn" if args.quick else "maze")
    cfg = dataclasses.replace(cfg, noise_scale=0.0)
    rows, base, ref = [], None, None
    impls = [None, "xla"] + (["cudnn"] if bm.backend() == "gpu" else [])
    if bm.backend() != "gpu":
        print("  attention: cudnn needs an NVIDIA GPU; skipped on", bm.backend())
    for dtype in ("float32",) if args.quick else ("bfloat16", "float32"):
        base, ref = None, None
        for impl in impls:
            c = dataclasses.replace(cfg, attention_impl=impl, forward_dtype=dtype)
            if impl == "cudnn" and dtype == "float32":
                continue  # cuDNN flash attention takes half precision only
            model, params, x, state, _ = _step_setup(c, args.batch)
            fn = jax.jit(lambda p, s, x, m=model: m.step(p, s, x, None).z_H)
            try:
                t = bm.time_fn(fn, params, state, x, **_timing(args))
            except Exception as err:  # noqa: BLE001
                rows.append({"variant": f"{impl}", "dtype": dtype, "status": f"failed: {err}"[:80]})
                continue
            out = np.asarray(fn(params, state, x), np.float32)
            ref = out if ref is None else ref
            base = t if base is None else base
            rows.append(_row(f"attention_impl={impl}", t, base, dtype=dtype,
                             max_abs_diff=float(np.max(np.abs(out - ref)))))
    return rows, f"one reasoning step, batch {args.batch}, N={cfg.seq_len}, noise off"


def section_remat(args, cfg):
    rows, base, ref = [], None, None
    n = args.remat_steps
    variants = [("no remat", False, False), ("per-step remat", True, False),
                ("per-block remat", False, True), ("both", True, True)]
    for name, step_remat, block_remat in variants[:2] if args.quick else variants:
        c = dataclasses.replace(cfg, remat_blocks=block_remat)
        model, params, x, state, inputs = _step_setup(c, args.batch)

        def loss(p, s, m=model, r=step_remat):
            xx = m.embed(p, inputs)
            z, _ = dynamics.unroll(m.step, p, s, xx, jax.random.PRNGKey(5), n,
                                   adjoint=dynamics.Full(remat=r))
            return losses.stablemax_cross_entropy(m.readout(p, z).logits, inputs).mean()

        fn = jax.jit(jax.value_and_grad(loss))
        compiled = fn.lower(params, state).compile()
        mem = bm.memory_of(compiled)
        t = bm.time_fn(compiled, params, state, **_timing(args))
        val = float(compiled(params, state)[0])
        base = t if base is None else base
        ref = val if ref is None else ref
        rows.append(_row(name, t, base, peak_MiB=mem["peak_bytes"] / bm.MiB,
                         temp_MiB=mem["temp_bytes"] / bm.MiB, loss_diff=abs(val - ref)))
    return rows, f"loss+grad through {n} steps (grad=full), batch {args.batch}"


def section_host(args, cfg):
    k = args.steps_per_call
    model, params, x, state, _ = _step_setup(cfg, args.batch)
    key = jax.random.PRNGKey(3)
    single = jax.jit(lambda p, s, x, kk: model.step(p, s, x, kk))

    def per_call():
        s = state
        for i in range(k):
            s = single(params, s, x, jax.random.fold_in(key, i))
        return s

    scan = jax.jit(lambda p, s, x, kk: dynamics.unroll(model.step, p, s, x, kk, k,
                                                       adjoint=dynamics.NoGrad())[0])

    @jax.jit
    def fori(p, s, x, kk, depth):
        return jax.lax.fori_loop(0, depth, lambda i, z: model.step(p, z, x,
                                                                   jax.random.fold_in(kk, i)), s)

    depth = jnp.asarray(k, jnp.int32)
    t1 = bm.time_fn(per_call, **_timing(args))
    t2 = bm.time_fn(scan, params, state, x, key, **_timing(args))
    t3 = bm.time_fn(fori, params, state, x, key, depth, **_timing(args))
    a, b, c = (np.asarray(f.z_H, np.float32) for f in
               (per_call(), scan(params, state, x, key), fori(params, state, x, key, depth)))
    rows = [_row(f"{k} host calls of 1 step", t1, t1, max_abs_diff=0.0),
            _row(f"1 call, scan of {k}", t2, t1, max_abs_diff=float(np.max(np.abs(b - a)))),
            _row(f"1 call, fori_loop (runtime {k})", t3, t1,
                 max_abs_diff=float(np.max(np.abs(c - a))))]
    return rows, f"{k} reasoning steps, batch {args.batch}"


def section_donation(args, cfg):
    k = args.steps_per_call
    model, params, x, _, _ = _step_setup(cfg, args.batch)
    key = jax.random.PRNGKey(3)
    f = lambda p, s, x, kk: dynamics.unroll(model.step, p, s, x, kk, k,
                                            adjoint=dynamics.NoGrad())[0]
    rows, base = [], None
    for name, donate in (("no donation", ()), ("state donated", (1,))):
        fn = jax.jit(f, donate_argnums=donate)
        fresh = lambda: model.init_latents(jax.random.PRNGKey(2), args.batch)
        compiled = fn.lower(params, fresh(), x, key).compile()
        mem = bm.memory_of(compiled)
        states = [bm.block(fresh()) for _ in range(args.repeats + 1)]
        it = iter(states)
        t = bm.time_fn(lambda: compiled(params, next(it), x, key), warmup=1,
                       repeats=args.repeats)
        base = t if base is None else base
        rows.append(_row(name, t, base, peak_MiB=mem["peak_bytes"] / bm.MiB,
                         alias_MiB=mem["alias_bytes"] / bm.MiB))
    return rows, f"{k} steps per call, batch {args.batch}"


def section_flags(args, cfg):
    sets = args.xla_flag_sets
    if sets is None:
        if bm.backend() != "gpu":
            print("  flags: default flag sets are for GPU; skipped on", bm.backend(),
                  "(pass --xla-flag-sets to try others)")
            return [], "skipped"
        sets = GPU_FLAG_SETS
    rows, base = [], None
    for flags in [""] + list(sets):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = [sys.executable, os.path.abspath(__file__), "--child-host",
               "--preset", args.preset, "--batch", str(args.batch),
               "--steps-per-call", str(args.steps_per_call), "--repeats", str(args.repeats),
               "--min-time", str(args.min_time)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("CHILD ")]
        if proc.returncode or not lines:
            rows.append({"variant": flags or "(default)", "status": "failed",
                         "stderr": proc.stderr[-200:]})
            continue
        t = json.loads(lines[-1][6:])["median_s"]
        base = t if base is None else base
        rows.append({"variant": flags or "(default)", "time_ms": t * 1e3,
                     "speedup_vs_baseline": base / t})
    return rows, f"scan of {args.steps_per_call} steps, batch {args.batch}, fresh process per set"


def child_host(args, cfg):
    model, params, x, state, _ = _step_setup(cfg, args.batch)
    scan = jax.jit(lambda p, s, x, kk: dynamics.unroll(
        model.step, p, s, x, kk, args.steps_per_call, adjoint=dynamics.NoGrad())[0])
    t = bm.time_fn(scan, params, state, x, jax.random.PRNGKey(3), **_timing(args))
    print("CHILD " + json.dumps(t.as_dict()), flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, small batch")
    ap.add_argument("--preset", default=None, choices=bm.BENCH_PRESETS,
                    help="model (default: sudoku; quick: tiny); the attention section uses the "
                         "maze preset (quick: tiny-attn) when this one has no attention")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=None, help="default: 768 accelerator, 2 CPU")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--steps-per-call", type=int, default=None, help="K (default 16, CPU 4)")
    ap.add_argument("--remat-steps", type=int, default=None, help="default 4 (quick 2)")
    ap.add_argument("--token-pad", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 5, quick 3)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="keep timing each variant until this many seconds (default 0.5, quick 0)")
    ap.add_argument("--xla-flag-sets", nargs="*", default=None)
    ap.add_argument("--out", default=None,
                    help="JSON (default benchmarks/results/<backend>-tuning[-quick].json)")
    ap.add_argument("--child-host", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "sudoku")
    args.batch = args.batch or (bm.by_backend(2, 768) if not args.quick else bm.by_backend(2, 64))
    args.steps_per_call = args.steps_per_call or bm.by_backend(4, 16)
    args.remat_steps = args.remat_steps or (2 if args.quick else 4)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 0.5)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    over = {"forward_dtype": args.dtype} if args.dtype else {}
    cfg = bm.model_preset(args.preset, **over)
    if args.child_host:
        child_host(args, cfg)
        return {}
    info = bm.machine_info()
    print(f"tuning on {bm.describe_machine(info)}: preset {args.preset}, batch {args.batch}",
          flush=True)
    fns = {"mlp_t": section_mlp_t, "attention": section_attention, "remat": section_remat,
           "host": section_host, "donation": section_donation, "flags": section_flags}
    results = {}
    for name in args.sections:
        t0 = time.perf_counter()
        rows, what = fns[name](args, cfg)
        results[name] = {"what": what, "rows": rows, "wall_s": time.perf_counter() - t0}
        bm.print_table(rows, title=f"{name}: {what}")
    suffix = "-quick" if args.quick else ""
    out = Path(args.out) if args.out else bm.default_out("tuning" + suffix)
    payload = {"benchmark": "tuning", "preset": args.preset, "batch": args.batch,
               "dtype": cfg.forward_dtype, "steps_per_call": args.steps_per_call,
               "remat_steps": args.remat_steps, "machine": info, "sections": results}
    bm.write_json(out, payload)
    print(f"\nwrote {out}")
    payload["out"] = str(out)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
