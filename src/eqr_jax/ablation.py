"""Ablation of gradient modes: the same run trained with each way of differentiating the dynamics.

A *spec* names one run: a gradient mode (``truncated`` = the reference, ``full`` backprop through
time, ``one_step`` / ``phantom`` phantom gradients, ``implicit`` per-row fixed point and implicit
function theorem), optionally ``+jac`` (Jacobian regularisation, ``train.jac_reg`` = the
``jac_reg`` argument) and ``@SEED`` (another ``train.seed``): ``implicit+jac@1``. Every spec
trains the same config, data and step budget. Per spec we record exact accuracy at several
depths over training steps and over training wall-clock (``curve_every``), the final train loss,
the step time and compiled peak memory of the train step, the fraction of rows whose implicit
solve converges (in training, and at the end from fresh latents), the spectral radius of the
step map at the end states of noisy depth-64 trajectories (`eqr_jax.analysis`), and, at fixed
checkpoints of the anchor run (the first ``truncated`` spec), the cosine between each spec's
training gradient and the full-unroll gradient. Results: docs/ablation.md; the command is
``python experiments/ablate_gradients.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import dynamics, modes, reporting, storage
from eqr_jax.analysis.stability import jacobian_spectral_radius
from eqr_jax import training as train_lib
from eqr_jax.measure import memory_of
from eqr_jax.train_program import make_train_program
from eqr_jax.act import act_step, init_carry
from eqr_jax.checkpoint import load_for_inference
from eqr_jax.config import RunConfig, to_dict
from eqr_jax.data import prepare
from eqr_jax.data.loader import EvalLoader
from eqr_jax.evaluation import Evaluator
from eqr_jax.losses import implicit_gradient_check, loss_and_metrics, sequence_exact
from eqr_jax.model import EqRModel
# The study's tables and plots (re-exported: experiments/ablate_gradients.py, the tests).
from eqr_jax.ablation_report import (implicit_table, markdown_table, plot_curves,  # noqa: F401
                                     study_tables)


MODES = modes.GRAD_MODES
# The study of docs/ablation.md: every mode, and regularised truncated / implicit.
STUDY = ("truncated", "one_step", "phantom", "full", "implicit", "implicit+jac", "truncated+jac")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One run of the ablation: ``name`` as given (``mode[+jac[=WEIGHT]][@seed]``);
    ``jac_weight`` None: the study's ``jac_reg``."""

    name: str
    grad_mode: str
    jac: bool = False
    seed: int | None = None
    jac_weight: float | None = None


def parse_spec(text: str) -> Spec:
    """``truncated``, ``implicit+jac``, ``implicit+jac=0.05``, ``one_step@1`` ... -> `Spec`
    (ValueError naming it)."""
    rest, seed = text, None
    if "@" in rest:
        rest, s = rest.split("@", 1)
        if not s.isdigit():
            raise ValueError(f"spec {text!r}: the seed after '@' must be an integer")
        seed = int(s)
    mode, jac, weight = rest, "+jac" in rest, None
    if jac:
        mode, w = rest.split("+jac", 1)
        if w:
            try:
                weight = float(w[1:]) if w.startswith("=") else float("nan")
            except ValueError:
                weight = float("nan")
            if not weight > 0:
                raise ValueError(f"spec {text!r}: '+jac=W' needs a positive weight W")
    modes.check("gradient mode", mode, MODES)
    return Spec(text, mode, jac, seed, weight)


def spec_config(cfg: RunConfig, spec: Spec, out_dir: str, jac_reg: float) -> RunConfig:
    """``cfg`` with the spec's gradient mode, regularisation, seed and run directory."""
    tc = dataclasses.replace(cfg.train, grad_mode=spec.grad_mode, out_dir=out_dir,
                             jac_reg=(jac_reg if spec.jac_weight is None else spec.jac_weight)
                             if spec.jac else 0.0,
                             seed=cfg.train.seed if spec.seed is None else spec.seed)
    return dataclasses.replace(cfg, train=tc)


def _with_mode(cfg: RunConfig, mode: str, out_dir: str) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_mode=mode,
                                                              out_dir=out_dir))


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(a).astype(jnp.float32)
                            for a in jax.tree_util.tree_leaves(tree)])


def _cosine(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float(a @ b / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30))


