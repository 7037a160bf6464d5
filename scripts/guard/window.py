"""The guard's window of applied steps: the loss-spike limit of the next step, and what a finished window says.

The guard judges a run window by window (snapshot refresh, update ratio, learning signal); this class keeps the
steps of the current window and the recent losses, so the guard's policy reads one named summary per window.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from scripts.detection.step_report import StepReport

__all__ = ["StepWindow", "WindowSummary", "nanmean"]


def nanmean(values: Iterable[float]) -> float:
    """The mean of the finite values (NaN when there is none)."""
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


@dataclass(frozen=True)
class WindowSummary:
    """A finished window: the mean loss and score gap of its applied steps, and whether none was refused in it."""

    mean_loss: float
    score_gap: float
    clean: bool


class StepWindow:
    """
    ``size`` applied steps make a window; a refused step among them makes it unclean. The losses of the last ``size``
    applied steps, across window ends, set the next step's loss-spike limit: ``max_growth`` times their median (at
    least 1), none before the first applied step.
    """

    def __init__(self, size: int, max_growth: float) -> None:
        self.size, self.max_growth = size, max_growth
        self.recent: deque[float] = deque(maxlen=size)
        self.reports: list[StepReport] = []
        self.clean = True

    def spike_limit(self) -> float:
        """The loss above which the next step is a spike."""
        return self.max_growth * max(statistics.median(self.recent), 1.0) if self.recent else math.inf

    def refused(self) -> None:
        """A step of this window was refused."""
        self.clean = False

    def applied(self, report: StepReport) -> bool:
        """Add an applied step; ``True`` when it completes the window (then `close` it)."""
        self.recent.append(report.loss)
        self.reports.append(report)
        return len(self.reports) >= self.size

    def close(self) -> WindowSummary:
        """The summary of the window, and a new one begins."""
        summary = WindowSummary(
            mean_loss=nanmean(r.loss for r in self.reports),
            score_gap=nanmean(r.score_gap for r in self.reports),
            clean=self.clean,
        )
        self.reports, self.clean = [], True
        return summary

    def clear(self) -> None:
        """Forget the window and the recent losses (after a rollback: they belong to the abandoned trajectory)."""
        self.recent.clear()
        self.reports, self.clean = [], True
