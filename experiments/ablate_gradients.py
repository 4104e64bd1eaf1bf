"""Train one config with each gradient mode and compare them (the study: `eqr_jax.ablation`).

    python experiments/ablate_gradients.py                         # tiny preset, CPU, minutes
    python experiments/ablate_gradients.py --preset sudoku6 --modes study --curve-every 50 \
        --depths 4,16,64 --plots docs/assets/ablation_sudoku6       # docs/ablation.md's study
    python experiments/ablate_gradients.py --preset sudoku6 --init-from runs/s6base --steps 240 \
        --curve-every 60 --depths 4,16,64       # every mode continues a trained model (the doc's)
    python experiments/ablate_gradients.py --preset sudoku --data data/sudoku-extreme-1k-aug-1000 \
        --modes study --steps 5000 --curve-every 500 --depths 4,16,64   # on an accelerator

``--modes`` takes specs ``mode[+jac[=W]][@seed]`` (``implicit+jac``, ``implicit+jac=0.05``,
``truncated@1``) or ``study``
(`ablation.STUDY`). Writes ``ablation.json`` and ``ablation.md`` under ``--out`` (and, with
``--plots PREFIX``, ``PREFIX_{exact,token}_{steps,wallclock}.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from eqr_jax import ablation, config, storage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(config.PRESETS))
    p.add_argument("--data", help="dataset folder (default: the preset's; built if missing)")
    p.add_argument("--out", default="runs/ablate_gradients")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per mode")
    p.add_argument("--modes", default=",".join(ablation.MODES))
    p.add_argument("--depths", default="1,4,16")
    p.add_argument("--curve-every", type=int, default=0,
                   help="evaluate every N steps for the accuracy curves (0: only at the end)")
    p.add_argument("--jac-reg", type=float, default=1.0,
                   help="train.jac_reg of the '+jac' specs ('+jac=W' gives its own)")
    p.add_argument("--anchors", type=int, default=3,
                   help="fixed checkpoints of the anchor run for the gradient cosines (0: none)")
    p.add_argument("--no-cost", action="store_true",
                   help="skip the step time and compiled memory (one compilation per run)")
    p.add_argument("--stability-rows", type=int, default=64,
                   help="test puzzles for the end-state spectral radius (0: skip)")
    p.add_argument("--plots", help="path prefix of the curve plots (PNG)")
    p.add_argument("--rescore", action="store_true",
                   help="only re-evaluate the kept checkpoints of the study in --out "
                        "(exact and token accuracy of its curve points) and redraw --plots")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start every run from these weights (a run directory, a checkpoint "
                        "step or an official .pth, as `eqr train --init-from`); the optimiser "
                        "and schedule start fresh. The equilibrium-model recipe: pretrain with "
                        "an unrolled gradient, then switch modes")
    p.add_argument("--progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    cfg = config.apply_overrides(config.preset(args.preset), args.overrides)
    data = dataclasses.replace(cfg.data, path=args.data) if args.data else cfg.data
    init = (str(storage.absolute(args.init_from, name="--init-from")) if args.init_from
            else cfg.train.init_from)
    cfg = dataclasses.replace(cfg, data=data, train=dataclasses.replace(
        cfg.train, max_steps=args.steps, eval_every=0, checkpoint_every=0, log_every=0,
        init_from=init))
    specs = ablation.STUDY if args.modes == "study" else args.modes.split(",")
    if args.rescore:
        report = ablation.rescore(args.out)
    else:
        report = ablation.run(cfg, args.out, grad_modes=specs,
                              depths=[int(d) for d in args.depths.split(",")],
                              progress=args.progress, curve_every=args.curve_every,
                              jac_reg=args.jac_reg, anchors=args.anchors,
                              stability_rows=args.stability_rows, cost=not args.no_cost)
    if args.plots:
        for metric in ("exact", "token"):
            for x, suffix in (("step", "steps"), ("train_wall_s", "wallclock")):
                print(ablation.plot_curves(report, f"{args.plots}_{metric}_{suffix}.png", x=x,
                                           metric=metric))
    print(ablation.markdown_table(report["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
