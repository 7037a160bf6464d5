"""The stability guard: the policy that turns what the trainer reports into skips, rollbacks, learning-rate
searches, quarantine and, when recovery is hopeless or the detector learned nothing, a clean stop with a report.

Ignite's `TerminateOnNan` only stops a run and AMP's GradScaler only skips fp16 overflow steps; nothing in MONAI,
ignite or torch restores a last good state, finds a learning rate that works from it and carries on, hence this
handler. Its parts are modules of their own: `Snapshot` (the last good state), `LRControl` (the schedule's
multiplier), `search_lr` (paired LR trials), `LearningSignal` (is the detector still learning), `FileBlame` (which
files to quarantine) and `GuardLog` (events, report, checkpoint).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.blame import FileBlame
from scripts.guard_log import GuardEvent, GuardLog
from scripts.learning_signal import LearningSignal
from scripts.lr_control import LRControl
from scripts.lr_search import SearchResult, TrialRunner, search_lr
from scripts.quarantine import Quarantine
from scripts.snapshot import Snapshot, weights_finite
from scripts.step_report import StepReport

__all__ = ["GuardStopped", "StabilityGuard"]

logger = logging.getLogger(__name__)

COUNTERS = ("events", "skipped_steps", "rollbacks", "amp_overflows", "weights_nonfinite", "lr_searches", "stalls")
SEARCH_STEP = 10**-0.5  # candidate LRs a factor sqrt(10) apart, walking down


class GuardStopped(SystemExit):
    """Raised by `StabilityGuard.raise_if_failed`: a non-zero exit with one clear message."""


class StabilityGuard:
    """
    Keeps a training run stable and makes sure it ends with a detector that learned, or says why not.

    - An event the trainer reports (non-finite input, logits, loss or gradient, or a loss spike above
      ``max_loss_growth`` times the median of the recent losses) skips the step. Non-finite input blames its files
      (they are quarantined) and nothing else. ``patience`` other events in a row, non-finite weights, or weights
      that moved more than ``max_update_ratio`` of their norm per step, roll back to the last good snapshot.
    - After a rollback, candidate LRs from the one that failed downwards are tried from the snapshot on the same
      recent batches (`search_lr`), and the largest whose trial loss is within ``search_margin`` of the best is
      kept: a fault that does not reproduce keeps the LR, unless it comes back at that LR, when the search starts
      one step lower. The LR is never grown back above a level that failed, in training or in a search's trials,
      or that lost a search by more than twice the margin.
      When the search cannot tell (every LR fails), the LR is multiplied by ``lr_backoff``.
    - After the first ``search_iters`` steps the same search checks the run's LR against smaller ones from the run's
      first state: a healthy LR is kept and the run goes on untouched, one that is too high restarts the run from
      that state (until then rollbacks go there too). Every ``growth_interval`` healthy iterations an LR below the
      recipe's is checked against one step higher.
    - The snapshot is refreshed every ``snapshot_every`` steps while the window had no event, the loss did not grow
      ``max_loss_growth`` times and the detector's score gap did not collapse (`LearningSignal`). A gap collapsed
      for ``stall_windows`` windows is a stall: LRs are searched from the snapshot, and a smaller LR that works
      better rolls the run back to it.
    - After ``max_rollbacks`` rollbacks, or ``max_refused_in_a_row`` refused steps in a row from the last good
      state, the run stops: the snapshot is restored and saved, the report written, and `raise_if_failed` exits
      non-zero. A run whose best validation metric stayed at or below ``min_val_metric`` ends the same way, once it
      had a fair chance to learn: a validation ran ``judge_after_epochs`` epochs or more after the end of the LR
      warm-up. A shorter run (a smoke test, a run that ends in its warm-up) ends with a warning that it was too short
      to judge.

    Its counters, ceiling, learning signal, event log and file statistics are in `state_dict`.

    Args:
        network: the trained network.
        optimizer: its optimiser.
        lr_scheduler: a `scripts.schedule.WarmupDecayLR` (the guard scales its multiplier).
        scaler: the GradScaler of fp16 training, if any.
        enabled: ``False`` attaches nothing.
        patience: consecutive refused steps that roll back.
        lr_backoff: LR factor when a search cannot tell which LR works.
        max_rollbacks: rollbacks allowed before the run is stopped.
        max_refused_in_a_row: refused steps in a row, with no step applied since the last good state, that stop the run.
        snapshot_every: steps per window (snapshot refresh, update ratio, learning signal).
        quarantine_after: events a file must take part in before it is quarantined (0: never).
        max_loss_growth: the loss-spike factor, for single steps and for window means.
        max_update_ratio: the update ratio per step above which the run rolls back (0: no check).
        amp_overflow_patience: consecutive fp16 overflows the GradScaler absorbs before they count as an event.
        lr_search: search the LR after rollbacks, at the end of the warm-up, on stalls and for growth (``False``:
            back off by ``lr_backoff`` and never grow).
        search_iters: steps per trial of the search (the last that many batches are kept for it).
        search_margin: how much more trial loss than the best LR the chosen (largest) LR may have, as a fraction.
        growth_interval: healthy iterations after an LR change before a backed-off LR is tried one step higher.
        stall_windows: windows of collapsed score gap that make a stall.
        min_val_metric: the best validation metric must exceed this for the run to count as learned (``None``: no
            check).
        judge_after_epochs: epochs after the warm-up that the last validation must come at or after for the run to
            be judged by ``min_val_metric``.
        validator: the evaluator whose ``best_metric`` tells whether the detector learned (``None``: not checked).
        quarantine: the shared record of bad files.
        report_path: JSON report (``None``: none).
        ckpt_path: where the last good state is saved when the run stops (``None``: nowhere).
        output_transform: maps ``engine.state.output`` to the trainer's `StepReport`.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        scaler: torch.amp.GradScaler | None = None,
        enabled: bool = True,
        patience: int = 3,
        lr_backoff: float = 0.1,
        max_rollbacks: int = 8,
        max_refused_in_a_row: int = 100,
        snapshot_every: int = 10,
        quarantine_after: int = 2,
        max_loss_growth: float = 10.0,
        max_update_ratio: float = 0.02,
        amp_overflow_patience: int = 20,
        lr_search: bool = True,
        search_iters: int = 16,
        search_margin: float = 0.25,
        growth_interval: int = 200,
        stall_windows: int = 5,
        min_val_metric: float | None = 0.01,
        judge_after_epochs: int = 10,
        validator: Engine | None = None,
        quarantine: Quarantine | None = None,
        report_path: str | None = None,
        ckpt_path: str | None = None,
        output_transform: Callable[[Any], StepReport] = lambda x: x,
    ) -> None:
        self.network, self.optimizer, self.enabled = network, optimizer, enabled
        self.patience, self.lr_backoff, self.max_rollbacks = patience, lr_backoff, max_rollbacks
        self.max_refused_in_a_row, self.snapshot_every = max_refused_in_a_row, snapshot_every
        self.max_loss_growth, self.max_update_ratio = max_loss_growth, max_update_ratio
        self.amp_overflow_patience, self.lr_search = amp_overflow_patience, lr_search
        self.search_iters, self.search_margin, self.growth_interval = search_iters, search_margin, growth_interval
        self.min_val_metric, self.judge_after_epochs = min_val_metric, judge_after_epochs
        self.validator, self.output_transform = validator, output_transform
        self.snapshot = Snapshot(network, optimizer, scaler, lr_scheduler)
        self.lr = LRControl(lr_scheduler)
        self.blame = FileBlame(quarantine_after)
        self.learning = LearningSignal(patience=stall_windows)
        self.log = GuardLog(report_path, ckpt_path)
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.status, self.message = "running", None
        self.consecutive = self.consecutive_amp = self.steps_since_restore = self.steps_since_snapshot = 0
        self.recent: deque[float] = deque(maxlen=snapshot_every)  # losses of the last applied steps
        self.batches: deque[Any] = deque(maxlen=search_iters)  # the last batches whose step was applied
        self.window: list[StepReport] = []
        self.window_clean = True
        self.snapshot_loss: float | None = None
        self.update_ratio = math.nan
        self.anchor: Snapshot | None = None  # the run's first state, until its LR has been checked
        self.lr_checked = False
        self.last_lr_change = 0
        self.kept_as_transient: float | None = None  # the LR multiplier a search last kept after a rollback
        self.judged_from_epoch: int | None = None  # set when a low best metric was weighed at the end of the run
        self.note: str | None = None  # a warning for the user at the end of a run that did not fail

    def attach(self, engine: Engine) -> None:
        """Register with the trainer (nothing when disabled)."""
        if not self.enabled:
            return
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def iteration_started(self, engine: Engine) -> None:
        """Take the first snapshot, and give the trainer this iteration's loss-spike limit."""
        if self.snapshot.state is None:
            self.snapshot.take(engine.state.iteration - 1)  # the state after that many iterations
            # a shallow copy shares the state taken now; `take` replaces, never mutates it
            self.anchor = None if self.lr_checked else copy.copy(self.snapshot)
        median = statistics.median(self.recent) if self.recent else math.inf
        engine.set_loss_limit(self.max_loss_growth * max(median, 1.0))

    def iteration_completed(self, engine: Engine) -> None:
        """Act on the trainer's report of the iteration."""
        report = self.output_transform(engine.state.output)
        self.blame.seen(report.files)
        if report.stepped:
            self._stepped(engine, report)
        else:
            self._refused(engine, report)

    # ------------------------------------------------------------------------------------------------ the policy
    def _refused(self, engine: Engine, report: StepReport) -> None:
        self.counters["skipped_steps"] += 1
        self.window_clean = False
        if report.amp_overflow:
            self.counters["amp_overflows"] += 1
            self.consecutive_amp += 1
            if self.consecutive_amp < self.amp_overflow_patience:
                return
        self.counters["events"] += 1
        if report.event == "input":  # the file is at fault, not the training state
            self._record(engine, "input", report, "step skipped", "non-finite input")
            return
        self.consecutive += 1
        if not weights_finite(self.network):
            self.counters["weights_nonfinite"] += 1
            self._record(engine, "weights", report, "rolling back", "non-finite weights")
            self._recover(engine, "the weights became non-finite")
            return
        what = f"loss spike (above {engine.loss_limit:.3g})" if math.isfinite(report.loss) else None
        self._record(engine, report.event, report, "step skipped", what or f"non-finite {report.event}")
        if self.consecutive >= self.patience and self.steps_since_restore > 0:
            self._recover(engine, f"{self.consecutive} consecutive refused steps")
        elif self.consecutive >= self.max_refused_in_a_row:  # from the last good state: rolling back cannot help
            self._stop(engine, f"{self.consecutive} steps in a row were refused from the last good state")

    def _stepped(self, engine: Engine, report: StepReport) -> None:
        self.consecutive = self.consecutive_amp = 0
        self.steps_since_restore += 1
        self.steps_since_snapshot += 1
        self.recent.append(report.loss)
        if self.lr_search:
            self.batches.append(engine.state.batch)
        self.window.append(report)
        if len(self.window) >= self.snapshot_every and not self._end_window(engine, report):
            return
        if self.anchor is not None and len(self.batches) == self.search_iters:
            self._check_lr(engine)
        elif self.lr_search and self.lr.can_grow() and self._healthy_for(engine) >= self.growth_interval:
            self._grow(engine)

    def _healthy_for(self, engine: Engine) -> int:
        """Iterations since the LR last changed (or was tried higher)."""
        return engine.state.iteration - self.last_lr_change

    def _end_window(self, engine: Engine, report: StepReport) -> bool:
        """Update ratio, learning signal and snapshot refresh; ``False`` when the window ended in a rollback."""
        window, clean = self.window, self.window_clean
        self.window, self.window_clean = [], True
        network_state = self.snapshot.network_state()
        self.update_ratio = self.snapshot.update_ratio(network_state, self.steps_since_snapshot)
        if self.max_update_ratio and self.update_ratio > self.max_update_ratio:
            what = f"update ratio {self.update_ratio:.2g}"
            self._record(engine, "update", report, "rolling back", what)
            self._recover(engine, f"the weights moved {what} of their norm per step (max {self.max_update_ratio:.2g})")
            return False
        self.learning.add(_nanmean([r.score_gap for r in window]))
        mean_loss = _nanmean([r.loss for r in window])
        grew = self.snapshot_loss is not None and mean_loss > self.max_loss_growth * max(self.snapshot_loss, 1e-8)
        if clean and math.isfinite(mean_loss) and not grew and not self.learning.collapsed():
            self.snapshot.take(engine.state.iteration, network_state)
            self.snapshot_loss, self.steps_since_snapshot = mean_loss, 0
        elif self.learning.stalled():
            return self._stall(engine, report)
        return True

    def _recover(self, engine: Engine, why: str) -> None:
        """
        Roll back and continue at the LR that works from there: to the run's first state while the LR has not been
        checked yet (the steps since may be damaged without showing it), else to the last good snapshot.
        """
        self.consecutive = self.consecutive_amp = 0
        if self.counters["rollbacks"] >= self.max_rollbacks:
            self._stop(engine, why)
            return
        origin = self.anchor or self.snapshot
        failed = self.lr.current_lr()
        # a fault that comes back at the LR a search kept is no transient: the LR passes short trials but not training
        recurred = self.kept_as_transient is not None and math.isclose(self.lr.scale, self.kept_as_transient)
        start = failed * SEARCH_STEP if recurred else failed
        result = self._search(engine, origin, start, patience=2)
        self._restore(engine, origin)
        self.kept_as_transient = None
        if result is None or result.lr is None:  # the search could not tell: the classic remedy
            self.lr.back_off(self.lr_backoff)
        elif result.changed or recurred:
            self.lr.failed_at(failed)
            self.lr.set_peak_lr(result.lr)
        else:  # the fault did not reproduce from the good state: a transient, keep the LR
            self.kept_as_transient = self.lr.scale
            self.lr.reapply()
        logger.warning(
            f"guard: {why}; rolled back to the state after iteration {origin.iteration}, LR now "
            f"{self.lr.current_lr():.3g} (x{self.lr.scale:.3g} of the schedule; rollback "
            f"{self.counters['rollbacks']}/{self.max_rollbacks})"
        )

    def _check_lr(self, engine: Engine) -> None:
        """
        Once the first ``search_iters`` steps are in: does the run's LR learn from its first state, or does a
        smaller one learn clearly better? A run whose LR holds goes on untouched; one that does not restarts from
        its first state (the steps taken may have damaged the detector for good without any event).
        """
        anchor, start = self.anchor, self.lr.peak_lr()
        current = self._copy_of_now(engine)
        result = self._search(engine, anchor, start, patience=1, max_trials=6)
        if result is not None and result.changed and self.counters["rollbacks"] < self.max_rollbacks:
            self._restore(engine, anchor)
            self.lr.failed_at(start)
            self.lr.set_peak_lr(result.lr)
            logger.warning(f"guard: LR {start:.3g} too high: restarted after iteration {anchor.iteration}")
        else:
            current.restore()
            self.lr.reapply()
        self.anchor, self.lr_checked = None, True

    def _stall(self, engine: Engine, report: StepReport) -> bool:
        """The detector stopped separating nodules from background; ``False`` when a smaller LR cured it."""
        self.counters["stalls"] += 1
        level = f"score gap {self.learning.level:.3g}, best {self.learning.best:.3g}"
        self._record(engine, "stall", report, "searching the LR", f"learning stalled ({level})")
        current = self._copy_of_now(engine)
        failed = self.lr.current_lr()
        result = self._search(engine, self.snapshot, failed, patience=2)
        if result is not None and result.changed and self.counters["rollbacks"] < self.max_rollbacks:
            self._restore(engine, self.snapshot)
            self.lr.failed_at(failed)
            self.lr.set_peak_lr(result.lr)
            logger.warning(f"guard: back to iteration {self.snapshot.iteration}, LR {self.lr.current_lr():.3g}")
            return False
        current.restore()  # a smaller LR does not do better: not the LR's doing, carry on from here
        self.lr.reapply()
        self.learning.rebase()
        return True

    def _grow(self, engine: Engine) -> None:
        """After a healthy stretch at a backed-off LR: does one step up learn about as well? Then take it."""
        self.last_lr_change = engine.state.iteration
        current = self._copy_of_now(engine)
        start = self.lr.peak_lr()
        up = self.lr.growth_candidate(1 / SEARCH_STEP)
        result = self._search(engine, current, start, patience=1, max_trials=2, step=up / start, limit=up)
        current.restore()
        if result is not None and result.changed:
            self.lr.set_peak_lr(result.lr)
            logger.warning(f"guard: LR grown back from {start:.3g} to {result.lr:.3g} (peak of the schedule)")
        else:
            self.lr.failed_at(up)  # do not try that level again
            self.lr.reapply()

    def _search(
        self,
        engine: Engine,
        origin: Snapshot,
        start: float,
        patience: int,
        max_trials: int = 10,
        step: float = SEARCH_STEP,
        limit: float | None = None,
    ) -> SearchResult | None:
        """Paired LR trials from ``origin`` on the recent batches (``None`` when searching is off or impossible)."""
        if not (self.lr_search and self.batches):
            return None
        step_fn = lambda batch: engine.train_step(batch, fire_events=False)  # noqa: E731
        runner = TrialRunner(step_fn, origin, self.batches, self.search_iters, self.max_update_ratio)
        limit = start * 1e-5 if limit is None else limit
        result = search_lr(runner, start, step, limit, max_trials, patience, self.search_margin)
        runner.finish()
        if result.lr is not None and result.lost_at is not None:  # lost from a good state: never grow back to it
            self.lr.failed_at(result.lost_at)
        self.counters["lr_searches"] += 1
        self.log.record_search(engine.state.iteration, result)
        return result

    def _copy_of_now(self, engine: Engine) -> Snapshot:
        current = Snapshot(self.network, self.optimizer, self.snapshot.scaler, self.snapshot.lr_scheduler)
        current.take(engine.state.iteration)
        return current

    def _restore(self, engine: Engine, origin: Snapshot) -> None:
        """Roll back to ``origin``, which becomes the last good snapshot, and forget the abandoned trajectory."""
        origin.restore()
        self.counters["rollbacks"] += 1
        self.snapshot = origin
        self.anchor, self.lr_checked = None, True
        self.recent.clear()
        self.window, self.window_clean = [], True
        self.steps_since_restore = self.steps_since_snapshot = 0
        self.learning.restart()
        self.last_lr_change = engine.state.iteration

    def _record(self, engine: Engine, kind: str, report: StepReport, action: str, what: str) -> None:
        verdict = self.blame.blame(report.bad_files, kind)  # an applied step (update, stall) blames no file
        self.log.record(
            GuardEvent(
                iteration=engine.state.iteration,
                epoch=engine.state.epoch,
                kind=kind,
                action=action,
                what=what,
                loss=report.loss,
                loss_cls=report.loss_cls,
                loss_reg=report.loss_reg,
                grad_norm=report.grad_norm,
                lr=self.lr.current_lr(),
                files=verdict.files,
                update_ratio=self.update_ratio if kind == "update" else None,
                positive_score=report.positive_score,
            )
        )
        for file, reason in verdict.quarantine:
            self.quarantine.add(file, reason, "guard")

    # ------------------------------------------------------------------------------------------------ the end
    def _stop(self, engine: Engine, why: str) -> None:
        self.snapshot.restore()
        self.lr.reapply()
        self.status = "stopped"
        saved = self.log.save_checkpoint(self.snapshot.state)
        self.message = (
            f"Training stopped by the stability guard at epoch {engine.state.epoch} iteration "
            f"{engine.state.iteration}: {why} after {self.counters['rollbacks']} rollbacks (LR x{self.lr.scale:.3g})."
            + (f" The last good state (iteration {self.snapshot.iteration}) is saved in {saved}." if saved else "")
            + f" Report: {self.log.report_path}. Try a lower learning_rate, a longer warm-up or a smaller "
            "grad_clip_norm, and run check_data on the files named in the report."
        )
        logger.error(self.message)
        self.write_report()
        engine.terminate()

    def completed(self, engine: Engine) -> None:
        """At the end of the run: did the detector learn, and had it a fair chance to? Write the report."""
        if self.status == "running":
            self.status = "completed"
            best = self._best_validation()
            if best is not None and self.min_val_metric is not None and best <= self.min_val_metric:
                self._judge(engine, best)
        self.write_report()

    def _judge(self, engine: Engine, best: float) -> None:
        """A best validation metric at or below ``min_val_metric``: a failure, or too short a run to tell."""
        epoch_length = max(engine.state.epoch_length or 1, 1)
        warmup_epochs = math.ceil(self.lr.lr_scheduler.warmup_iters / epoch_length)
        self.judged_from_epoch = warmup_epochs + self.judge_after_epochs
        last = int(self.validator.state.epoch)
        if last < self.judged_from_epoch:
            self.note = (
                f"The run was too short to judge whether the detector learned: its last validation was at epoch "
                f"{last}, and only one from epoch {self.judged_from_epoch} on counts ({warmup_epochs} warm-up epochs + "
                f"guard#judge_after_epochs {self.judge_after_epochs}); best validation metric so far {best:.4g}."
            )
            logger.warning(f"guard: {self.note}")
            return
        self.status = "not_learned"
        self.message = (
            f"The detector did not learn: its best validation metric is {best:.4g} (min_val_metric "
            f"{self.min_val_metric:g}) after {last} epochs, {self.counters['rollbacks']} rollbacks and "
            f"{self.counters['lr_searches']} LR searches. The saved model detects nothing; see "
            f"{self.log.report_path}. Check the data (check_data), the learning_rate and the warm-up."
        )
        logger.error(self.message)

    def _best_validation(self) -> float | None:
        state = getattr(self.validator, "state", None)
        if state is None or getattr(state, "best_metric_epoch", -1) in (-1, None):
            return None
        return float(state.best_metric)

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        """Record the crash in the report and save the last good state (the trainer re-raises the exception)."""
        self.status = f"crashed: {type(e).__name__}: {e}"
        if self.snapshot.state is not None:
            self.log.save_checkpoint(self.snapshot.state)
        self.write_report()

    def raise_if_failed(self) -> None:
        """Exit non-zero with the message if the guard stopped the run or the detector did not learn."""
        if self.message is not None:
            raise GuardStopped(self.message)

    def write_report(self) -> str | None:
        """Write the JSON report (where ``report_path`` is set)."""
        return self.log.write_report(
            {
                "status": self.status,
                "message": self.message,
                "counters": dict(self.counters),
                "lr_scale": self.lr.scale,
                "lr": self.lr.current_lr(),
                "lr_ceiling": self.lr.ceiling,
                "snapshot_iteration": self.snapshot.iteration,
                "score_gap": {"level": self.learning.level, "best": self.learning.best},
                "best_validation": self._best_validation(),
                "judged_from_epoch": self.judged_from_epoch,
                "note": self.note,
                "quarantined": [{"image": k, **v} for k, v in self.quarantine.entries.items()],
            }
        )

    def telemetry(self) -> dict[str, int | float]:
        """The guard's numbers for the monitor: counters, LR scale, last update ratio, smoothed score gap."""
        return {
            **{k: self.counters[k] for k in ("events", "skipped_steps", "rollbacks", "amp_overflows")},
            "lr_scale": self.lr.scale,
            "update_ratio": self.update_ratio,
            "score_gap_level": self.learning.level,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "lr": self.lr.state_dict(),
            "blame": self.blame.state_dict(),
            "learning": self.learning.state_dict(),
            "log": self.log.state_dict(),
            "snapshot_loss": self.snapshot_loss,
            "lr_checked": self.lr_checked,
            "kept_as_transient": self.kept_as_transient,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = {**dict.fromkeys(COUNTERS, 0), **state["counters"]}
        self.lr.load_state_dict(state["lr"])
        self.blame.load_state_dict(state["blame"])
        self.learning.load_state_dict(state["learning"])
        self.log.load_state_dict(state["log"])
        self.snapshot_loss = state["snapshot_loss"]
        self.lr_checked = bool(state["lr_checked"])
        self.kept_as_transient = state.get("kept_as_transient")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan
