"""Test-time scaling: evaluate a model over depth (steps), breadth (random inits) and halting rules.

* `Evaluator` / `evaluate` (:mod:`.evaluator`): the one evaluation API, used by training, the
  CLIs, the ablation and the benchmarks;
* :mod:`.core`: the jitted batched while loop (memory independent of depth), the per-row
  halting rules, the per-row solver variant and the key-derivation rule (`job_keys`: from the
  puzzle's index in the split and the copy);
* :mod:`.stream`: streaming evaluation (a pool of slots refilled from a job queue on device)
  and its host-side runner;
* :mod:`.aggregate`: per-batch results (`BatchResult`), pass@k, majority vote, convergence
  top-k and the per-setting metrics;
* :mod:`.protocol`: the paper's protocol as one resumable run.

See docs/evaluation.md for the definitions.
"""

from eqr_jax.evaluation.aggregate import (BatchResult, MajorityVote, any_correct, avg_pass_rate,
                                          convergence_top_k, majority_vote, pass_at_k,
                                          pass_at_k_table, summarize_setting)
from eqr_jax.evaluation.core import job_keys
from eqr_jax.evaluation.evaluator import (BatchedRunner, Evaluator, copies_per_call, evaluate,
                                          with_eval_noise)
from eqr_jax.evaluation.stream import StreamRunner

__all__ = ["Evaluator", "evaluate", "BatchResult", "with_eval_noise", "copies_per_call",
           "BatchedRunner", "StreamRunner", "job_keys", "pass_at_k", "pass_at_k_table", "any_correct",
           "avg_pass_rate", "majority_vote", "MajorityVote", "convergence_top_k",
           "summarize_setting"]
