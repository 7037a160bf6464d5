"""The learning-rate schedule: linear warm-up, then step decay (the model zoo's) or cosine decay, per iteration, times
a public multiplier through which the stability guard backs the LR off and grows it back.

Torch's chained schedulers (`SequentialLR` of `LinearLR` and `StepLR`) compute each LR from the previous one and
their base LRs, so scaling the LR from outside means editing their internals; a closed-form schedule with a
multiplier makes the scale one number that the schedule applies (and saves in its `state_dict`).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupDecayLR"]

DECAYS = ("step", "cosine")


class WarmupDecayLR(LRScheduler):
    """
    ``lr(t) = base_lr * factor(t) * multiplier``, stepped once per iteration: a linear warm-up from
    ``warmup_start_factor`` to 1 over ``warmup_iters``, then ``gamma`` every ``step_iters`` (``"step"``) or a cosine
    down to ``min_lr_factor`` at ``total_iters`` (``"cosine"``).

    Args:
        optimizer: the optimiser whose LR is scheduled (its LR at construction is the base LR).
        warmup_iters: iterations of linear warm-up (0: none).
        total_iters: iterations of the whole run (the cosine decay ends there).
        decay: ``"step"`` or ``"cosine"``.
        step_iters: iterations between step decays.
        gamma: step-decay factor.
        warmup_start_factor: LR factor at the first iteration of the warm-up.
        min_lr_factor: final LR factor of the cosine decay.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_iters: int,
        total_iters: int,
        decay: str = "step",
        step_iters: int = 1000,
        gamma: float = 0.1,
        warmup_start_factor: float = 0.01,
        min_lr_factor: float = 0.01,
    ) -> None:
        if decay not in DECAYS:
            raise ValueError(f"lr_decay must be one of {DECAYS}, got {decay!r}")
        self.warmup_iters = max(int(warmup_iters), 0)
        self.total_iters = int(total_iters)
        self.decay = decay
        self.step_iters = max(int(step_iters), 1)
        self.gamma = float(gamma)
        self.warmup_start_factor = float(warmup_start_factor)
        self.min_lr_factor = float(min_lr_factor)
        self.multiplier = 1.0
        super().__init__(optimizer)

    def factor(self, iteration: int) -> float:
        """The schedule's LR factor at ``iteration`` (0-based), without the multiplier."""
        if iteration < self.warmup_iters:
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * iteration / self.warmup_iters
        t = iteration - self.warmup_iters
        if self.decay == "step":
            return self.gamma ** (t // self.step_iters)
        span = max(self.total_iters - self.warmup_iters, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * cosine

    def peak_factor(self, iteration: int) -> float:
        """The highest factor from ``iteration`` on: 1 until the warm-up ends, the current factor after (it decays)."""
        return 1.0 if iteration < self.warmup_iters else self.factor(iteration)

    def get_lr(self) -> list[float]:
        return self._scheduled(self.last_epoch)

    def _scheduled(self, iteration: int) -> list[float]:
        scale = self.factor(iteration) * self.multiplier
        return [base * scale for base in self.base_lrs]

    def set_multiplier(self, multiplier: float) -> None:
        """Scale the whole schedule by ``multiplier`` (relative to the base LRs), effective at once."""
        self.multiplier = float(multiplier)
        for group, lr in zip(self.optimizer.param_groups, self._scheduled(self.last_epoch), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
