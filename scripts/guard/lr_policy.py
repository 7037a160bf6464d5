"""The guard's learning-rate policy: the LR a run trains at after a fault, after its first steps, on a stall, and
after a healthy stretch at a reduced LR, each decided by paired trials (`search_lr`) and set through `LRControl`.

`StabilityGuard` decides when the run rolls back; this policy decides the LR it goes on with. Every decision is an
`LRDecision`: with ``restart`` the caller rolls the run back to the search's origin and then calls `apply`;
without, the run's state is already as it was before the trials, at the LR the decision keeps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ignite.engine import Engine
from scripts.guard.lr_control import LRControl
from scripts.guard.lr_search import SearchResult, TrialRunner, confirm, search_lr
from scripts.guard.snapshot import Snapshot

__all__ = ["LRDecision", "LRPolicy", "SEARCH_STEP"]

SEARCH_STEP = 10**-0.5  # candidate LRs a factor sqrt(10) apart, walking down


@dataclass(frozen=True)
class LRDecision:
    """
    What the policy concluded.

    Attributes:
        restart: roll the run back to the search's origin, then `LRPolicy.apply` this decision.
        peak_lr: the schedule's new peak LR (``None``: no new LR).
        failed_lr: an LR that failed from the origin, never to be grown back to (``None``: none).
        back_off: multiply the LR by the back-off factor (the search could not tell).
        transient: the fault did not reproduce from the origin: the LR is kept, and a recurrence lowers it.
        search: the search behind the decision, for the guard's log (``None``: no search ran).
    """

    restart: bool
    peak_lr: float | None = None
    failed_lr: float | None = None
    back_off: bool = False
    transient: bool = False
    search: SearchResult | None = None


class LRPolicy:
    """
    Chooses the run's LR by paired trials from a known state, on the last applied batches.

    - `after_fault`: after a rollback, LRs from the one that failed downwards; the largest whose trial loss is within
      ``search_margin`` of the best wins, unless the best beats it in a longer trial of both (``search_confirm``
      times ``search_iters`` steps, judged by their last ``search_iters``): the run restarts at that LR for good.
      A fault that does not reproduce keeps the LR (a transient), unless it comes back at that LR, when the next
      search starts one step lower. When every LR fails, the LR is backed off.
    - `check`: once, when the schedule has reached its peak (the end of the warm-up, at least ``search_iters`` steps
      in), the peak LR against smaller ones from the state the warm-up led to; when the peak fails its trial (a
      refused step, a non-finite loss, weights moving more than ``max_update_ratio`` or their norm growing more than
      ``max_norm_growth`` per step) the run restarts from its first state at the search's choice. A warm-up is part
      of the recipe: the peak is judged where the run meets it, and a recipe whose peak trains is not overruled by a
      trial loss.
    - `on_stall`: the current LR against smaller ones from the last good state when the detector stopped learning.
    - `grow`: every ``growth_interval`` healthy iterations, a reduced LR against one step higher, from now.

    An LR that failed, in training or in a search's trials, or lost a search by more than twice the margin, is never
    grown back to (`LRControl`'s ceiling).

    Args:
        lr_control: the schedule's multiplier, shared with the guard (which reads it).
        enabled: search at all (``False``: every fault backs the LR off by ``lr_backoff``; no check, no growth).
        search_iters: steps per trial (the last that many applied batches are kept for the trials).
        search_margin: how much more trial loss than the best the chosen (largest) LR may have, as a fraction.
        lr_backoff: the LR factor when a search cannot tell.
        growth_interval: healthy iterations after an LR change before a reduced LR is tried one step higher.
        max_update_ratio: a trial whose weights move more than this per step fails (0: no limit).
        search_confirm: steps of the longer trials that settle an after-fault search, in ``search_iters`` (0: none).
        max_norm_growth: a trial whose weights' norm grows more than this per step fails (0: no limit).
        search: the search over candidate LRs (`search_lr`'s signature; a test passes a scripted one).
    """

    def __init__(
        self,
        lr_control: LRControl,
        enabled: bool = True,
        search_iters: int = 16,
        search_margin: float = 0.25,
        lr_backoff: float = 0.1,
        growth_interval: int = 200,
        max_update_ratio: float = 0.0,
        search_confirm: int = 3,
        max_norm_growth: float = 0.0,
        search: Callable[..., SearchResult] = search_lr,
    ) -> None:
        self.lr_control, self.enabled = lr_control, enabled
        self.search_confirm, self.search = search_confirm, search
        self.max_norm_growth = max_norm_growth
        self.search_iters, self.search_margin, self.lr_backoff = search_iters, search_margin, lr_backoff
        self.growth_interval, self.max_update_ratio = growth_interval, max_update_ratio
        self.batches: deque[Any] = deque(maxlen=search_iters)  # the last batches whose step was applied
        self.kept_as_transient: float | None = None  # the LR multiplier a search last kept after a rollback
        self.last_lr_change = 0

    def remember(self, batch: Any) -> None:
        """Keep an applied step's batch for the trials."""
        if self.enabled:
            self.batches.append(batch)

    def ready_to_check(self) -> bool:
        """Whether `check` has its ``search_iters`` batches."""
        return len(self.batches) == self.search_iters

    def due_for_growth(self, iteration: int) -> bool:
        """A reduced LR that has been healthy for ``growth_interval`` iterations since it last changed."""
        return self.enabled and self.lr_control.can_grow() and iteration - self.last_lr_change >= self.growth_interval

    def after_fault(self, engine: Engine, origin: Snapshot) -> LRDecision:
        """The LR to go on with from ``origin`` after a fault (always a restart: the caller rolls back)."""
        failed = self.lr_control.current_lr()
        # a fault that comes back at the LR a search kept is no transient: the LR passes short trials but not training
        recurred = self.kept_as_transient is not None and math.isclose(self.lr_control.scale, self.kept_as_transient)
        self.kept_as_transient = None
        result = self._search(engine, origin, failed * SEARCH_STEP if recurred else failed, patience=2, settle=True)
        if result is None or result.lr is None:  # the search could not tell: the classic remedy
            return LRDecision(restart=True, back_off=True, search=result)
        if result.changed or recurred:
            return LRDecision(restart=True, peak_lr=result.lr, failed_lr=failed, search=result)
        return LRDecision(restart=True, transient=True, search=result)

    def check(self, engine: Engine, now: Snapshot, may_restart: bool) -> LRDecision:
        """
        Does the schedule's peak LR train from where its warm-up led (``now``)? When it fails its trial and a smaller
        LR works, a restart there (from the run's first state, the caller's) if ``may_restart``; otherwise the run is
        put back to ``now`` at its LR.
        """
        start = self.lr_control.peak_lr()
        result = self._search(engine, now, start, patience=1, max_trials=6)
        # the recipe is overruled only where its peak fails from the warmed-up state: a smaller LR wins 16-step trials
        # from there by up to half without learning better (ResNet50-FPN, batch 2: 0.01 33% and 46% behind)
        if result is not None and result.changed and result.incumbent.failed and may_restart:
            return LRDecision(restart=True, peak_lr=result.lr, failed_lr=start, search=result)
        return self._keep(now, result)

    def on_stall(self, engine: Engine, origin: Snapshot, now: Snapshot, may_restart: bool) -> LRDecision:
        """Does a smaller LR than the current one learn better from ``origin``? A restart there if so."""
        failed = self.lr_control.current_lr()
        result = self._search(engine, origin, failed, patience=2)
        if result is not None and result.changed and may_restart:
            return LRDecision(restart=True, peak_lr=result.lr, failed_lr=failed, search=result)
        return self._keep(now, result)

    def grow(self, engine: Engine, now: Snapshot) -> LRDecision:
        """Does one step up from a reduced LR learn about as well from ``now``? Then it is taken."""
        self.last_lr_change = engine.state.iteration
        start = self.lr_control.peak_lr()
        up = self.lr_control.growth_candidate(1 / SEARCH_STEP)
        result = self._search(engine, now, start, patience=1, max_trials=2, step=up / start, limit=up)
        now.restore()
        if result is not None and result.changed:
            self.lr_control.set_peak_lr(result.lr)
            return LRDecision(restart=False, peak_lr=result.lr, search=result)
        self.lr_control.failed_at(up)  # do not try that level again
        self.lr_control.reapply()
        return LRDecision(restart=False, failed_lr=up, search=result)

    def apply(self, decision: LRDecision, iteration: int) -> None:
        """Set the LR a restart decided on, after the caller rolled the run back (at ``iteration``)."""
        self.last_lr_change = iteration
        if decision.back_off:
            self.lr_control.back_off(self.lr_backoff)
            return
        if decision.transient:
            self.kept_as_transient = self.lr_control.scale
            self.lr_control.reapply()
            return
        self.lr_control.failed_at(decision.failed_lr)
        self.lr_control.set_peak_lr(decision.peak_lr)

    def _keep(self, now: Snapshot, result: SearchResult | None) -> LRDecision:
        now.restore()  # the trials moved the state: back to where the run was, at its LR
        self.lr_control.reapply()
        return LRDecision(restart=False, search=result)

    def _search(
        self,
        engine: Engine,
        origin: Snapshot,
        start: float,
        patience: int,
        max_trials: int = 10,
        step: float = SEARCH_STEP,
        limit: float | None = None,
        settle: bool = False,
    ) -> SearchResult | None:
        """
        Paired LR trials from ``origin`` on the kept batches (``None`` when searching is off or impossible); with
        ``settle``, longer trials decide between a new choice and the best (`confirm`).
        """
        if not (self.enabled and self.batches):
            return None
        step_fn = lambda batch: engine.train_step(batch, fire_events=False)  # noqa: E731
        limits = {"max_update_ratio": self.max_update_ratio, "max_norm_growth": self.max_norm_growth}
        runner = TrialRunner(step_fn, origin, self.batches, self.search_iters, **limits)
        limit = start * 1e-5 if limit is None else limit
        result = self.search(runner, start, step, limit, max_trials, patience, self.search_margin)
        if settle and self.search_confirm > 0 and result.changed:  # a transient keeps its LR: nothing to settle
            iterations = self.search_confirm * self.search_iters
            longer = TrialRunner(step_fn, origin, self.batches, iterations, tail=self.search_iters, **limits)
            result = confirm(longer, result)
        runner.finish()
        if result.lr is not None and result.lost_at is not None:  # lost from a good state: never grow back to it
            self.lr_control.failed_at(result.lost_at)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr_control.state_dict(), "kept_as_transient": self.kept_as_transient}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_control.load_state_dict(state["lr"])
        self.kept_as_transient = state.get("kept_as_transient")
