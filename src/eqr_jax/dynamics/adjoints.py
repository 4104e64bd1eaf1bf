"""Adjoints: how gradient flows through the iterated step map, one class per gradient mode
(`eqr_jax.modes.GRAD_MODES`) plus `NoGrad` for inference, and the registry that builds them from a
name or a `TrainConfig`."""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Union

from eqr_jax import modes
from eqr_jax.config import TrainConfig
from eqr_jax.model import LatentState

StepFn = Callable[..., LatentState]


@dataclasses.dataclass(frozen=True)
class Truncated:
    """The reference's gradient: only the last latent recursion of the last step."""

    name: ClassVar[str] = "truncated"


@dataclasses.dataclass(frozen=True)
class Full:
    """Backprop through every step; ``remat`` recomputes each step in the backward pass."""

    remat: bool = False
    name: ClassVar[str] = "full"


@dataclasses.dataclass(frozen=True)
class OneStep:
    """Phantom gradient: every recursion of the last step, nothing before it."""

    name: ClassVar[str] = "one_step"


@dataclasses.dataclass(frozen=True)
class Phantom:
    """Phantom gradient with ``k`` damped steps: after ``max(num_steps - k, 0)`` gradient-free
    steps, ``k`` steps ``z <- (1 - damping) z + damping step(z)`` carry the full graph (so a
    segment runs ``max(num_steps, k)`` steps). ``Phantom(1, 1.0)`` is `OneStep`."""

    k: int = 2
    damping: float = 0.5
    name: ClassVar[str] = "phantom"

    def __post_init__(self):
        if self.k < 1 or not 0.0 < self.damping <= 1.0:
            raise ValueError(f"Phantom needs k >= 1 and damping in (0, 1], got {self!r}")


@dataclasses.dataclass(frozen=True)
class NoGrad:
    """Inference: no gradient reaches the parameters, the input or the initial state."""

    name: ClassVar[str] = "none"


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Fixed point of the noise-free map, implicit-function-theorem gradient (see `fixed_point`).

    Forward: at most ``maxiter`` step-map evaluations (``method``: ``anderson`` with ``history``
    past iterates, or ``iteration``); a row stops once its relative residual
    ||f(z) - z|| / ||z|| is at most ``tol``. Backward: the linear system (I - df/dz)^T u = g is
    solved per row by ``backward`` (``gmres`` restarted every ``backward_restart`` Krylov vectors,
    or ``iteration``) until ||g - (I - J^T) u|| / ||g|| <= ``backward_tol`` or
    ``backward_iters`` vector-Jacobian products; a row whose forward solve did not converge gets
    the one-step gradient u = g (``unconverged="one_step"``, the default) or the implicit
    gradient at its returned iterate (``"implicit"``) (docs/implicit-gradients.md).
    """

    # The defaults are TrainConfig's implicit_* defaults: one place to change them.
    maxiter: int = TrainConfig.implicit_maxiter
    tol: float = TrainConfig.implicit_tol
    method: str = TrainConfig.implicit_method
    history: int = TrainConfig.implicit_history
    backward: str = TrainConfig.implicit_backward
    backward_iters: int = TrainConfig.implicit_backward_iters
    backward_tol: float = TrainConfig.implicit_backward_tol
    backward_restart: int = TrainConfig.implicit_backward_restart
    unconverged: str = TrainConfig.implicit_unconverged
    name: ClassVar[str] = "implicit"

    def __post_init__(self):
        if self.backward_iters < 1 or self.backward_restart < 1 or not self.backward_tol > 0:
            raise ValueError(f"Implicit needs backward_iters >= 1, backward_restart >= 1 and "
                             f"backward_tol > 0, got {self!r}")


Adjoint = Union[Truncated, Full, OneStep, Phantom, NoGrad, Implicit]
UNROLLED = (Truncated, Full, OneStep, Phantom, NoGrad)
# Name (`modes.GRAD_MODES` and `modes.NO_GRAD`) -> adjoint class.
ADJOINTS: dict[str, type] = {c.name: c for c in (Truncated, Full, OneStep, Phantom, Implicit,
                                                 NoGrad)}
_IMPLICIT_FIELDS = ("maxiter", "tol", "method", "history", "backward", "backward_iters",
                    "backward_tol", "backward_restart", "unconverged")


def adjoint(name: str, *, remat: bool = False, phantom_k: int = 2, phantom_damping: float = 0.5,
            **implicit) -> Adjoint:
    """The adjoint object of a registry name (``remat`` applies to ``full``, the ``phantom_*``
    settings to ``phantom``, and ``implicit_<field>`` keywords, fields of `Implicit` such as
    ``implicit_maxiter`` or ``implicit_backward_tol``, to ``implicit``)."""
    modes.check("gradient mode", name, modes.GRAD_MODES + (modes.NO_GRAD,))
    unknown = sorted(k for k in implicit
                     if not k.startswith("implicit_") or k[9:] not in _IMPLICIT_FIELDS)
    if unknown:
        raise TypeError(f"adjoint() got unknown keyword(s) {unknown}")
    if name == "full":
        return Full(remat=remat)
    if name == "phantom":
        return Phantom(k=phantom_k, damping=phantom_damping)
    if name == "implicit":
        return Implicit(**{k[9:]: v for k, v in implicit.items()})
    return ADJOINTS[name]()


def adjoint_for(train_cfg) -> Adjoint:
    """The adjoint a `TrainConfig` asks for (``grad_mode``, ``remat``, ``implicit_*``,
    ``phantom_*``)."""
    keys = tuple(f"implicit_{f}" for f in _IMPLICIT_FIELDS) + ("phantom_k", "phantom_damping")
    return adjoint(train_cfg.grad_mode, remat=train_cfg.remat,
                   **{k: getattr(train_cfg, k) for k in keys})