def _grad_fn(cfg: RunConfig, model: EqRModel, train_cfg):
    """Jitted ``(params, carry, batch, key) -> gradient`` of one ACT step's training loss under
    ``train_cfg``'s adjoint and Jacobian regularisation (compiled once, reused per anchor)."""
    def loss(p, carry, batch, key):
        return loss_and_metrics(model, p, carry, batch, key,
                                adjoint=dynamics.adjoint_for(train_cfg),
                                unroll_steps=train_cfg.unroll_steps,
                                global_batch_size=cfg.data.global_batch_size,
                                jac_reg=train_cfg.jac_reg,
                                jac_reg_samples=train_cfg.jac_reg_samples)[0]
    return jax.jit(jax.grad(loss))


class GradientProbe:
    """Cosine between a run's training gradient and the full-unroll gradient (of the loss without
    regularisation) at fixed parameter sets (``anchors``), on one batch.

    At each anchor the ACT carry is first advanced ``warm_steps`` steps without gradient
    (mid-trajectory latents, as in training), every row kept running; then every run
    differentiates the same ACT step with the same key. The carries and full gradients are
    computed once per anchor and reused for every run.
    """

    def __init__(self, cfg: RunConfig, anchors: Sequence[Any], batch: dict,
                 warm_steps: int = 2, seed: int = 0):
        self.cfg, self.anchors = cfg, list(anchors)
        self.model = model = EqRModel(cfg.model)
        self.batch = batch = {k: jnp.asarray(v) for k, v in batch.items()
                              if k in ("inputs", "labels", "puzzle_identifiers")}
        self.key = key = jax.random.PRNGKey(seed)
        advance = jax.jit(lambda p, c, k: act_step(model, p, c, batch, k, training=False,
                                                   adjoint=dynamics.NoGrad())[0])
        reference = _grad_fn(cfg, model, dataclasses.replace(cfg.train, grad_mode="full",
                                                             jac_reg=0.0))
        self.carries, self.references = [], []
        for params in self.anchors:
            carry = init_carry(model, batch)
            for i in range(warm_steps):
                carry = advance(params, carry, jax.random.fold_in(key, i))
            carry = carry._replace(halted=jnp.zeros_like(carry.halted))
            self.carries.append(carry)
            self.references.append(reference(params, carry, batch, key))

    def cosines(self, train_cfg) -> list[float]:
        """One cosine per anchor for the run configured by ``train_cfg`` (a `TrainConfig`)."""
        fn = _grad_fn(self.cfg, self.model, train_cfg)
        return [_cosine(fn(p, c, self.batch, self.key), ref)
                for p, c, ref in zip(self.anchors, self.carries, self.references)]


def gradient_cosines(cfg: RunConfig, anchors: Sequence[Any], batch: dict,
                     train_cfgs: dict[str, Any], warm_steps: int = 2,
                     seed: int = 0) -> list[dict[str, float]]:
    """`GradientProbe` cosines of every run in ``train_cfgs`` (name -> `TrainConfig`): one
    ``{name: cosine}`` per anchor."""
    probe = GradientProbe(cfg, anchors, batch, warm_steps, seed)
    per_run = {name: probe.cosines(tc) for name, tc in train_cfgs.items()}
    return [{name: c[i] for name, c in per_run.items()} for i in range(len(anchors))]


def gradient_agreement(cfg: RunConfig, params, batch: dict, grad_modes: Sequence[str],
                       warm_steps: int = 2, seed: int = 0) -> dict[str, float]:
    """`gradient_cosines` of the plain gradient modes at one parameter set."""
    cfgs = {m: dataclasses.replace(cfg.train, grad_mode=m, jac_reg=0.0) for m in grad_modes}
    return gradient_cosines(cfg, [params], batch, cfgs, warm_steps, seed)[0]


def step_cost(cfg: RunConfig, repeats: int = 3) -> dict[str, float]:
    """Peak memory (compiled memory analysis) and median wall time of one jitted train step."""
    program = make_train_program(cfg, max(cfg.train.max_steps, 1))  # the step `eqr train` runs
    state = program.init_state()
    step = program.step(1)
    rng = np.random.default_rng(0)
    batches = {k: v[None] for k, v in train_lib.example_batch(cfg).items()}
    batches["inputs"] = rng.integers(1, cfg.model.vocab_size, batches["inputs"].shape,
                                     dtype=np.int32)
    batches["labels"] = rng.integers(2, cfg.model.vocab_size, batches["labels"].shape,
                                     dtype=np.int32)
    # One compilation serves the memory analysis and the timed calls.
    compiled = step.lower(state, batches).compile()
    mem = memory_of(compiled)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        state, sums = compiled(state, batches)
        jax.block_until_ready(sums)
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return {"peak_bytes": mem["peak_bytes"], "temp_bytes": mem["temp_bytes"],
            "step_time_s": float(np.median(times))}


