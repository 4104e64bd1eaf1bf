"""`eqr train --dry-run`: what a training run would do, without building data, compiling or
writing anything (docs/training.md, "The reference recipes")."""

from __future__ import annotations

from typing import Any, Mapping

import jax
from jax.sharding import Mesh

from eqr_jax import flops
from eqr_jax.config import RunConfig
from eqr_jax.data.bucket import dataset_dir
from eqr_jax.data.format import DataFormatError, dataset_info
from eqr_jax.data.loader import steps_per_epoch
from eqr_jax.data.prepare import check_matches_model, data_build_command
from eqr_jax.model import EqRModel, num_params
from eqr_jax.sharding import check_divisible, make_mesh
from eqr_jax.training import total_steps


def flops_per_step(cfg: RunConfig) -> tuple[int, str]:
    """Matmul FLOPs of one optimiser step (loss + gradient over the global batch) and a note.

    Rematerialisation (``model.remat_blocks``; ``train.remat`` with the full gradient) adds the
    recomputed forwards (`flops.remat_recompute_blocks`)."""
    m, tc = cfg.model, cfg.train
    per_recursion = (m.L_cycles + 1) * m.L_layers
    if m.variant == "feedforward" or tc.grad_mode in ("one_step",):
        fwd, grad, note = tc.unroll_steps, m.blocks_per_step, ""
    elif tc.grad_mode == "phantom":  # k damped steps on the tape, max(unroll_steps, k) in all
        fwd = max(tc.unroll_steps, tc.phantom_k)
        grad, note = tc.phantom_k * m.blocks_per_step, ""
    elif tc.grad_mode == "full":
        fwd, grad, note = tc.unroll_steps, tc.unroll_steps * m.blocks_per_step, ""
    elif tc.grad_mode == "implicit":
        fwd, grad = tc.implicit_maxiter, m.blocks_per_step
        note = f" (upper bound: {tc.implicit_maxiter} solver iterations; backward solve not counted)"
    else:  # truncated: only the last latent recursion of the last step is on the tape
        fwd, grad, note = tc.unroll_steps, per_recursion if m.H_cycles > 1 else m.blocks_per_step, ""
    again = flops.remat_recompute_blocks(
        grad, remat_blocks=m.remat_blocks,
        remat_steps=tc.remat and tc.grad_mode == "full" and m.variant != "feedforward")
    if again:
        note += f" (with {again} block forward(s) recomputed by rematerialisation)"
    return flops.train_step_flops(m, cfg.data.global_batch_size, grad, fwd, again), note


