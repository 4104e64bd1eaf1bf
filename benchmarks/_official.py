"""Driving the official PyTorch EqR (locuslab/EqR) from a checkout: model, ACT loss head, optimiser,
EMA and carry, as its ``pretrain.py`` does. Used by ``official_learning_curves.py`` and
``make_train_step_fixture.py``; needs torch (and pydantic, colorama for the official modules)
and the checkout on ``PYTHONPATH``.

Nothing of the official code is copied here: its modules are imported from the given path. Its
optimiser, AdamATan2 (package ``adam-atan2`` 0.0.3), is a CUDA-only extension, so `AdamATan2`
below re-implements its rule in a few lines of torch.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np

SUM_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps")
LOSS_KEYS = ("total_loss", "lm_loss", "q_halt_loss")


def import_official(path: str):
    """The official modules this project drives, imported from the checkout at ``path``, which
    must be on ``PYTHONPATH`` (its modules import each other as top-level ``models``/``utils``,
    and this project does not change the import path at run time)."""
    import importlib.util
    from pathlib import Path
    root = Path(path).resolve()
    if not (root / "models" / "eqr.py").exists():
        raise SystemExit(f"--official {path}: no models/eqr.py there (a checkout of "
                         "github.com/locuslab/EqR is expected)")
    found = importlib.util.find_spec("models")
    origin = Path(next(iter(found.submodule_search_locations or []), "")) if found else None
    if origin is None or origin.resolve() != root / "models":
        raise SystemExit(f"--official {path}: put the checkout on PYTHONPATH "
                         f"(PYTHONPATH={root} python benchmarks/...); `models` resolves to "
                         f"{origin or 'nothing'}")
    try:
        from models import eqr
        from models.ema import EMAHelper
        from models.losses.loss_heads import ACTLossHead
        from utils.optimizer import cosine_schedule_with_warmup_lr_lambda
    except ImportError as e:
        raise SystemExit(f"importing the official modules from {path} failed ({e}); they need "
                         "torch, pydantic and colorama (pip install torch pydantic colorama)")
    return SimpleNamespace(eqr=eqr, EMAHelper=EMAHelper, ACTLossHead=ACTLossHead,
                           schedule=cosine_schedule_with_warmup_lr_lambda)


def adam_atan2_class():
    """AdamATan2 with the rule of ``adam-atan2`` 0.0.3 (its CUDA kernel), in plain torch.

    Per parameter, with t the 1-based step count; scalar factors in float64, tensors in float32:
    ``p *= 1 - lr*wd;  m = lerp(m, g, 1 - b1);  v = lerp(v, g*g, 1 - b2);
    p -= (lr / (1 - b1**t)) * atan2(m, sqrt(v) / sqrt(1 - b2**t))`` (no epsilon).
    """
    import torch

    class AdamATan2(torch.optim.Optimizer):
        def __init__(self, params, lr=0.0, betas=(0.9, 0.95), weight_decay=0.0):
            super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if not st:
                        st["step"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                    st["step"] += 1
                    t = st["step"]
                    p.mul_(1.0 - lr * wd)
                    st["m"].lerp_(p.grad, 1.0 - b1)
                    st["v"].lerp_(p.grad * p.grad, 1.0 - b2)
                    denom = st["v"].sqrt() / math.sqrt(1.0 - b2 ** t)
                    p.sub_(torch.atan2(st["m"], denom) * (lr / (1.0 - b1 ** t)))

    return AdamATan2


class OfficialTrainer:
    """The official EqR model + ACT loss head, trained as the official ``pretrain.py`` trains them.

    Args:
      official: path of the checkout.
      ref: the official model config (its field names, e.g. ``hidden_size``, ``forward_dtype``).
      hp: hyper-parameters with attributes ``batch`` (global batch), ``lr``, ``warmup``,
        ``lr_min_ratio``, ``steps`` (total steps of the schedule), ``weight_decay``, ``ema_rate``.
      init_seed: ``torch.manual_seed`` before the model is built (its initial weights).
      stream_seed: reseed torch after building (another stream for latent init, noise and
        exploration from the same weights); None keeps the stream.
      perturb_ulp: move every initial weight by one float32 ulp, up or down at random (a
        round-off-sized perturbation, to measure how much the training dynamics amplify it).

    Each `train_step` follows the official ``train_batch``: step += 1; the carry is built from the
    first batch; one ACT call of the loss head in training mode; ``(1 / batch) * loss`` is
    back-propagated; lr = the official schedule at the 1-based step; optimiser step; zero grads;
    EMA update.
    """

    def __init__(self, official: str, ref: dict, hp: Any, init_seed: int,
                 stream_seed: int | None = None, perturb_ulp: bool = False):
        import torch
        self.torch, self.hp = torch, hp
        self.mods = import_official(official)
        torch.manual_seed(init_seed)
        self.head = self.mods.ACTLossHead(self.mods.eqr.EqRModel(dict(ref)),
                                          loss_type="stablemax_cross_entropy")
        if perturb_ulp:
            gen = torch.Generator().manual_seed(init_seed + 20_000)
            with torch.no_grad():
                for p in self.head.parameters():
                    up = torch.rand(p.shape, generator=gen) < 0.5
                    p.copy_(torch.nextafter(p, torch.where(up, math.inf, -math.inf)))
        if stream_seed is not None:
            torch.manual_seed(stream_seed)
        self.head.train()
        self.opt = adam_atan2_class()(self.head.parameters(), lr=0.0, betas=(0.9, 0.95),
                                      weight_decay=hp.weight_decay)
        self.ema = self.mods.EMAHelper(mu=hp.ema_rate)
        self.ema.register(self.head)
        self.carry = None
        self.step = 0

    def set_carry(self, z_H: np.ndarray, z_L: np.ndarray, steps: np.ndarray, halted: np.ndarray,
                  data: dict[str, np.ndarray]) -> None:
        """Replace the ACT carry (latents in the model's forward dtype)."""
        torch, eqr = self.torch, self.mods.eqr
        dt = getattr(torch, self.head.model.config.forward_dtype)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        self.carry = eqr.ModelCarry(
            inner_carry=eqr.LatentCarry(z_H=t(z_H).to(dt), z_L=t(z_L).to(dt)),
            steps=t(steps.astype(np.int32)), halted=t(halted.astype(bool)),
            current_data={k: t(v.astype(np.int32)) for k, v in data.items()})

    def carry_numpy(self) -> dict[str, np.ndarray]:
        c = self.carry
        f = lambda x: x.detach().float().numpy().copy()
        return {"z_H": f(c.inner_carry.z_H), "z_L": f(c.inner_carry.z_L),
                "steps": c.steps.numpy().copy(), "halted": c.halted.numpy().copy(),
                **{f"data/{k}": v.numpy().copy() for k, v in c.current_data.items()}}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters, official names (``model.inner...``), float32 numpy."""
        return {k: v.detach().float().numpy().copy() for k, v in self.head.state_dict().items()}

    def ema_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().numpy().copy() for k, v in self.ema.state_dict().items()}

    def train_step(self, batch: dict[str, np.ndarray], outputs: bool = False) -> dict[str, Any]:
        """One optimiser step; returns the metric sums, ``grad_norm``, ``lr`` (and with
        ``outputs`` the step's ``q_halt`` logits (B,))."""
        torch, hp = self.torch, self.hp
        self.step += 1
        b = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        if self.carry is None:
            self.carry = self.head.initial_carry(b)
        keys = ["q_halt_logits"] if outputs else []
        self.carry, loss, metrics, out, _ = self.head(carry=self.carry, batch=b, return_keys=keys)
        ((1 / hp.batch) * loss).backward()
        grads = [p.grad for p in self.head.parameters() if p.grad is not None]
        grad_norm = math.sqrt(sum(float(torch.sum(g.double() ** 2)) for g in grads))
        lr = self.mods.schedule(self.step, base_lr=hp.lr, num_warmup_steps=round(hp.warmup),
                                num_training_steps=hp.steps, min_ratio=hp.lr_min_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad()
        self.ema.update(self.head)
        res: dict[str, Any] = {k: float(metrics[k]) for k in SUM_KEYS + LOSS_KEYS}
        res.update(grad_norm=grad_norm, lr=float(lr))
        if outputs:
            res["q_halt"] = out["q_halt_logits"].float().numpy().copy()
        return res
