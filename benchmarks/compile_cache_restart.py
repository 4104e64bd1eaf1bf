"""What the persistent compilation cache saves on a restart (docs/accelerators.md,
"Compilation cache"): the wall time of the same short ``eqr train`` run as a fresh process with
the cache off, with an empty cache (it is written), and again with the filled cache (a
restarted or preempted run).

    python benchmarks/compile_cache_restart.py [--runs tiny,sudoku-shrunk] [--out FILE.json]

Two runs: the tiny preset, and the sudoku preset's architecture (81 tokens, hidden 512, 42
blocks per step) shrunk in data and batch (8 puzzles per step, 2 steps, evaluation depth 2) so
that compiling, not computing, dominates, as it does at a restart of a long run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "tiny": ["--preset", "tiny", "train.max_steps=20", "train.eval_every=20",
             "train.checkpoint_every=0"],
    "sudoku-shrunk": ["--preset", "sudoku", "data.global_batch_size=8", "data.eval_batch_size=8",
                      "data.build_source=generate", "data.build_train=64",
                      "data.build_num_aug=0", "data.build_test=8", "data.build_difficulty=any",
                      "train.max_steps=2", "train.epochs=2", "train.epochs_per_iter=0",
                      "train.eval_every=0", "train.checkpoint_every=0", "eval.depth=2"],
    # The smallest form (tests/test_benchmarks.py): the tiny preset, 2 steps, no evaluation.
    "micro": ["--preset", "tiny", "data.global_batch_size=8", "data.build_train=16",
              "data.build_num_aug=0", "data.build_test=8", "train.max_steps=2",
              "train.steps_per_call=1", "train.eval_every=0", "train.checkpoint_every=0"],
}


def _train(args: list[str], data: Path, out: Path, cache: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    env.pop("EQR_COMPILE_CACHE", None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "eqr_jax.cli", "train", *args, "--data",
                        str(data), "--build", "--out", str(out), "--no-progress",
                        "--compile-cache", cache], env=env, cwd=ROOT, capture_output=True,
                       text=True)
    if p.returncode:
        sys.exit(f"eqr train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/"
                                        "cpu-sandbox-compile-cache.json"))
    p.add_argument("--runs", default="tiny,sudoku-shrunk", help=f"of {', '.join(RUNS)}")
    a = p.parse_args(argv)
    unknown = [r for r in a.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    import jax

    res = {"machine": "2-core CPU sandbox (shared)", "jax": jax.__version__, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.runs.split(","):
            args, data, cache = RUNS[name], tmp / f"data-{name}", tmp / f"cache-{name}"
            if name != "micro":  # (the micro data build is too small to matter)
                _train(args, data, tmp / f"{name}-build", "off")  # builds the data; not timed
            t = {"off": _train(args, data, tmp / f"{name}-off", "off"),
                 "empty cache (written)": _train(args, data, tmp / f"{name}-cold", str(cache)),
                 "filled cache (restart)": _train(args, data, tmp / f"{name}-warm", str(cache))}
            files = list(cache.rglob("*"))
            t["cache_files"] = sum(f.is_file() for f in files)
            t["cache_bytes"] = sum(f.stat().st_size for f in files if f.is_file())
            t["restart_speedup"] = t["off"] / t["filled cache (restart)"]
            res["runs"][name] = {"command": "eqr train " + " ".join(args), **t}
            print(f"{name}: fresh process without cache {t['off']:.1f} s, writing the cache "
                  f"{t['empty cache (written)']:.1f} s, restart with the cache "
                  f"{t['filled cache (restart)']:.1f} s: {t['restart_speedup']:.2f}x faster "
                  f"({t['cache_files']} files, {t['cache_bytes'] / 1e6:.1f} MB)", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