def plan(cfg: RunConfig, mesh: Mesh | None = None) -> dict[str, Any]:
    """What `train` would do with ``cfg``, without building data, compiling or writing anything.

    Reads the training split's metadata when ``data.path`` exists (and checks it against the
    model), else the counts the ``data.build_*`` recipe would produce. Returns a dict with the
    parameter count, FLOPs per optimiser step, data counts, steps per epoch, total steps and the
    evaluation / checkpoint schedule; `format_plan` prints it.
    """
    d, tc, G = cfg.data, cfg.train, cfg.data.global_batch_size
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    check_divisible(G, mesh, "data.global_batch_size")
    out: dict[str, Any] = {"preset": cfg.preset, "data_path": d.path}
    if dataset_dir(d.path).exists():
        check_matches_model(cfg)
        meta = dataset_info(d.path, "train")
        try:
            test_examples = dataset_info(d.path, "test").total_samples
        except DataFormatError:
            test_examples = None
        out.update(data_status="present", total_groups=int(meta.total_groups),
                   mean_puzzle_examples=float(meta.mean_puzzle_examples),
                   train_examples=meta.total_samples, test_examples=test_examples)
    else:
        per_group = 1 + d.build_num_aug
        test = (None if (d.build_kind == "sudoku" and d.build_source == "hub" and not d.build_test)
                else d.build_test)
        out.update(data_status=f"missing; built on first `eqr train` by: {data_build_command(cfg)}",
                   total_groups=d.build_train, mean_puzzle_examples=1.0,
                   train_examples=d.build_train * per_group, test_examples=test)
    spe = steps_per_epoch({"total_groups": out["total_groups"],
                  "mean_puzzle_examples": out["mean_puzzle_examples"]}, G)
    total = total_steps(cfg, spe)
    n_params = num_params(jax.eval_shape(EqRModel(cfg.model).init, jax.random.PRNGKey(0)))
    step_flops, flops_note = flops_per_step(cfg)
    epi = tc.epochs_per_iter or tc.epochs
    evals = (total // tc.eval_every if tc.eval_every > 0 else 0)
    final_eval = total > 0 and (tc.eval_every <= 0 or total % tc.eval_every != 0)
    ckpts = (total // tc.checkpoint_every if tc.checkpoint_every > 0 else 0)
    final_ckpt = total > 0 and (tc.checkpoint_every <= 0 or total % tc.checkpoint_every != 0)
    devs = list(mesh.devices.reshape(-1))
    out.update(
        parameters=n_params, flops_per_step=step_flops, flops_note=flops_note,
        global_batch_size=G, steps_per_epoch=spe, epochs=tc.epochs, epochs_per_iter=epi,
        loader_passes=-(-tc.epochs // epi) if epi else 0,
        steps_uncapped=tc.epochs * spe, max_steps=tc.max_steps, total_steps=total,
        eval_every=tc.eval_every, evaluations=evals + int(final_eval),
        eval_depth=cfg.eval_depth, eval_noise=cfg.eval.noise_scale,
        eval_batch_size=d.eval_batch,
        checkpoint_every=tc.checkpoint_every, checkpoints=ckpts + int(final_ckpt),
        keep_checkpoints=tc.keep_checkpoints, log_every=tc.log_every,
        steps_per_call=tc.steps_per_call, out_dir=tc.out_dir,
        devices=f"{n_dev} x {devs[0].platform} ({devs[0].device_kind})",
        processes=jax.process_count(), batch_per_device=G // n_dev)
    return out


def format_plan(p: Mapping[str, Any]) -> str:
    """Human-readable plan of `plan`; the last line is ``total_steps: N``."""
    m = p
    test = "all rows of the source" if m["test_examples"] is None else f"{m['test_examples']:,}"
    cap = (f" (capped by train.max_steps={m['max_steps']:,} from {m['steps_uncapped']:,})"
           if m["max_steps"] and m["max_steps"] < m["steps_uncapped"] else "")
    def sched(every: int, n: int) -> str:
        if every <= 0:
            return f"at the end only ({n} in all)"
        last = "" if m["total_steps"] % every == 0 else ", plus one at the end"
        return f"every {every:,} steps{last} ({n} in all)"

    ev = sched(m["eval_every"], m["evaluations"])
    noise = "as trained" if m["eval_noise"] is None else f"{m['eval_noise']:g}"
    ck = sched(m["checkpoint_every"], m["checkpoints"])
    lines = [
        f"preset: {m['preset']}",
        f"data: {m['data_path']} ({m['data_status']})",
        f"train examples: {m['train_examples']:,} in {m['total_groups']:,} groups "
        f"(mean puzzle examples {m['mean_puzzle_examples']:g}); test examples: {test}",
        f"parameters: {m['parameters']:,}",
        f"FLOPs per optimiser step: {m['flops_per_step']:.4g} (matmuls, global batch "
        f"{m['global_batch_size']}){m['flops_note']}",
        f"steps per epoch: {m['steps_per_epoch']:,} (max(floor(groups x mean puzzle examples / "
        f"batch), 1))",
        f"epochs: {m['epochs']:,} in {m['loader_passes']:,} loader pass(es) of "
        f"{m['epochs_per_iter']:,} epochs",
        f"total optimiser steps: {m['total_steps']:,}{cap}, {m['steps_per_call']} per jitted call",
        f"evaluation: {ev}, depth {m['eval_depth']}, breadth 1, batch "
        f"{m['eval_batch_size']}, noise {noise}, EMA weights",
        f"checkpoints: {ck}, keep the newest {m['keep_checkpoints']} + best, in "
        f"{m['out_dir']}/checkpoints",
        f"logging: every {m['log_every']} steps to {m['out_dir']}/tb",
        f"devices: {m['devices']}, {m['processes']} process(es), {m['batch_per_device']} rows "
        f"per device",
        f"total_steps: {m['total_steps']}",
    ]
    return "\n".join(lines)