@functools.partial(jax.jit, static_argnames=("model", "depth"))
def _end_states(model: EqRModel, params, z0, x, key, depth: int):
    """Latents after ``depth`` noisy steps from ``z0`` (one compilation per model and depth)."""
    return dynamics.unroll(model.step, params, z0, x, key, depth, adjoint=dynamics.NoGrad())[0]


@functools.partial(jax.jit, static_argnames=("model", "method", "tol", "maxiter", "history"))
def _solve_from(model: EqRModel, params, z0, x, method: str, tol: float, maxiter: int,
                history: int) -> dynamics.FixedPointResult:
    """The implicit mode's forward solve from ``z0`` (no gradient)."""
    return dynamics.fixed_point(model.step, params, z0, x, method=method, tol=tol,
                                maxiter=maxiter, history_size=history, implicit_diff=False)


def end_state_stability(cfg: RunConfig, params, batch: dict, *, depth: int = 64,
                        rows: int = 64, radius_iters: int = 24,
                        radius_restarts: int = 2) -> dict[str, float]:
    """Where a trained model's trajectories end, on the first ``rows`` puzzles of ``batch``.

    Noisy trajectories (the model's training noise) of ``depth`` steps from fresh latents; at
    their end states: exact accuracy, the spectral radius of the noise-free step map's Jacobian
    (`eqr_jax.analysis.stability.jacobian_spectral_radius`; median and fraction < 1, for the
    rows that end correct and those that end wrong); and, from the same fresh latents, the
    fraction of rows whose implicit solve (``cfg.train.implicit_*``) converges and their median
    solver iterations.
    """
    model = EqRModel(cfg.model)
    tc = cfg.train
    inputs = jnp.asarray(batch["inputs"][:rows])
    labels = jnp.asarray(batch["labels"][:rows])
    valid = np.asarray(batch.get("mask", np.ones(len(batch["inputs"]), bool))[:rows])
    x = model.embed(params, inputs)
    z0 = model.init_latents(jax.random.PRNGKey(1), inputs.shape[0])
    end = _end_states(model, params, z0, x, jax.random.PRNGKey(2), depth)
    exact = np.asarray(sequence_exact(model.readout(params, end).logits, labels)[2])
    radius = np.asarray(jacobian_spectral_radius(model, params, end, x, iters=radius_iters,
                                                 restarts=radius_restarts))
    sol = _solve_from(model, params, z0, x, tc.implicit_method, tc.implicit_tol,
                      tc.implicit_maxiter, tc.implicit_history)
    conv = np.asarray(sol.converged)[valid]
    out = {"end_exact": float(exact[valid].mean()),
           "implicit_converged_frac": float(conv.mean()),
           "implicit_iters_median": float(np.median(np.asarray(sol.iterations)[valid]))}
    for name, sel in (("correct", valid & exact), ("wrong", valid & ~exact)):
        r = radius[sel]
        out[f"radius_{name}_n"] = int(sel.sum())
        out[f"radius_{name}_median"] = float(np.median(r)) if r.size else float("nan")
        out[f"radius_{name}_lt1"] = float((r < 1).mean()) if r.size else float("nan")
    return out


def _train_spec(run_cfg: RunConfig, run_dir: Path, init_params, depths: Sequence[int],
                curve_every: int, start: dict | None, progress: bool):
    """Train one spec to its total, stopping every ``curve_every`` steps (0: never) to
    evaluate its EMA weights at ``depths``. Returns the last `train` result, the curve (from
    ``start``, the shared warm start's point, when given) and the (step, params) of each curve
    point."""
    train_s, done, points = 0.0, 0, []
    curve = [dict(start)] if start is not None else []
    chunk = curve_every if curve_every > 0 else run_cfg.train.max_steps
    while True:
        t1 = time.time()
        _, result = train_lib.train(run_cfg, prepare.make_loaders(run_cfg),
                                    resume=done > 0, stop_after=chunk,
                                    init_params=init_params if done == 0 else None,
                                    progress=progress, verbose=False)
        train_s += time.time() - t1
        done = int(result["step"])
        if curve_every > 0:
            _, params = load_for_inference(run_dir)
            point = {"step": done, "train_wall_s": train_s,
                     **_accuracy_keys(evaluate_depths_all(run_cfg, params, depths))}
            for k in ("train/implicit_converged", "train/implicit_iters",
                      "train/implicit_backward_residual", "train/implicit_backward_iters",
                      "train/implicit_backward_fallback", "train/jac_fro", "train/step_time_s",
                      "train/total_loss"):
                if k in result:
                    point[k[len("train/"):]] = float(result[k])
            curve.append(point)
            points.append((done, params))
        if done >= result["total_steps"]:
            return result, curve, points


