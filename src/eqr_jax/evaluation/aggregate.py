"""Aggregations over per-puzzle results: pass@k, majority vote, convergence top-k, and the
per-setting summary with the evaluator's metric names (docs/evaluation.md).

Plain NumPy over arrays that hold real puzzles only (callers drop padding rows first). The
definitions follow the reference evaluator's, with two of its quirks fixed: padding rows never
count, and the first residual is measured against the initial latents.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from eqr_jax.losses import IGNORE_LABEL

def pass_at_k(n: int, c, k: int) -> np.ndarray:
    """Unbiased pass@k: probability that ``k`` of ``n`` samples, ``c`` of them correct, hit one.

    ``1 - C(n - c, k) / C(n, k)``, evaluated as a stable product; 1 when ``n - c < k``, 0 when
    ``c == 0``. ``c`` may be an array (one count per puzzle); returns float64 of its shape.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    c = np.asarray(c, np.int64)
    if np.any((c < 0) | (c > n)):
        raise ValueError(f"correct counts must lie in [0, {n}]")
    out = np.empty(c.shape, np.float64)
    for idx, ci in np.ndenumerate(c):
        if n - ci < k:
            out[idx] = 1.0
        else:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(n - ci + 1, n + 1, dtype=np.float64))
    return out


def any_correct(exact) -> float:
    """Fraction of puzzles with at least one exact copy; ``exact`` is (puzzles, copies) bool."""
    exact = np.asarray(exact, bool)
    return float(exact.any(axis=1).mean()) if exact.size else 0.0


def avg_pass_rate(exact) -> float:
    """Mean over puzzles of the fraction of exact copies; ``exact`` is (puzzles, copies) bool."""
    exact = np.asarray(exact, bool)
    return float(exact.mean()) if exact.size else 0.0


