"""The registry of named choices: gradient modes, halting rules, solvers, convergence metrics.

Every place that accepts one of these names (config validation, the command-line choices, the
dynamics, the evaluator, the ablation and the benchmarks) reads it from here, so a name exists
once. This module imports nothing heavy (no JAX), so configs and argument parsers can use it.
The objects that *implement* the names live beside the code that runs them:
`eqr_jax.dynamics.ADJOINTS` (gradient modes) and `eqr_jax.evaluation.core.HALT_RULES`
(halting rules); tests check that both cover these names exactly.
"""

from __future__ import annotations

# How gradient flows through the latent dynamics during training (docs/training.md):
#   truncated  the reference: no graph through earlier steps, and inside the last step only
#              through its last latent recursion;
#   full       backprop through every step and recursion (optionally rematerialised);
#   one_step   phantom gradient: every recursion of the last step, nothing before it;
#   phantom    phantom gradient with k damped steps (Geng et al. 2021; one_step is k = 1);
#   implicit   per-row fixed-point solve of the noise-free map, implicit function theorem.
GRAD_MODES = ("truncated", "full", "one_step", "phantom", "implicit")
# The implicit mode's forward solvers and backward linear solves (eqr_jax.dynamics).
IMPLICIT_SOLVERS = ("anderson", "iteration")
IMPLICIT_BACKWARDS = ("gmres", "iteration")
# The backward of a row whose forward solve did not converge: the implicit gradient at its
# returned iterate, or the one-step (Jacobian-free) gradient.
IMPLICIT_UNCONVERGED = ("implicit", "one_step")
# Inference: the same iteration with no gradient at all.
NO_GRAD = "none"

# When a row stops during evaluation (docs/evaluation.md):
#   fixed        every row runs exactly `depth` steps (the reference's evaluation);
#   q_halt       a row stops once its halting logit is > 0;
#   convergence  a row stops once its change stayed below a tolerance for `window` steps.
HALT_RULES = ("fixed", "q_halt", "convergence")

# How the evaluator advances the latents: the noisy step map, or a per-row solve of the
# noise-free map (Anderson or plain iteration) with at most `depth` iterations.
SOLVERS = ("unroll", "anderson", "fixed_point")

# What `convergence` halting watches: the logits (mean over tokens of the L2 change of the logit
# vector) or the latents (RMS change of [z_H; z_L] per element).
CONVERGENCE_METRICS = ("logits", "latents")


def check(kind: str, name: str, choices: tuple[str, ...]) -> str:
    """``name`` if it is one of ``choices``, else a ValueError naming ``kind`` and the choices."""
    if name not in choices:
        raise ValueError(f"unknown {kind} {name!r}; choose from {list(choices)}")
    return name
