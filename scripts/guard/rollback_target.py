"""Where the stability guard rolls back to: the run's first state until its learning rate is confirmed, then the
last good snapshot.

`Snapshot` is one copy of the training state; which copy a rollback should go to is a rule of its own, kept here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from scripts.guard.snapshot import Snapshot

__all__ = ["RollbackTarget"]


class RollbackTarget:
    """
    The state a rollback goes to, and the bookkeeping of the last good snapshot.

    The rule: until the run's LR is confirmed, a rollback goes to the run's first state (the state it started or
    resumed from); once it is confirmed, to the last good snapshot. Steps at an unconfirmed LR may have damaged the
    detector without any event (a warm-up at too high an LR), so no snapshot taken at it is trusted. The LR is
    confirmed by the first window kept as good after the LR check (the check's trials ran on a copy; a window of the
    run at that LR confirms it), or by a rollback: after one, the run goes on at an LR a search chose from the state
    it rolled back to, which is itself a check, and that state becomes the last good snapshot.

    Args:
        snapshot: the (empty) snapshot that holds the last good state.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.last_good = snapshot
        self.first_state: Snapshot | None = None  # kept until the LR is confirmed
        self.lr_checked = False  # the LR check has run (or a rollback stood in for it)
        self.window_loss: float | None = None  # the mean loss of the window the last good snapshot closed
        self.steps_since = 0  # applied steps since the last good snapshot

    def start(self, iteration: int) -> None:
        """Take the first snapshot (after ``iteration`` iterations), once; it is the first state until confirmed."""
        if self.last_good.state is None:
            self.last_good.take(iteration)
            # a shallow copy shares the state taken now; `take` replaces, never mutates it
            self.first_state = None if self.lr_checked else copy.copy(self.last_good)

    def stepped(self) -> None:
        """Count an applied step."""
        self.steps_since += 1

    def keep(self, iteration: int, network_state: dict[str, torch.Tensor], window_loss: float) -> None:
        """A window ended well: it becomes the last good snapshot, and confirms the LR if the check has run."""
        self.last_good.take(iteration, network_state)
        self.window_loss, self.steps_since = window_loss, 0
        if self.lr_checked:
            self.first_state = None

    def checked(self) -> None:
        """The LR check has run; the next window kept confirms its LR."""
        self.lr_checked = True

    def origin(self) -> Snapshot:
        """Where a rollback goes now."""
        return self.first_state or self.last_good

    def rolled_back_to(self, origin: Snapshot) -> None:
        """The run went back to ``origin``: it is the last good snapshot, and the LR counts as checked."""
        origin.restore()
        self.last_good, self.first_state, self.lr_checked = origin, None, True
        self.steps_since = 0

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot_loss": self.window_loss, "lr_checked": self.lr_checked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window_loss = state["snapshot_loss"]
        self.lr_checked = bool(state["lr_checked"])
