"""A short, paired search for the learning rate that works from a given training state.

Each candidate LR trains a few iterations from the same state, on the same batches and with the same random
state (`run_trial` is given by the caller and restores all three), and is judged by its mean training loss: an LR
that is too high makes the loss jump in the first steps, one that is too low makes slow progress, and the pairing
takes the batch-to-batch noise out of the comparison. It is a learning-rate range test (Smith 2017; Lightning's
LR finder) made discrete and paired, because neither torch, ignite nor MONAI can pick an LR from a training
state and roll the trials back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scripts.detection.step_report import StepReport
from scripts.guard.snapshot import Snapshot

__all__ = ["SearchResult", "Trial", "TrialRunner", "choose", "confirm", "search_lr"]


@dataclass(frozen=True)
class Trial:
    """
    The outcome of training a few iterations at one LR.

    Attributes:
        lr: the (constant) LR of the trial.
        loss: the mean loss of its steps after the first (which is the same for every LR); NaN if it failed.
        failed: a step was refused or its loss was not finite.
    """

    lr: float
    loss: float
    failed: bool


@dataclass(frozen=True)
class SearchResult:
    """
    The trials in the order run, the LR chosen (``None`` when every candidate failed), and the smallest LR above
    the choice that clearly lost (``None`` if none did): one that failed, or whose loss was more than twice the
    margin above the best. Trials cannot tell an LR within the margin from a better one; they can tell a loser.
    """

    trials: tuple[Trial, ...]
    lr: float | None
    lost_at: float | None = None
    confirmation: tuple[Trial, ...] = ()

    @property
    def best(self) -> Trial | None:
        """The working trial with the lowest loss (``None`` when every candidate failed)."""
        working = [t for t in self.trials if not t.failed]
        return min(working, key=lambda t: t.loss) if working else None

    @property
    def incumbent(self) -> Trial:
        """The trial of the LR the search started from."""
        return self.trials[0]

    @property
    def changed(self) -> bool:
        """Whether the search chose another LR than the one it started from."""
        return self.lr is not None and self.lr != self.incumbent.lr

    def summary(self) -> str:
        """One line: each LR with its mean trial loss, and the choice."""
        tried = _listed(self.trials)
        chosen = "none works" if self.lr is None else f"{self.lr:.3g}"
        below = f" (lost at {self.lost_at:.3g})" if self.lr is not None and self.lost_at is not None else ""
        longer = _listed(self.confirmation)
        return f"{tried} -> {chosen}{below}" + (f"; longer trials {longer}" if longer else "")


def _listed(trials: tuple[Trial, ...]) -> str:
    """Each trial's LR with its loss (or ``failed``), for a log line."""
    return ", ".join(f"{t.lr:.3g}: {'failed' if t.failed else f'{t.loss:.4g}'}" for t in trials)


def search_lr(
    run_trial: Callable[[float], Trial],
    start_lr: float,
    step: float = 10**-0.5,
    limit_lr: float = 0.0,
    max_trials: int = 8,
    patience: int = 2,
    margin: float = 0.25,
) -> SearchResult:
    """
    Try ``start_lr``, then ``start_lr * step``, ``start_lr * step**2``, ... and choose the largest LR whose mean
    loss is within ``margin`` of the lowest; a larger LR that failed or lost by more than ``2 * margin`` is reported
    as ``lost_at``.

    The walk stops after ``patience`` candidates in a row that do not improve on the best working one, at
    ``max_trials`` trials, or past ``limit_lr`` (a floor when ``step < 1``, a ceiling when ``step > 1``). The margin
    is there because a smaller LR always wins a short trial by a little once training is under way (it settles the
    weights, the effect LR decay exploits) without learning better; an LR that is too high loses by far more.

    Args:
        run_trial: trains a few iterations at the given LR from the fixed state and returns the `Trial`.
        start_lr: the LR to start from (the incumbent).
        step: the factor between candidates (below 1 walks down, above 1 up).
        limit_lr: the LR not to walk past.
        max_trials: the most trials run, the first included.
        patience: candidates without improvement before the walk stops.
        margin: how much more loss than the best the chosen (larger) LR may have, as a fraction.
    """
    trials = [run_trial(start_lr)]
    best = None if trials[0].failed else trials[0]
    misses, lr = 0, start_lr
    while len(trials) < max_trials:
        lr *= step
        if (step < 1 and lr < limit_lr * (1 - 1e-9)) or (step > 1 and 0 < limit_lr * (1 + 1e-9) < lr):
            break
        trial = run_trial(lr)
        trials.append(trial)
        if not trial.failed and (best is None or trial.loss < best.loss):
            best, misses = trial, 0
        elif best is not None:
            misses += 1
            if misses >= patience:
                break
    return choose(trials, margin)