def run(cfg: RunConfig, out_dir: str | Path, *, grad_modes: Sequence[str] = MODES,
        depths: Sequence[int] = (1, 4, 16), progress: bool = False, curve_every: int = 0,
        jac_reg: float = 1.0, anchors: int = 3, stability_rows: int = 64,
        cost: bool = True) -> dict[str, Any]:
    """Train ``cfg`` once per spec (``grad_modes``: `parse_spec` names) and write
    ``ablation.json`` / ``ablation.md`` under ``out_dir`` (``ablation.json`` is rewritten after
    every run, so a study stopped early keeps what it finished).

    ``curve_every`` > 0 stops training every that many steps (a checkpoint and resume) to
    evaluate the EMA weights at ``depths``: the curves over steps and training wall-clock
    (``curve`` of each row; wall-clock counts training calls only, compilation included, not the
    evaluations). ``anchors`` fixed checkpoints of the anchor run (evenly spaced curve points,
    the last one its final weights) carry the gradient cosines (``grad_cos`` per row, the last
    as ``grad_cos_vs_full``; 0: no cosines). ``cost`` False skips `step_cost` (one more
    compilation per spec): the rows then have no step time or compiled memory. ``cfg.train.
    init_from`` starts every spec from those weights, evaluated once as the curves' step 0.

    Returns ``{"rows": [...], "config": ..., "machine": ...}``; one row per spec.
    """
    out = storage.path(out_dir, name="--out")
    storage.makedirs(out)
    specs = [parse_spec(m) for m in grad_modes]
    prepare.ensure_dataset(cfg, progress=progress)
    prepare.check_matches_model(cfg)
    anchor_name = next((s.name for s in specs if s.grad_mode == "truncated" and not s.jac),
                       specs[0].name)
    eval_batch = next(iter(_eval_loader(cfg)))
    rows, cfgs, anchor_params, probe = [], {}, [], None
    report = {"rows": rows, "depths": list(depths), "anchor": anchor_name,
              "config": to_dict(cfg), "machine": reporting.machine_info(),
              "jac_reg": jac_reg, "curve_every": curve_every}
    init_params = None
    if cfg.train.init_from:
        # Every spec continues from the same weights (the equilibrium-model recipe: pretrain
        # with an unrolled gradient, then switch modes); the shared start is the curves' step 0.
        from eqr_jax.warm_start import initial_params

        init_params = initial_params(cfg)  # loaded and fitted once, for every spec
        report["init_from"] = init_params.source
        report["start"] = {"step": 0, "train_wall_s": 0.0, **_accuracy_keys(
            evaluate_depths_all(cfg, init_params.params, depths))}
    t_study = time.time()
    for spec in specs:
        run_cfg = spec_config(cfg, spec, str(out / spec.name), jac_reg)
        cfgs[spec.name] = run_cfg.train
        t0 = time.time()
        result, curve, points = _train_spec(run_cfg, out / spec.name, init_params, depths,
                                            curve_every, report.get("start"), progress)
        wall = time.time() - t0
        _, params = load_for_inference(out / spec.name)
        if spec.name == anchor_name:
            anchor_params.extend(points or [(int(result["step"]), params)])
        ev = (dict(curve[-1]) if curve_every > 0 else
              _accuracy_keys(evaluate_depths_all(run_cfg, params, depths)))
        row = {
            "mode": spec.name,
            **{k: v for k, v in ev.items() if k.startswith(("exact@", "token@"))},
            "final_train_loss": _first(result, ("train/total_loss", "train/lm_loss")),
            "train_wall_s": wall,
        }
        if cost:
            c = step_cost(run_cfg)
            row.update(step_time_ms=1e3 * c["step_time_s"], peak_mem_MiB=c["peak_bytes"] / 2**20,
                       temp_mem_MiB=c["temp_bytes"] / 2**20)
        for k in ("train/implicit_converged", "train/implicit_iters", "train/jac_fro",
                  "train/implicit_backward_residual", "train/implicit_backward_iters",
                  "train/implicit_backward_fallback"):
            if k in result:
                row[k[len("train/"):]] = float(result[k])
        if stability_rows > 0:
            row.update(end_state_stability(run_cfg, params, eval_batch,
                                           depth=max(depths), rows=stability_rows))
        row["curve"] = curve
        rows.append(row)
        if probe is None and spec.name == anchor_name and anchors > 0:
            # Fixed checkpoints for every run's gradient: evenly spaced ones of the anchor run.
            picks = sorted({round(i * (len(anchor_params) - 1) / max(anchors - 1, 1))
                            for i in range(max(anchors, 1))})
            chosen = [anchor_params[i] for i in picks]
            probe = GradientProbe(cfg, [p for _, p in chosen], eval_batch)
            report["grad_cos_steps"] = [st for st, _ in chosen]
        if probe is not None:  # this run, and any that ran before the anchor
            for r in rows:
                if "grad_cos" not in r:
                    r["grad_cos"] = probe.cosines(cfgs[r["mode"]])
                    r["grad_cos_vs_full"] = r["grad_cos"][-1]
                    if cfgs[r["mode"]].grad_mode == "implicit":  # and against the exact implicit
                        r["implicit_check"] = implicit_gradient_check(
                            probe.model, list(zip(probe.anchors, probe.carries)), probe.batch,
                            probe.key, cfgs[r["mode"]])
        report["study_wall_s"] = time.time() - t_study
        reporting.write_json(out / "ablation.json", report)
    reporting.write_json(out / "ablation.json", report)
    storage.write_text(out / "ablation.md", markdown_table(rows) + "\n")
    return report


