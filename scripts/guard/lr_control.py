"""The guard's hold on the learning rate: back it off, set it to what a search found, grow it back, never above a
level that failed.

It acts only through the schedule's public multiplier (`scripts.detection.schedule.WarmupDecayLR.set_multiplier`),
so the schedule keeps its shape (warm-up, decay) and the change survives a rollback and a resume.
"""

from __future__ import annotations

import math
from typing import Any

from scripts.detection.schedule import WarmupDecayLR

__all__ = ["LRControl"]


class LRControl:
    """
    The LR multiplier of a `WarmupDecayLR` and the ceiling it may not grow past.

    LRs set here are *peak* LRs: the highest LR the schedule will reach from now on (the end of the warm-up while it
    lasts, the current LR once it decays). A failure at an LR lowers the ceiling below it, so that growth settles
    under the level that failed; the multiplier never exceeds 1 (the recipe's own schedule).

    Args:
        lr_scheduler: the schedule whose multiplier is controlled.
        ceiling_factor: after a failure at LR ``L`` the peak LR may not exceed ``L * ceiling_factor``.
    """

    def __init__(self, lr_scheduler: WarmupDecayLR, ceiling_factor: float = 10**-0.5) -> None:
        if not hasattr(lr_scheduler, "set_multiplier"):
            raise TypeError(
                "the stability guard controls the LR through the schedule's multiplier: use "
                f"scripts.detection.schedule.WarmupDecayLR as lr_scheduler, got {type(lr_scheduler).__name__}"
            )
        self.lr_scheduler = lr_scheduler
        self.ceiling_factor = ceiling_factor
        self.ceiling = math.inf  # the highest multiplier allowed (the recipe's own schedule at most)
        # the multiplier is kept here as well: a rollback restores the schedule's state, multiplier included
        self.scale = lr_scheduler.multiplier

    def asked_lr(self) -> float:
        """The recipe's peak LR (the schedule's base LR, before the multiplier)."""
        return self.lr_scheduler.base_lrs[0]

    def used_lr(self) -> float:
        """The recipe's peak LR as the run now trains it: with the multiplier."""
        return self.asked_lr() * self.scale

    def current_lr(self) -> float:
        """The LR of the first parameter group now."""
        return self.lr_scheduler.optimizer.param_groups[0]["lr"]

    def peak_lr(self) -> float:
        """The highest LR the schedule reaches from now on, with the multiplier."""
        return self._peak_unit() * self.scale

    def _peak_unit(self) -> float:
        scheduler = self.lr_scheduler
        return scheduler.base_lrs[0] * scheduler.peak_factor(scheduler.last_epoch)

    def warmup_done(self) -> bool:
        """Whether the schedule has reached the end of its warm-up (at once when it has none)."""
        return self.lr_scheduler.last_epoch >= self.lr_scheduler.warmup_iters

    def reapply(self) -> None:
        """Apply the multiplier again (after a rollback restored the schedule's older state)."""
        self._apply(self.scale)

    def _apply(self, multiplier: float) -> None:
        self.scale = min(multiplier, 1.0, self.ceiling)
        self.lr_scheduler.set_multiplier(self.scale)

    def failed_at(self, lr: float) -> None:
        """Record a failure at ``lr``: the peak LR may never grow back above ``lr * ceiling_factor``."""
        self.ceiling = min(self.ceiling, lr * self.ceiling_factor / self._peak_unit())

    def set_peak_lr(self, peak_lr: float) -> None:
        """Scale the schedule so that its peak from now on is ``peak_lr`` (within the ceiling and the recipe)."""
        self._apply(peak_lr / self._peak_unit())

    def back_off(self, factor: float) -> None:
        """Multiply the schedule by ``factor``."""
        self._apply(self.scale * factor)

    def can_grow(self) -> bool:
        """Whether the multiplier is below both the recipe (1.0) and the ceiling."""
        return self.scale < min(1.0, self.ceiling) * (1 - 1e-9)

    def growth_candidate(self, factor: float) -> float:
        """The peak LR one growth step of ``factor`` up would give."""
        return self._peak_unit() * min(self.scale * factor, 1.0, self.ceiling)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "ceiling": self.ceiling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ceiling = float(state["ceiling"])
        self._apply(float(state["scale"]))