def choose(trials: Sequence[Trial], margin: float) -> SearchResult:
    """`search_lr`'s choice among ``trials``: the largest working LR within ``margin`` of the lowest loss, and the
    smallest larger LR that failed or lost by more than ``2 * margin`` as ``lost_at``."""
    working = [t for t in trials if not t.failed]
    if not working:
        return SearchResult(tuple(trials), None)
    best = min(t.loss for t in working)
    chosen = max(t.lr for t in working if t.loss <= (1 + margin) * best)
    lost = [t.lr for t in trials if t.lr > chosen and (t.failed or t.loss > (1 + 2 * margin) * best)]
    return SearchResult(tuple(trials), chosen, min(lost) if lost else None)


def confirm(run_longer: Callable[[float], Trial], result: SearchResult) -> SearchResult:
    """
    Settle a search whose choice (the largest LR within the margin) is not the LR with the lowest trial loss: both
    train again, longer (``run_longer``, judged by the loss of their last steps, where a run goes on from), and the
    larger is kept only if it ends no worse; otherwise the smaller wins and the larger is reported as ``lost_at``.
    The margin exists because a short trial cannot tell an LR slightly behind from one that is worse; a longer one
    can, and a restart is committed to for the rest of the run.
    """
    best = result.best
    if result.lr is None or best is None or best.lr == result.lr:
        return result
    larger, smaller = run_longer(result.lr), run_longer(best.lr)
    if not larger.failed and (smaller.failed or larger.loss <= smaller.loss):
        return dataclasses.replace(result, confirmation=(larger, smaller))
    lost_at = min(result.lr, result.lost_at) if result.lost_at is not None else result.lr
    return dataclasses.replace(result, lr=best.lr, lost_at=lost_at, confirmation=(larger, smaller))


def mean_after_first(losses: list[float]) -> float:
    """The mean of ``losses[1:]`` (the first is computed before any step, the same for every LR)."""
    rest = losses[1:] or losses
    return math.fsum(rest) / len(rest) if rest else math.nan


class TrialRunner:
    """
    Runs the trials of `search_lr` from one training state: before each, the state (``origin``) and the random
    number generators are put back exactly; then the LR is held constant for ``iterations`` steps over ``batches``
    (cycled), with the trainer's own step.

    A trial fails when a step is refused (an fp16 overflow, the GradScaler's business, excepted), its loss is not
    finite, the weights moved more than ``max_update_ratio`` of their norm per step, or their norm grew more than
    ``max_norm_growth`` per step (the guard's own limits).

    Args:
        step: one training step on a loader batch, returning its `StepReport` (``fire_events=False``).
        origin: the state every trial starts from.
        batches: the loader batches to train on (the same for every trial).
        iterations: steps per trial.
        max_update_ratio: the update ratio per step above which a trial fails (0: no limit).
        max_norm_growth: the norm growth per step above which a trial fails (0: no limit).
        tail: judge a trial by the mean loss of its last ``tail`` steps (``None``: of every step after the first).
    """

    def __init__(
        self,
        step: Callable[[Any], StepReport],
        origin: Snapshot,
        batches: Sequence[Any],
        iterations: int,
        max_update_ratio: float = 0.0,
        tail: int | None = None,
        max_norm_growth: float = 0.0,
    ) -> None:
        self.step = step
        self.tail = tail
        self.origin = origin
        self.batches = list(batches)
        self.iterations = iterations
        self.max_update_ratio = max_update_ratio
        self.max_norm_growth = max_norm_growth
        self.rng = random_state()

    def __call__(self, lr: float) -> Trial:
        self.origin.restore()
        set_random_state(self.rng)
        groups = self.origin.optimizer.param_groups
        base = groups[0]["lr"]
        for group in groups:  # the ratios between groups are kept
            group["lr"] = lr * group["lr"] / base if base else lr
        losses = []
        for i in range(self.iterations):
            report = self.step(self.batches[i % len(self.batches)])
            if (report.event is not None and not report.amp_overflow) or not math.isfinite(report.loss):
                return Trial(lr, math.nan, True)
            losses.append(report.loss)
        if self.max_update_ratio or self.max_norm_growth:
            drift = self.origin.drift(self.origin.network_state(), self.iterations)
            if drift.exceeded(self.max_update_ratio, self.max_norm_growth):
                return Trial(lr, math.nan, True)
        loss = mean_after_first(losses) if self.tail is None else math.fsum(losses[-self.tail :]) / self.tail
        return Trial(lr, loss, False)

    def finish(self) -> None:
        """Put the random number generators back as they were before the first trial."""
        set_random_state(self.rng)


def random_state() -> dict[str, Any]:
    """Torch's CPU and CUDA generator states (the detector's hard-negative sampler draws from them)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_random_state(state: dict[str, Any]) -> None:
    """Put back a `random_state`."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
