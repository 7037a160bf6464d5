"""The learning-rate schedule: linear warm-up, then step decay (the model zoo's) or cosine decay, per iteration."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR, StepLR

__all__ = ["warmup_decay_scheduler"]


def warmup_decay_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_iters: int,
    total_iters: int,
    decay: str = "step",
    step_iters: int = 1000,
    gamma: float = 0.1,
    warmup_start_factor: float = 0.01,
    min_lr_factor: float = 0.01,
) -> LRScheduler:
    """
    Torch schedulers chained with `SequentialLR`, stepped once per iteration.

    Args:
        optimizer: the optimiser whose LR is scheduled.
        warmup_iters: iterations of linear warm-up from ``warmup_start_factor * lr`` to ``lr`` (0: none).
        total_iters: iterations of the whole run (the cosine decay ends there).
        decay: ``"step"`` (multiply by ``gamma`` every ``step_iters``) or ``"cosine"`` (down to ``min_lr_factor * lr``).
        step_iters: iterations between step decays.
        gamma: step-decay factor.
        warmup_start_factor: LR factor at the first iteration.
        min_lr_factor: final LR factor of the cosine decay.
    """
    warmup_iters = max(int(warmup_iters), 0)
    if decay == "step":
        after: LRScheduler = StepLR(optimizer, step_size=max(int(step_iters), 1), gamma=gamma)
    elif decay == "cosine":
        base = optimizer.param_groups[0]["lr"]
        after = CosineAnnealingLR(
            optimizer, T_max=max(int(total_iters) - warmup_iters, 1), eta_min=base * min_lr_factor
        )
    else:
        raise ValueError(f"lr_decay must be 'step' or 'cosine', got {decay!r}")
    if warmup_iters == 0:
        return after
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_iters)
    return SequentialLR(optimizer, schedulers=[warmup, after], milestones=[warmup_iters])
