"""Record K = 3 official training steps (float32, deterministic) as a test fixture for eqr-jax.

    python benchmarks/make_train_step_fixture.py --official ~/src/EqR \
        --out tests/fixtures/train_step_parity.npz

Needs torch and a checkout of github.com/locuslab/EqR (its model, ACT loss head, EMA helper and
lr schedule are imported from there; its CUDA-only AdamATan2 is re-implemented in
``benchmarks/_official.py``). ``tests/test_training_parity.py`` replays the steps with
``eqr_jax.training.make_train_step`` and compares at atol = rtol = 1e-4.

With update noise 0, exploration 0 and latent init std 0, three optimiser steps from given weights,
carry and batches are deterministic as long as no row halts on its q-halt logit (the q head starts
at bias -5; the script checks that every q_halt stays below -1, so halting is by the step limit
only). The carry is chosen so that the window exercises the whole ACT bookkeeping, with
``halt_max_steps = 3`` and batch 8:

* rows 0-2 start halted: reset at step 1 (latents -> 0, the rows of batch 1), halt after step 3;
* rows 3-5 have done 2 ACT steps: halt after step 1, reset at step 2 with the rows of batch 2;
* rows 6-7 have done 1 ACT step: halt after step 2, reset at step 3 with the rows of batch 3;
* row 3's labels are the official step-1 predictions (a solved row: exact accuracy 1, halting
  target 1), row 4 has 10 ignored labels (-100); all rows of the initial carry hold random
  latents (the reset rows' are discarded).

No row is all padding: the reference's halting target for a row without supervised tokens is 1
(vacuously "all correct"), eqr-jax's is 0 (documented in docs/reference-parity.md); the reference
trainer never sees such rows (under-filled batches are dropped).

Recorded per case (``<case>/...``): config_json (official model config), train_json
(hyper-parameters), params0/<name> (official names, torch layout), carry0/{z_H, z_L, steps,
halted, data/<key>}, batch<k>/<key> for k = 1..3, and after each step k: step<k>/metrics/<key>
(official metric sums: count, accuracy, exact_accuracy, q_halt_accuracy, steps, lm_loss,
q_halt_loss, total_loss; plus grad_norm and lr), step<k>/q_halt, step<k>/carry/{steps, halted,
data/inputs}, step<k>/params/<name>; after step 3 also step3/ema/<name>.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

K = 3
BATCH = 8
HALT_MAX = 3
HP = dict(lr=1e-3, warmup=2, lr_min_ratio=0.1, total_steps=6, weight_decay=1.0, ema_rate=0.9,
          beta1=0.9, beta2=0.95)
COMMON = dict(H_layers=0, halt_max_steps=HALT_MAX, halt_exploration_prob=0.0, noise_scale=0.0,
              H_init_std=0.0, L_init_std=0.0, lambda_=0.95, forward_dtype="float32",
              rms_norm_eps=1e-5, rope_theta=10000.0, board_height=None, board_width=None)
CASES = {
    # The Sudoku preset's block type (token-mixing MLP) at 9x9 size, one layer, hidden 32.
    "sudoku_mlpt": dict(seq_len=81, vocab_size=11, H_cycles=2, L_cycles=2, L_layers=1,
                        hidden_size=32, expansion=4.0, num_heads=4, pos_encodings="rope",
                        mlp_t=True),
    # The Maze preset's block type (attention + 1-D RoPE) on 16 tokens, hidden 16, 2 heads.
    "maze_attn_rope": dict(seq_len=16, vocab_size=6, H_cycles=2, L_cycles=2, L_layers=1,
                           hidden_size=16, expansion=4.0, num_heads=2, pos_encodings="rope",
                           mlp_t=False),
}


def sudoku_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n valid 9x9 Sudoku (inputs, labels) in the dataset's tokens (blank 1, digit d -> d + 1)."""
    base = np.array([[(3 * (r % 3) + r // 3 + c) % 9 for c in range(9)] for r in range(9)])
    xs, ys = [], []
    for _ in range(n):
        bands = rng.permutation(3)
        rows = np.concatenate([3 * b + rng.permutation(3) for b in bands])
        stacks = rng.permutation(3)
        cols = np.concatenate([3 * s + rng.permutation(3) for s in stacks])
        sol = rng.permutation(9)[base[rows][:, cols]] + 1  # digits 1..9
        y = (sol + 1).reshape(-1)
        x = y.copy()
        x[rng.choice(81, rng.integers(45, 60), replace=False)] = 1
        xs.append(x)
        ys.append(y)
    return np.array(xs, np.int32), np.array(ys, np.int32)


def make_batch(case: str, ref: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if case.startswith("sudoku"):
        x, y = sudoku_rows(rng, BATCH)
    else:
        n, v = ref["seq_len"], ref["vocab_size"]
        x = rng.integers(1, v, (BATCH, n)).astype(np.int32)
        y = rng.integers(1, v, (BATCH, n)).astype(np.int32)
    return {"inputs": x, "labels": y, "puzzle_identifiers": np.zeros(BATCH, np.int32)}


def trunc_normal(rng: np.random.Generator, shape) -> np.ndarray:
    out = rng.standard_normal(shape)
    while (bad := np.abs(out) > 2).any():
        out[bad] = rng.standard_normal(int(bad.sum()))
    return (out / 0.8796256610342398).astype(np.float32)


def record_case(official: str, case: str, seed: int) -> dict[str, np.ndarray]:
    import torch
    from _official import OfficialTrainer

    ref = {**COMMON, **CASES[case], "batch_size": BATCH}
    hp = SimpleNamespace(batch=BATCH, lr=HP["lr"], warmup=HP["warmup"],
                         lr_min_ratio=HP["lr_min_ratio"], steps=HP["total_steps"],
                         weight_decay=HP["weight_decay"], ema_rate=HP["ema_rate"])
    rng = np.random.default_rng(seed)
    trainer = OfficialTrainer(official, ref, hp, init_seed=seed)
    batches = [make_batch(case, ref, rng) for _ in range(K + 1)]
    data0 = {k: v.copy() for k, v in batches[0].items()}
    data0["labels"][4, :10] = -100
    shape = (BATCH, ref["seq_len"], ref["hidden_size"])
    z_H0, z_L0 = trunc_normal(rng, shape), trunc_normal(rng, shape)
    steps0 = np.array([0, 0, 0, 2, 2, 2, 1, 1], np.int32)
    halted0 = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)

    # Row 3 solved: its labels become the official step-1 predictions (a dry run on a copy).
    trainer.set_carry(z_H0, z_L0, steps0, halted0, data0)
    with torch.no_grad():
        _, _, _, out, _ = trainer.head(carry=copy.deepcopy(trainer.carry),
                                       batch={k: torch.from_numpy(v) for k, v in
                                              batches[1].items()},
                                       return_keys=["logits"])
    logits = out["logits"][3].double().numpy()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    margin = float(np.min(top2[:, 1] - top2[:, 0]))
    if margin < 1e-3:
        raise SystemExit(f"{case}: row 3's step-1 logits have a near tie ({margin:.1e}); "
                         "choose another seed")
    data0["labels"][3] = np.argmax(logits, axis=-1).astype(np.int32)

    rec: dict[str, np.ndarray] = {
        "config_json": np.array(json.dumps(ref)), "train_json": np.array(json.dumps(HP)),
        "carry0/z_H": z_H0, "carry0/z_L": z_L0, "carry0/steps": steps0, "carry0/halted": halted0,
        "solved_row_min_logit_margin": np.array(margin)}
    rec.update({f"carry0/data/{k}": v for k, v in data0.items()})
    rec.update({f"params0/{_strip(k)}": v for k, v in trainer.state_dict().items()})
    trainer.set_carry(z_H0, z_L0, steps0, halted0, data0)
    for k in range(1, K + 1):
        rec.update({f"batch{k}/{n}": v for n, v in batches[k].items()})
        m = trainer.train_step(batches[k], outputs=True)
        q = m.pop("q_halt")
        if q.max() >= -1.0:
            raise SystemExit(f"{case}: q_halt reached {q.max():.3f} at step {k}; halting would "
                             "depend on it (lower the learning rate)")
        rec[f"step{k}/q_halt"] = q
        rec.update({f"step{k}/metrics/{n}": np.array(v, np.float64) for n, v in m.items()})
        c = trainer.carry_numpy()
        rec.update({f"step{k}/carry/{n}": c[n] for n in ("steps", "halted", "data/inputs")})
        rec.update({f"step{k}/params/{_strip(n)}": v for n, v in trainer.state_dict().items()})
        print(f"[fixture] {case} step {k}: total_loss {m['total_loss']:.6f} count "
              f"{m['count']:.0f} exact {m['exact_accuracy']:.0f} lr {m['lr']:.3g} q_halt max "
              f"{q.max():.3f} halted {c['halted'].astype(int).tolist()}", flush=True)
    rec.update({f"step{K}/ema/{_strip(n)}": v for n, v in trainer.ema_dict().items()})
    return {f"{case}/{k}": v for k, v in rec.items()}


def _strip(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="checkout of locuslab/EqR")
    p.add_argument("--out", default="tests/fixtures/train_step_parity.npz")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    out: dict[str, np.ndarray] = {}
    for case in CASES:
        out.update(record_case(a.official, case, a.seed))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **out)
    print(f"[fixture] wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB, "
          f"{len(out)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
