"""The stability guard's record: one console line and one log entry per event and per LR search, the JSON report,
the last-good checkpoint.

Nothing here decides anything; `scripts.guard.stability_guard.StabilityGuard` tells it what happened.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from scripts.guard.lr_search import SearchResult
from scripts.json_io import write_json

__all__ = ["GuardEvent", "GuardLog"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardEvent:
    """
    One event of the guard.

    Attributes:
        iteration, epoch: when it happened.
        kind: ``input``, ``logits``, ``loss``, ``grad`` (a refused step), ``weights`` (non-finite weights),
            ``update`` (the weights moved too far per step), ``norm_growth`` (their norm grew too fast per step, SGD),
            ``stall`` (the detector stopped learning).
        action: what the guard did (``step skipped``, ``rolled back``, ...).
        what: the finding in words (``non-finite grad``, ``update ratio 0.047``, ...).
        loss, loss_cls, loss_reg, grad_norm: of the iteration.
        lr: the learning rate the iteration ran with.
        files: the image files held responsible (merged over the DDP ranks): those with non-finite voxels for an
            ``input`` event, the batch's for the other refused steps, none for an applied step.
        update_ratio: the update ratio, for ``update`` events.
        norm_growth: the weights' norm growth per step, for ``norm_growth`` events.
        positive_score: the learning signal of the iteration.
    """

    iteration: int
    epoch: int
    kind: str
    action: str
    what: str
    loss: float = math.nan
    loss_cls: float = math.nan
    loss_reg: float = math.nan
    grad_norm: float = math.nan
    lr: float = math.nan
    files: tuple[str, ...] = field(default_factory=tuple)
    update_ratio: float | None = None
    norm_growth: float | None = None
    positive_score: float = math.nan
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def line(self) -> str:
        """The console line of the event."""
        names = ", ".join(os.path.basename(f) for f in self.files)
        # an input event names the files with non-finite voxels; any other lists the batch, not a culprit
        where = f"; files: {names or '-'}" if self.kind == "input" else (f"; batch: {names}" if names else "")
        return (
            f"guard: {self.what} at epoch {self.epoch} iteration {self.iteration} (loss {self.loss:.4g}, grad norm "
            f"{self.grad_norm:.4g}, lr {self.lr:.3g}); {self.action}{where}"
        )


class GuardLog:
    """
    Keeps the events (the first ``max_logged_events``; the guard's counters count them all), writes the JSON report
    and saves the last good state.

    Args:
        report_path: JSON report (``None``: none, e.g. on DDP ranks other than 0).
        ckpt_path: where the last good state is saved when the run is stopped (``None``: nowhere).
        max_logged_events: events kept in the report.
    """

    def __init__(self, report_path: str | None = None, ckpt_path: str | None = None, max_logged_events: int = 1000):
        self.report_path = report_path
        self.ckpt_path = ckpt_path
        self.max_logged_events = max_logged_events
        self.events: list[dict[str, Any]] = []
        self.searches: list[dict[str, Any]] = []
        self.lr_changes: list[dict[str, Any]] = []
        self.rollbacks: list[dict[str, Any]] = []

    def record(self, event: GuardEvent) -> None:
        """Log the event's line and keep it for the report."""
        logger.warning(event.line())
        if len(self.events) < self.max_logged_events:
            self.events.append({**asdict(event), "files": list(event.files)})  # as the JSON report has it

    def record_search(self, iteration: int, result: SearchResult) -> None:
        """Log an LR search (each LR with its trial loss, and the choice) and keep it for the report."""
        logger.warning(f"guard: LR search at iteration {iteration}: {result.summary()}")
        if len(self.searches) < self.max_logged_events:
            trials = [asdict(t) for t in result.trials]
            longer = [asdict(t) for t in result.confirmation]
            self.searches.append(
                {
                    "iteration": iteration,
                    "trials": trials,
                    "longer_trials": longer,
                    "chosen_lr": result.lr,
                    "lost_at": result.lost_at,
                }
            )

    def record_lr_change(self, iteration: int, epoch: int, before: float, after: float, why: str) -> None:
        """Log a change of the schedule's peak LR (``before`` to ``after``) and why, and keep it for the report."""
        logger.warning(f"guard: peak LR {before:.3g} -> {after:.3g} at epoch {epoch} iteration {iteration}: {why}")
        self.lr_changes.append({"iteration": iteration, "epoch": epoch, "from": before, "to": after, "why": why})

    def record_rollback(self, iteration: int, epoch: int, to_iteration: int, why: str) -> None:
        """Keep a rollback for the report: when, to the state after which iteration, and why (the guard logs it)."""
        if len(self.rollbacks) < self.max_logged_events:
            self.rollbacks.append({"iteration": iteration, "epoch": epoch, "to_iteration": to_iteration, "why": why})

    def lr_summary(self, asked: float, used: float) -> str | None:
        """
        The run's LR in one plain paragraph when the guard changed it (``None`` when the run trained at ``asked``):
        what was asked, what was used, and why.
        """
        if math.isclose(asked, used, rel_tol=1e-9) or not self.lr_changes:
            return None
        last = self.lr_changes[-1]
        steps = "; ".join(f"iteration {c['iteration']}: {c['from']:.3g} -> {c['to']:.3g}" for c in self.lr_changes)
        return (
            f"This run did not train at the learning rate it was given: learning_rate {asked:.3g} (the schedule's "
            f"peak) was changed to {used:.3g} (x{used / asked:.3g}), last at epoch {last['epoch']} iteration "
            f"{last['iteration']}: {last['why']}. Changes: {steps}. To run this recipe at the LR that worked, set "
            f"learning_rate to {used:.3g}."
        )

    def write_report(self, summary: dict[str, Any]) -> str | None:
        """Write ``summary`` with the events to ``report_path``; returns the path written, if any."""
        if not self.report_path:
            return None
        records = {"events": self.events, "rollbacks": self.rollbacks, "lr_searches": self.searches}
        write_json(self.report_path, {**summary, **records}, default=str)
        return self.report_path

    def save_checkpoint(self, state: dict[str, Any]) -> str | None:
        """Save ``state`` (the last good snapshot) to ``ckpt_path``; returns the path written, if any."""
        if not self.ckpt_path:
            return None
        os.makedirs(os.path.dirname(os.path.abspath(self.ckpt_path)), exist_ok=True)
        torch.save(state, self.ckpt_path)
        return self.ckpt_path

    def state_dict(self) -> dict[str, Any]:
        return {
            "events": list(self.events),
            "searches": list(self.searches),
            "lr_changes": list(self.lr_changes),
            "rollbacks": list(self.rollbacks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        self.searches = list(state["searches"])
        self.lr_changes = list(state.get("lr_changes", []))  # absent from checkpoints before 0.5.0
        self.rollbacks = list(state.get("rollbacks", []))  # absent from checkpoints before 1.1.0
