"""Ablation of gradient modes: the same run trained with each way of differentiating the dynamics.

For every mode (``truncated`` = the reference, ``full`` backprop through time, ``one_step``
phantom gradient, ``implicit`` through jaxopt) the same config, seed, data and step budget are
trained; each model is evaluated at several depths; and per mode we record the final train loss,
the step time, the peak memory of the compiled train step, and at one fixed checkpoint the
cosine between that mode's gradient and the full-unroll gradient. Results: docs/ablation.md.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import dynamics, modes, optim, reporting
from eqr_jax import training as train_lib
from eqr_jax.act import act_step, init_carry
from eqr_jax.checkpoint import load_for_inference
from eqr_jax.config import RunConfig, to_dict
from eqr_jax.data import prepare
from eqr_jax.data.loader import EvalLoader
from eqr_jax.evaluation import Evaluator
from eqr_jax.losses import loss_and_metrics
from eqr_jax.model import EqRModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common as bm  # noqa: E402  (benchmarks/common.py: compiled-memory measurement)

MODES = modes.GRAD_MODES


def _with_mode(cfg: RunConfig, mode: str, out_dir: str) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_mode=mode,
                                                              out_dir=out_dir))


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(a).astype(jnp.float32)
                            for a in jax.tree_util.tree_leaves(tree)])


def _cosine(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float(a @ b / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30))


def gradient_agreement(cfg: RunConfig, params, batch: dict, grad_modes: Sequence[str],
                       warm_steps: int = 2, seed: int = 0) -> dict[str, float]:
    """Cosine between each mode's gradient and the full-unroll gradient at ``params``.

    The ACT carry is first advanced ``warm_steps`` steps without gradient (so the latents are
    mid-trajectory, as during training), then every mode differentiates the same ACT step with
    the same key.
    """
    model = EqRModel(cfg.model)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in ("inputs", "labels",
                                                                    "puzzle_identifiers")}
    key = jax.random.PRNGKey(seed)
    carry = init_carry(model, batch)
    advance = jax.jit(lambda c, k: act_step(model, params, c, batch, k, training=False,
                                            adjoint=dynamics.NoGrad())[0])
    for i in range(warm_steps):
        carry = advance(carry, jax.random.fold_in(key, i))
    # Keep every row running (no reset) for the differentiated step.
    carry = carry._replace(halted=jnp.zeros_like(carry.halted))
    g = cfg.data.global_batch_size

    def grad_for(mode):
        adjoint = dynamics.adjoint_for(dataclasses.replace(cfg.train, grad_mode=mode))
        loss = lambda p: loss_and_metrics(model, p, carry, batch, key, adjoint=adjoint,
                                          unroll_steps=cfg.train.unroll_steps,
                                          global_batch_size=g)[0]
        return jax.jit(jax.grad(loss))(params)

    reference = grad_for("full")
    return {mode: (1.0 if mode == "full" else _cosine(grad_for(mode), reference))
            for mode in grad_modes}


def step_cost(cfg: RunConfig, repeats: int = 3) -> dict[str, float]:
    """Peak memory (compiled memory analysis) and median wall time of one jitted train step."""
    model = EqRModel(cfg.model)
    optimizer, _ = optim.make_optimizer(cfg.train, max(cfg.train.max_steps, 1))
    example = train_lib.example_batch(cfg)
    state = jax.jit(functools.partial(train_lib.init_train_state, model, cfg, optimizer))(example)
    step = train_lib.make_train_step(model, cfg, optimizer, steps_per_call=1)
    rng = np.random.default_rng(0)
    batches = {k: v[None] for k, v in example.items()}
    batches["inputs"] = rng.integers(1, cfg.model.vocab_size, batches["inputs"].shape,
                                     dtype=np.int32)
    batches["labels"] = rng.integers(2, cfg.model.vocab_size, batches["labels"].shape,
                                     dtype=np.int32)
    # One compilation serves the memory analysis and the timed calls.
    compiled = step.lower(state, batches).compile()
    mem = bm.memory_of(compiled)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        state, sums = compiled(state, batches)
        jax.block_until_ready(sums)
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return {"peak_bytes": mem["peak_bytes"], "temp_bytes": mem["temp_bytes"],
            "step_time_s": float(np.median(times))}


def run(cfg: RunConfig, out_dir: str | Path, *, grad_modes: Sequence[str] = MODES,
        depths: Sequence[int] = (1, 4, 16), progress: bool = False) -> dict[str, Any]:
    """Train ``cfg`` once per gradient mode and write ``ablation.json`` / ``ablation.md``.

    Returns ``{"rows": [...], "config": ..., "machine": ...}``; one row per mode with
    exact accuracy per depth, final train loss, step time, peak memory, gradient cosine.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in grad_modes:
        modes.check("gradient mode", m, MODES)
    prepare.ensure_dataset(cfg, progress=progress)
    prepare.check_matches_model(cfg)
    rows, finals = [], {}
    for mode in grad_modes:
        run_cfg = _with_mode(cfg, mode, str(out / mode))
        t0 = time.time()
        _, result = train_lib.train(run_cfg, prepare.make_loaders(run_cfg), progress=progress,
                                    verbose=False)
        wall = time.time() - t0
        _, params = load_for_inference(out / mode)
        finals[mode] = params
        ev = evaluate_depths(run_cfg, params, depths)
        cost = step_cost(run_cfg)
        rows.append({
            "mode": mode,
            **{f"exact@D{d}": ev[d] for d in depths},
            "final_train_loss": _first(result, ("train/total_loss", "train/lm_loss")),
            "step_time_ms": 1e3 * cost["step_time_s"],
            "peak_mem_MiB": cost["peak_bytes"] / 2**20,
            "temp_mem_MiB": cost["temp_bytes"] / 2**20,
            "train_wall_s": wall,
        })
    # One fixed checkpoint for every mode's gradient: the reference (truncated) run's weights,
    # or the first mode trained.
    anchor = finals.get("truncated", next(iter(finals.values())))
    batch = next(iter(_eval_loader(cfg)))
    cos = gradient_agreement(cfg, anchor, batch, grad_modes)
    for row in rows:
        row["grad_cos_vs_full"] = cos[row["mode"]]
    report = {"rows": rows, "depths": list(depths), "config": to_dict(cfg),
              "machine": reporting.machine_info()}
    reporting.write_json(out / "ablation.json", report)
    (out / "ablation.md").write_text(markdown_table(rows) + "\n")
    return report


def _first(d: dict, keys) -> float:
    for k in keys:
        if k in d:
            return float(d[k])
    return float("nan")


def _eval_loader(cfg: RunConfig) -> EvalLoader:
    return EvalLoader(cfg.data.path, cfg.data.eval_batch)


def evaluate_depths(cfg: RunConfig, params, depths: Sequence[int]) -> dict[int, float]:
    """Exact accuracy on the test split at each depth (breadth 1, fixed depth)."""
    eval_cfg = dataclasses.replace(cfg.eval, breadth=1, halt="fixed")
    res = Evaluator(EqRModel(cfg.model), eval_cfg).evaluate(params, _eval_loader(cfg),
                                                            depths=list(depths), breadths=[1])
    return {s["depth"]: s["metrics"]["all/exact_accuracy"] for s in res["settings"]}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    return reporting.format_table(rows, markdown=True)
