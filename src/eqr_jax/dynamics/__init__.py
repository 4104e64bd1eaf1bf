"""Dynamics backends: how the step map is iterated, and how gradient flows through it.

Every backend takes the model's step map as it is,

    step(params, state, x, key, *, truncate=True) -> state

(`eqr_jax.model.EqRModel.step`), with ``state`` a pytree of (batch, seq, hidden) latents and ``x``
the input injection. Two iterations:

* `unroll` (`dynamics.unrolled`): ``lax.scan`` over ``num_steps`` noisy steps;
* `fixed_point` (`dynamics.implicit`): Anderson acceleration or plain iteration of the noise-free
  map ``z -> step(params, z, x, None)`` *per row* (`dynamics.solve.solve_rows`: each row has its
  own residual, mixing weights, stopping point and iteration count; a converged row stops
  changing), differentiated implicitly (implicit function theorem, a per-row backward linear
  solve to a relative residual; docs/implicit-gradients.md). The solve runs in float32 whatever
  the compute dtype.

How gradient flows is a separate object, the *adjoint* (as in optimistix), one class per name of
`eqr_jax.modes.GRAD_MODES` plus `NoGrad` for inference (`ADJOINTS`, `dynamics.adjoints`;
docs/training.md):

* `Truncated` (the reference): no graph through the first ``num_steps - 1`` steps, and inside
  the last step only through its last latent recursion;
* `Full`: backprop through every step and recursion (``remat=True`` recomputes each step in the
  backward pass: memory O(1) steps of activations instead of O(num_steps));
* `OneStep` (phantom gradient, k = 1): no graph through the first ``num_steps - 1`` steps, the
  full graph through every recursion of the last one;
* `Phantom` (Geng et al. 2021): no graph through the first ``num_steps - k`` steps, then ``k``
  damped steps ``z <- (1 - d) z + d step(z)`` with the full graph (`OneStep` is k = 1, d = 1);
* `Implicit`: the fixed point of the noise-free map, gradient by the implicit function theorem;
* `NoGrad`: no gradient at all.

`advance` runs one supervision segment under any adjoint (`segment` also returns the implicit
solve's per-row statistics); `unroll` is the scan itself. `jacobian_frobenius_sq`
(`dynamics.jacobian`) is the Hutchinson estimate of ||d step / d state||_F^2 that Jacobian
regularisation (``train.jac_reg``, Bai, Koltun & Kolter 2021) adds to the loss.
"""

from __future__ import annotations

import jax

from eqr_jax.dynamics.adjoints import (ADJOINTS, UNROLLED, Adjoint, Full, Implicit, NoGrad,
                                       OneStep, Phantom, StepFn, Truncated, adjoint, adjoint_for)
from eqr_jax.dynamics.implicit import (BACKWARD_METHODS, BACKWARD_STATS, UNCONVERGED_RULES,
                                       Backward, FixedPointResult, backward_probe,
                                       dense_implicit_gradient, fixed_point)
from eqr_jax.dynamics.jacobian import jacobian_frobenius_sq
from eqr_jax.dynamics.solve import CRITERIA, FIXED_POINT_METHODS, solve_rows
from eqr_jax.dynamics.unrolled import unroll
from eqr_jax.model import LatentState

__all__ = ["ADJOINTS", "BACKWARD_METHODS", "BACKWARD_STATS", "CRITERIA", "FIXED_POINT_METHODS",
           "UNCONVERGED_RULES", "UNROLLED", "Adjoint", "Backward", "FixedPointResult", "Full",
           "Implicit", "NoGrad", "OneStep", "Phantom", "StepFn", "Truncated", "adjoint",
           "adjoint_for", "advance", "backward_probe", "dense_implicit_gradient", "fixed_point",
           "jacobian_frobenius_sq",
           "segment", "solve_rows", "unroll"]


def advance(step: StepFn, params, state: LatentState, x: jax.Array, key: jax.Array | None,
            num_steps: int, adjoint: Adjoint) -> LatentState:
    """One supervision segment: ``num_steps`` noisy steps (`unroll`) or, for `Implicit`, the
    noise-free fixed point (`fixed_point`, at most ``adjoint.maxiter`` iterations)."""
    return segment(step, params, state, x, key, num_steps, adjoint)[0]


def segment(step: StepFn, params, state: LatentState, x: jax.Array, key: jax.Array | None,
            num_steps: int, adjoint: Adjoint, probe: jax.Array | None = None
            ) -> tuple[LatentState, FixedPointResult | None]:
    """`advance`, also returning the implicit solve's `FixedPointResult` (None when unrolled).

    The implicit solve starts from ``state``: in training that is the carried latents, so a row
    that continues from the previous ACT step starts at (near) its previous fixed point (a warm
    start); rows that were reset start from their fresh draw. ``probe`` (`backward_probe`,
    implicit only) receives the backward solve's per-row statistics as its cotangent.
    """
    if isinstance(adjoint, Implicit):
        res = fixed_point(step, params, state, x, method=adjoint.method, maxiter=adjoint.maxiter,
                          tol=adjoint.tol, history_size=adjoint.history,
                          backward=adjoint.backward, backward_iters=adjoint.backward_iters,
                          backward_tol=adjoint.backward_tol,
                          backward_restart=adjoint.backward_restart,
                          unconverged=adjoint.unconverged, probe=probe)
        return res.state, res
    return unroll(step, params, state, x, key, num_steps, adjoint=adjoint)[0], None
