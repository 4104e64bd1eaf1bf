"""Streaming evaluation (`eqr_jax.evaluation.stream`): the slot pool gives every job the batched
loop's result while executing fewer row-steps. Streaming on 8 devices is in test_sharding.py,
the streaming benchmark's smallest form in test_benchmarks.py."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import eval_data
from eqr_jax.config import EvalConfig
from eqr_jax.evaluation import Evaluator


def _halting_params(params):
    """``params`` with a halting head that reads z_H[token 0, channel 0]: rows halt by q_halt at
    different steps."""
    kernel = np.zeros(params["q_head"]["kernel"].shape, np.float32)
    kernel[0, 0] = 1.0
    return {**params, "q_head": {"kernel": jnp.asarray(kernel),
                                 "bias": jnp.full((2,), -0.3, jnp.float32)}}


def test_streaming_agrees_with_batched_job_for_job(trained_model):
    """A pool of 5 slots (not a divisor of anything here) refilled as jobs halt gives every
    (puzzle, copy) job the batched loop's prediction, steps and exactness, for rules that halt
    rows at many different steps; the streaming pool executes fewer row-steps."""
    from eqr_jax.evaluation.aggregate import SettingAccumulator

    cfg, model, params = trained_model
    batches, _, _ = eval_data(n=20, batch=8)  # 3 batches, the last with 4 padding rows
    cases = (("convergence", params, dict(convergence_tol=0.2)),
             ("q_halt", _halting_params(params), {}))
    for halt, p, extra in cases:
        base = EvalConfig(halt=halt, seed=4, **extra)
        streaming = dataclasses.replace(base, stream=True, stream_slots=5)
        batched = list(Evaluator(model, base).results(p, batches, depth=12, breadth=3))
        acc = SettingAccumulator()
        streamed = list(Evaluator(model, streaming).results(p, batches, depth=12, breadth=3,
                                                            accumulator=acc))
        assert [t for t, _ in streamed] == [t for t, _ in batched] == [0, 1, 2]
        steps = []
        for (_, a), (_, b) in zip(batched, streamed):
            m = a.mask
            np.testing.assert_array_equal(b.mask, m)
            for name in ("preds", "steps", "exact", "n_correct"):
                np.testing.assert_array_equal(getattr(b, name)[m], getattr(a, name)[m],
                                              err_msg=f"{halt}: {name}")
            for name in ("score", "residual", "q_halt"):
                np.testing.assert_allclose(getattr(b, name)[m], getattr(a, name)[m],
                                           rtol=1e-4, atol=1e-5, err_msg=f"{halt}: {name}")
            steps.append(a.steps[m])
        steps = np.concatenate(steps)
        assert len(np.unique(steps)) >= 3, (halt, np.unique(steps))  # a mix of halting times
        # Cost: every batched batch runs until its slowest row; the pool keeps slots busy.
        executed = sum(a.executed for _, a in batched)
        assert steps.sum() <= acc.executed < executed, (halt, steps.sum(), acc.executed, executed)
        # The residual record is a function of the jobs' own steps: the same in both.
        ref = SettingAccumulator()
        for _, a in batched:
            ref.add(a)
        assert sorted(acc.trace) == sorted(ref.trace)
        for t, (total, count) in ref.trace.items():
            assert acc.trace[t][1] == count
            assert acc.trace[t][0] == pytest.approx(total, rel=1e-4)
    # The whole evaluation (`eqr eval --stream`): the same metrics but for the cost.
    res = {s: Evaluator(model, dataclasses.replace(base, stream=s)).evaluate(
        p, batches, depths=[12], breadths=[3])["settings"][0] for s in (False, True)}
    cost = {"time_s", "halting/executed_row_steps", "halting/utilisation",
            "halting/mean_batch_loop_steps"}
    assert res[True]["stream"] and not res[False]["stream"]
    for k, v in res[False]["metrics"].items():
        if k not in cost:
            assert res[True]["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert res[True]["metrics"]["halting/utilisation"] > res[False]["metrics"][
        "halting/utilisation"]