def pass_at_k_table(exact, ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k over puzzles for ``ks`` (default 1, 2, 4, ... < copies)."""
    exact = np.asarray(exact, bool)
    n = exact.shape[1]
    ks = [k for k in (2 ** i for i in range(20)) if k < n] if ks is None else ks
    c = exact.sum(axis=1)
    return {k: float(pass_at_k(n, c, k).mean()) for k in ks}


class MajorityVote(NamedTuple):
    winner: np.ndarray  # (puzzles, seq) the most frequent whole prediction
    votes: np.ndarray  # (puzzles,) how many copies predicted it
    exact: np.ndarray  # (puzzles,) bool: winner right on every supervised token
    n_correct: np.ndarray  # (puzzles,) correct supervised winner tokens
    n_valid: np.ndarray  # (puzzles,) supervised tokens


def majority_vote(preds, labels) -> MajorityVote:
    """Whole-sequence majority vote over copies.

    Args:
      preds: (puzzles, copies, seq) predicted token ids.
      labels: (puzzles, seq), `IGNORE_LABEL` marks unsupervised positions.
    Ties go to the prediction seen first in copy order. A puzzle without supervised tokens is
    never exact.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    p, n, s = preds.shape
    winner = np.empty((p, s), preds.dtype)
    votes = np.empty((p,), np.int64)
    for b in range(p):
        uniq, first, inverse, counts = np.unique(preds[b], axis=0, return_index=True,
                                                 return_inverse=True, return_counts=True)
        # Highest count, then earliest first appearance.
        best = np.lexsort((first, -counts))[0]
        winner[b], votes[b] = uniq[best], counts[best]
    mask = labels != IGNORE_LABEL
    n_correct = np.sum(mask & (winner == labels), axis=1)
    n_valid = mask.sum(axis=1)
    return MajorityVote(winner, votes, (n_correct == n_valid) & (n_valid > 0), n_correct, n_valid)


def convergence_top_k(scores, exact, k: int) -> dict[str, float]:
    """Verifier-free selection: per puzzle keep the ``k`` copies with the lowest scores.

    Args:
      scores: (puzzles, copies) convergence scores (lower = more converged).
      exact: (puzzles, copies) bool correctness of each copy.
      k: copies kept per puzzle (clipped to the number of copies).
    Returns the reference's keys (without prefix): ``exact_accuracy`` (correct chosen / (P k)),
    ``any_correct``, ``avg_convergence_score``, ``pass@j`` (j = 1, 2, 4, ... < k),
    ``cumulative_exact_acc_top{i}`` (i = 1..k), ``total_samples``, ``k``. Ties keep copy order.
    """
    scores, exact = np.asarray(scores, np.float64), np.asarray(exact, bool)
    p, n = scores.shape
    k = max(1, min(int(k), n))
    order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(exact, order, axis=1)
    chosen_scores = np.take_along_axis(scores, order, axis=1)
    out = {"exact_accuracy": float(chosen.mean()), "any_correct": float(chosen.any(1).mean()),
           "avg_convergence_score": float(chosen_scores.mean(1).mean()),
           "total_samples": int(p), "k": int(k)}
    c = chosen.sum(axis=1)
    for j in (2 ** i for i in range(20)):
        if j >= k:
            break
        out[f"pass@{j}"] = float(pass_at_k(k, c, j).mean())
    cum = np.cumsum(chosen, axis=1)
    for i in range(1, k + 1):
        out[f"cumulative_exact_acc_top{i}"] = float(cum[:, i - 1].mean() / i)
    return out


class BatchResult(NamedTuple):
    """Per puzzle and copy results of one batch on the host (puzzle-major: (B, copies, ...)).

    ``steps`` counts the step-map applications (or solver iterations) a row used; ``residual`` is
    its last latent residual ‖S_t − S_{t−1}‖₂ over [z_H; z_L] (S_0 = the initial latents);
    ``score`` the convergence score (mean over the last ``window`` logit changes of the per-token
    L2 norm, lowest = most converged); ``trace_*`` the residual-vs-step record (sums over the
    real rows that took that step, slots with step 0 unused; empty from the streaming evaluator,
    which records it per setting); ``loop_steps`` the iterations of the batch loop (max over
    chunks; -1 when streamed); ``executed`` the row-steps the loops computed for this batch,
    frozen and padding rows included (0 when streamed: a pool's cost is per setting);
    ``mask`` and ``labels`` the batch as evaluated (False rows are padding).
    """

    preds: np.ndarray  # (B, n, N) int32
    n_correct: np.ndarray  # (B, n) int32
    n_valid: np.ndarray  # (B,) int32
    exact: np.ndarray  # (B, n) bool
    steps: np.ndarray  # (B, n) int32
    score: np.ndarray  # (B, n) float32
    residual: np.ndarray  # (B, n) float32
    q_halt: np.ndarray  # (B, n) float32
    trace_steps: np.ndarray  # (K,) int32
    trace_sum: np.ndarray  # (K,) float64
    trace_count: np.ndarray  # (K,) int64
    loop_steps: int
    executed: int
    mask: np.ndarray  # (B,) bool
    labels: np.ndarray  # (B, N) int32


class SettingAccumulator:
    """One (depth, breadth) setting's per-puzzle results, accumulated over batches (real rows
    only), with the residual record, the row-steps the loops executed and the time spent."""

    def __init__(self):
        self.parts: dict[str, list] = {}
        self.trace: dict[int, list[float]] = {}
        self.votes: list[np.ndarray] = []
        self.seconds = 0.0
        self.loop_steps: list[int] = []
        self.executed = 0

    def add(self, r, seconds: float = 0.0) -> None:
        """Add a host `eqr_jax.evaluation.BatchResult` (its ``mask`` selects the real rows)."""
        keep = np.asarray(r.mask, bool)
        for name in ("n_correct", "exact", "steps", "score", "residual", "q_halt"):
            self.parts.setdefault(name, []).append(getattr(r, name)[keep])
        self.parts.setdefault("n_valid", []).append(r.n_valid[keep])
        if r.exact.shape[1] > 1:
            mv = majority_vote(r.preds[keep], r.labels[keep])
            self.votes.append(np.stack([mv.exact, mv.n_correct, mv.n_valid], axis=1))
        self.add_trace(r.trace_steps, r.trace_sum, r.trace_count)
        self.seconds += seconds
        if r.loop_steps >= 0:  # -1: streamed
            self.loop_steps.append(r.loop_steps)
        self.executed += int(r.executed)

    def add_trace(self, steps, sums, counts) -> None:
        """Add a residual record (slots with step 0 are unused)."""
        for s, tot, cnt in zip(steps, sums, counts):
            if s > 0:
                e = self.trace.setdefault(int(s), [0.0, 0])
                e[0] += float(tot)
                e[1] += int(cnt)

    def get(self, name: str) -> np.ndarray:
        return np.concatenate(self.parts[name], axis=0)


def summarize_setting(acc: SettingAccumulator, depth: int, breadth: int,
                      top_k: int) -> dict[str, Any]:
    """The evaluator's metrics of one setting, plus its steps histogram and residual record.

    Metric names (shared by training's periodic evaluation, ``eqr eval`` and ``eqr solve``):
    ``all/exact_accuracy`` (mean over puzzles and copies), ``all/accuracy`` (supervised tokens),
    ``all/q_halt_accuracy``, ``all/steps``, ``all/final_residual``, ``halting/*``; with
    breadth > 1 ``different_init/*``, ``majority_vote/*`` and ``convergence_top_k/*``; and
    ``num_puzzles``, ``count`` (puzzles x copies), ``time_s``.
    """
    exact, steps = acc.get("exact"), acc.get("steps")
    n_correct, n_valid = acc.get("n_correct"), acc.get("n_valid")
    p = exact.shape[0]
    mean = lambda a: float(np.mean(a)) if p else 0.0
    m: dict[str, Any] = {
        "num_puzzles": int(p), "count": int(exact.size),
        "all/exact_accuracy": mean(exact),
        "all/accuracy": float(n_correct.sum() / max(1, n_valid.sum() * breadth)),
        "all/q_halt_accuracy": mean((acc.get("q_halt") > 0) == exact),
        "all/steps": mean(steps),
        "all/final_residual": mean(acc.get("residual")),
        "halting/mean_steps": mean(steps),
        "halting/halted_early": mean(steps < depth),
        "halting/compute_saved": float(1.0 - steps.mean() / depth) if p else 0.0,
        "halting/executed_row_steps": int(acc.executed),
        "halting/utilisation": float(steps.sum() / acc.executed) if acc.executed else 0.0,
        "time_s": acc.seconds,
    }
    if acc.loop_steps:  # batched: iterations of each batch's loop (streaming has none)
        m["halting/mean_batch_loop_steps"] = float(np.mean(acc.loop_steps))
    if breadth > 1 and p:
        m["different_init/n"] = breadth
        m["different_init/total_samples"] = int(p)
        m["different_init/avg_pass_rate"] = avg_pass_rate(exact)
        m["different_init/any_correct"] = any_correct(exact)
        for k, v in pass_at_k_table(exact).items():
            m[f"different_init/pass@{k}"] = v
        mv = np.concatenate(acc.votes, axis=0)
        m["majority_vote/exact_accuracy"] = float(mv[:, 0].mean())
        m["majority_vote/accuracy"] = float(mv[:, 1].sum() / max(1, mv[:, 2].sum()))
        if top_k > 0:
            for key, v in convergence_top_k(acc.get("score"), exact, top_k).items():
                m[f"convergence_top_k/{key}"] = v
    hist = np.bincount(steps.ravel(), minlength=depth + 1) if p else np.zeros(depth + 1, int)
    nz = np.nonzero(hist)[0]
    tr = sorted(acc.trace.items())
    return {"depth": depth, "breadth": breadth, "metrics": m,
            "steps_histogram": {"steps": nz.tolist(), "count": hist[nz].tolist()},
            "residual_trace": {"steps": [s for s, _ in tr],
                               "mean": [v[0] / v[1] if v[1] else float("nan") for _, v in tr],
                               "rows": [v[1] for _, v in tr]}}
