"""Analysis helpers: convergence statistics against hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest

from eqr_jax.analysis import convergence_statistics, logit_delta_norms


def test_convergence_statistics_hand_values():
    # One sample, one token, vocab 2: logits move by (3, 4) * a_t, i.e. delta norms 5 a_t.
    steps = np.cumsum([0.0, 1.0, 0.5, 0.25, 0.125])[:, None, None, None] * np.array([3.0, 4.0])
    d = logit_delta_norms(steps, last_k=3)
    np.testing.assert_allclose(d[:, 0, 0], [2.5, 1.25, 0.625])
    st = convergence_statistics(steps, last_k=3)
    assert st["score"][0] == pytest.approx((2.5 + 1.25 + 0.625) / 3)
    assert st["final_residual"][0] == pytest.approx(0.625)
    assert st["rate_mean"][0] == pytest.approx(0.5, abs=1e-8)  # (the +1e-9 in the ratio)
    assert st["rate_std"][0] == pytest.approx(0.0, abs=1e-8)
    assert st["discounted_residual"][0] == pytest.approx(2.5 + 0.95 * 1.25 + 0.95 ** 2 * 0.625)
