"""Whether the detector is still learning, from the score gap the trainer reports at every step.

A network stalled by too high a learning rate keeps a finite loss and moves its weights as much as a healthy one;
what it stops doing is separating the anchors of a nodule from the background (`StepReport.score_gap`). This
class follows that gap window by window, relative to the best level the run itself reached, so no threshold
depends on the data set.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["LearningSignal"]


class LearningSignal:
    """
    The smoothed score gap (the mean of the last ``span`` window means), its best level, and whether it collapsed.

    Args:
        span: windows averaged into the level.
        collapse_fraction: the level has collapsed when it is below this fraction of the best level.
        stall_windows: windows in a row with a collapsed level before the detector counts as stalled.
    """

    def __init__(self, span: int = 5, collapse_fraction: float = 0.5, stall_windows: int = 5) -> None:
        self.span = span
        self.collapse_fraction = collapse_fraction
        self.stall_windows = stall_windows
        self.windows: deque[float] = deque(maxlen=span)
        self.best = -math.inf
        self.collapsed_windows = 0

    def add(self, gap: float) -> None:
        """Add the mean score gap of one window (NaN, a window without positive anchors, is left out)."""
        if not math.isfinite(gap):
            return
        self.windows.append(gap)
        if len(self.windows) < self.span:
            return
        self.best = max(self.best, self.level)
        self.collapsed_windows = self.collapsed_windows + 1 if self.collapsed() else 0

    @property
    def level(self) -> float:
        """The mean of the last ``span`` window gaps (NaN before the first)."""
        return math.fsum(self.windows) / len(self.windows) if self.windows else math.nan

    def collapsed(self) -> bool:
        """Whether the level fell below ``collapse_fraction`` of a best level that was above zero."""
        return len(self.windows) == self.span and self.best > 0 and self.level < self.collapse_fraction * self.best

    def stalled(self) -> bool:
        """Whether the level has been collapsed for ``stall_windows`` windows in a row."""
        return self.collapsed_windows >= self.stall_windows

    def rebase(self) -> None:
        """Take the current level as the new best (after a dip that a smaller LR did not cure)."""
        self.best = self.level if self.windows else -math.inf
        self.collapsed_windows = 0

    def restart(self) -> None:
        """Forget the recent windows (after a rollback: they belong to the abandoned trajectory)."""
        self.windows.clear()
        self.collapsed_windows = 0

    def state_dict(self) -> dict[str, Any]:
        return {"windows": list(self.windows), "best": self.best, "collapsed_windows": self.collapsed_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = deque(state["windows"], maxlen=self.span)
        self.best = float(state["best"])
        self.collapsed_windows = int(state["collapsed_windows"])