def _first(d: dict, keys) -> float:
    for k in keys:
        if k in d:
            return float(d[k])
    return float("nan")


def _eval_loader(cfg: RunConfig) -> EvalLoader:
    return EvalLoader(cfg.data.path, cfg.data.eval_batch)


def evaluate_depths(cfg: RunConfig, params, depths: Sequence[int],
                    metric: str = "exact_accuracy") -> dict[int, float]:
    """``all/{metric}`` on the test split at each depth (breadth 1, fixed depth)."""
    both = evaluate_depths_all(cfg, params, depths)
    return {d: m[metric] for d, m in both.items()}


def evaluate_depths_all(cfg: RunConfig, params, depths: Sequence[int]) -> dict[int, dict]:
    """Exact and token accuracy (``exact_accuracy``, ``accuracy``) on the test split at each
    depth (breadth 1, fixed depth): ``{depth: {metric: value}}``."""
    eval_cfg = dataclasses.replace(cfg.eval, breadth=1, halt="fixed")
    res = Evaluator(EqRModel(cfg.model), eval_cfg).evaluate(params, _eval_loader(cfg),
                                                            depths=list(depths), breadths=[1])
    return {s["depth"]: {k: s["metrics"][f"all/{k}"] for k in ("exact_accuracy", "accuracy")}
            for s in res["settings"]}


def _accuracy_keys(ev: dict[int, dict]) -> dict[str, float]:
    """``exact@Dd`` and ``token@Dd`` columns of `evaluate_depths_all`'s result."""
    out = {f"exact@D{d}": m["exact_accuracy"] for d, m in ev.items()}
    out.update({f"token@D{d}": m["accuracy"] for d, m in ev.items()})
    return out


def load_report(path: str | Path) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.path(path, name="report")))


def rescore(out_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """Re-evaluate a study's kept checkpoints (``out_dir/<run>/checkpoints/<step>``) at its
    depths and fill in the exact and token accuracy of those curve points (for a study run
    before the curves recorded token accuracy); rewrites ``ablation.json``. Each evaluation is
    cached in ``rescore.json``, so it can run beside a study that is still going (``write``
    False: fill the cache only) and again at its end."""
    out = storage.path(out_dir, name="--out")
    report = load_report(out / "ablation.json")
    depths = report["depths"]
    cache_path = out / "rescore.json"
    cache = load_report(cache_path) if cache_path.exists() else {}
    for row in report["rows"]:
        ckpts = out / row["mode"] / "checkpoints"
        for point in row.get("curve", []):
            key = f"{row['mode']}/{point['step']}"
            if key not in cache and (ckpts / str(point["step"])).is_dir():
                run_cfg, params = load_for_inference(ckpts / str(point["step"]))
                cache[key] = _accuracy_keys(evaluate_depths_all(run_cfg, params, depths))
                reporting.write_json(cache_path, cache)
            point.update(cache.get(key, {}))
        if row.get("curve") and f"token@D{depths[0]}" in row["curve"][-1]:
            row.update({k: v for k, v in row["curve"][-1].items()
                        if k.startswith(("exact@", "token@"))})
    if write:
        reporting.write_json(out / "ablation.json", report)
    return report
