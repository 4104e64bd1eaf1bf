"""Train one config with each gradient mode and compare them (see experiments/ablation.py).

    python experiments/ablate_gradients.py                         # tiny preset, CPU, minutes
    python experiments/ablate_gradients.py --preset sudoku --data data/sudoku-extreme-1k-aug-1000 \
        --steps 5000 --depths 16,64 train.unroll_steps=4            # on an accelerator

Writes ``ablation.json`` and ``ablation.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from eqr_jax import config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402  (experiments/ablation.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(config.PRESETS))
    p.add_argument("--data", help="dataset folder (default: the preset's; built if missing)")
    p.add_argument("--out", default="runs/ablate_gradients")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per mode")
    p.add_argument("--modes", default=",".join(ablation.MODES))
    p.add_argument("--depths", default="1,4,16")
    p.add_argument("--progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    cfg = config.apply_overrides(config.preset(args.preset), args.overrides)
    data = dataclasses.replace(cfg.data, path=args.data) if args.data else cfg.data
    cfg = dataclasses.replace(cfg, data=data, train=dataclasses.replace(
        cfg.train, max_steps=args.steps, eval_every=0, checkpoint_every=0, log_every=0))
    report = ablation.run(cfg, args.out, grad_modes=args.modes.split(","),
                          depths=[int(d) for d in args.depths.split(",")],
                          progress=args.progress)
    print(ablation.markdown_table(report["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
