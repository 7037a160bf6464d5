"""The stability guard: the policy that turns what the trainer reports into skips, rollbacks, learning-rate
searches, quarantine and, when recovery is hopeless or the detector learned nothing, a clean stop with a report.

Ignite's `TerminateOnNan` only stops a run and AMP's GradScaler only skips fp16 overflow steps; nothing in MONAI,
ignite or torch restores a last good state, finds a learning rate that works from it and carries on, hence this
handler. This class is the event policy (skip, roll back, stop, judge the end); the LR the run goes on with is
`LRPolicy`'s. Its other parts: `RollbackTarget` (where a rollback goes), `LearningSignal` (is the detector still
learning), `FileBlame` (which files to quarantine) and `GuardLog` (events, report, checkpoint).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from scripts.data.quarantine import Quarantine
from scripts.detection.step_report import StepReport
from scripts.errors import UserError
from scripts.guard.blame import FileBlame
from scripts.guard.learning_signal import LearningSignal
from scripts.guard.log import GuardEvent, GuardLog
from scripts.guard.lr_control import LRControl
from scripts.guard.lr_policy import LRDecision, LRPolicy
from scripts.guard.lr_search import SearchResult, search_lr
from scripts.guard.rollback_target import RollbackTarget
from scripts.guard.snapshot import Snapshot, weights_finite
from scripts.guard.verdict import Verdict, best_validation, judge_learning
from scripts.guard.window import StepWindow

__all__ = ["GuardStopped", "StabilityGuard"]

logger = logging.getLogger(__name__)

COUNTERS = ("events", "skipped_steps", "rollbacks", "amp_overflows", "weights_nonfinite", "lr_searches", "stalls")


class GuardStopped(SystemExit):
    """Raised by `StabilityGuard.raise_if_failed`: a non-zero exit with one clear message."""


class StabilityGuard:
    """
    Keeps a training run stable and makes sure it ends with a detector that learned, or says why not.

    It watches the trainer's `StepReport` of every iteration and, every ``snapshot_every`` applied steps, how far the
    weights moved. A refused step (non-finite input, logits, loss or gradient, or a loss spike) is skipped; input
    blames its files. ``patience`` refused steps in a row, non-finite weights, an update ratio above
    ``max_update_ratio`` or, for SGD, a norm growth above ``max_norm_growth`` roll back to the `RollbackTarget`, and
    the LR the run goes on with is `LRPolicy`'s (searched after a rollback, checked once at the end of the warm-up,
    on a stall, and grown back after a healthy stretch at a reduced LR). After ``max_rollbacks`` rollbacks or
    ``max_refused_in_a_row`` refused steps from the last good state the run stops with the last good state saved;
    a run whose detector learned nothing ends as ``not_learned``; `raise_if_failed` exits non-zero in both cases.
    Events, LR changes and the verdict go to the console and the JSON report (`GuardLog`); counters, LR, learning
    signal, event log and file statistics are in `state_dict`.

    Each rule, its limit and what the user sees: docs/README.md (the guard, step by step); how the parts fit:
    docs/architecture.md.
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
        snapshot_device: str | None = None,
        quarantine_after: int = 2,
        max_loss_growth: float = 10.0,
        max_update_ratio: float = 0.01,
        amp_overflow_patience: int = 20,
        lr_search: bool = True,
        search_iters: int = 16,
        search_margin: float = 0.25,
        search_confirm: int = 3,
        growth_interval: int = 200,
        stall_windows: int = 5,
        min_val_metric: float | None = 0.01,
        judge_after_epochs: int = 10,
        validator: Engine | None = None,
        quarantine: Quarantine | None = None,
        report_path: str | None = None,
        ckpt_path: str | None = None,
        output_transform: Callable[[Any], StepReport] = lambda x: x,
        max_norm_growth: float = 2e-4,
        search: Callable[..., SearchResult] = search_lr,
    ) -> None:
        """
        Args:
            network: the trained network.
            optimizer: its optimiser.
            lr_scheduler: a `scripts.schedule.WarmupDecayLR` (the guard scales its multiplier).
            scaler: the GradScaler of fp16 training, if any.
            enabled: ``False`` attaches nothing.
            patience: consecutive refused steps that roll back.
            lr_backoff: LR factor when a search cannot tell which LR works.
            max_rollbacks: rollbacks allowed before the run is stopped.
            max_refused_in_a_row: refused steps in a row, with no step applied since the last good state, that stop
                the run.
            snapshot_every: steps per window (snapshot refresh, update ratio, learning signal).
            snapshot_device: where the snapshots are kept: ``None`` on the network's device (device memory on a GPU, no
                host copy in the loop), ``"cpu"`` in host memory (when device memory is short).
            quarantine_after: events a file must take part in before it is quarantined (0: never).
            max_loss_growth: the loss-spike factor, for single steps and for window means.
            max_update_ratio: the update ratio per step above which the run rolls back (0: no check); the default is ten
                times the 1e-3 per step of a healthy SGD run (the usual rule of thumb, and what the recipe shows).
            max_norm_growth: for SGD only, the growth per step of the weights' norm above which the run rolls back
                (0: no check): an SGD LR a few times too high inflates the norm of weights that feed a normalisation,
                which shrinks their steps and stalls learning under every other limit. Adam's steps do not shrink so,
                and AdamW grows the norm at healthy LRs: for other optimisers it is not checked.
            amp_overflow_patience: consecutive fp16 overflows the GradScaler absorbs before they count as an event.
            lr_search: search the LR after rollbacks, at the end of the warm-up, on stalls and for growth (``False``:
                back off by ``lr_backoff`` and never grow).
            search_iters: steps per trial of the search (the last that many batches are kept for it).
            search_margin: how much more trial loss than the best LR the chosen (largest) LR may have, as a fraction.
            search_confirm: after a fault, when the chosen LR is not the best of its trials, both train this many times
                ``search_iters`` steps and the one with the lower loss over the last ``search_iters`` wins (0: no longer
                trials).
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
            search: the LR search the policy runs (`scripts.guard.lr_search.search_lr`; a test passes a scripted one).
        """
        self.network, self.optimizer, self.enabled = network, optimizer, enabled
        self.patience, self.max_rollbacks = patience, max_rollbacks
        self.max_refused_in_a_row = max_refused_in_a_row
        self.max_loss_growth, self.max_update_ratio = max_loss_growth, max_update_ratio
        self.max_norm_growth = max_norm_growth if isinstance(optimizer, torch.optim.SGD) else 0.0
        self.amp_overflow_patience = amp_overflow_patience
        self.min_val_metric, self.judge_after_epochs = min_val_metric, judge_after_epochs
        self.validator, self.output_transform = validator, output_transform
        self.target = RollbackTarget(Snapshot(network, optimizer, scaler, lr_scheduler, snapshot_device))
        self.lr_control = LRControl(lr_scheduler)
        self.lr_policy = LRPolicy(
            self.lr_control,
            enabled=lr_search,
            search_iters=search_iters,
            search_margin=search_margin,
            lr_backoff=lr_backoff,
            growth_interval=growth_interval,
            max_update_ratio=max_update_ratio,
            search_confirm=search_confirm,
            max_norm_growth=self.max_norm_growth,
            search=search,
        )
        self.blame = FileBlame(quarantine_after)
        self.learning = LearningSignal(stall_windows=stall_windows)
        self.log = GuardLog(report_path, ckpt_path)
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.status, self.message = "running", None
        self.consecutive = self.consecutive_amp = self.steps_since_restore = 0
        self.window = StepWindow(snapshot_every, max_loss_growth)
        self.update_ratio = self.norm_growth = math.nan
        self.iteration = 0  # the last iteration the guard saw, for the report
        self.verdict = Verdict(best=None, learned=None)  # did the detector learn: judged when the run completes

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
        self.target.start(engine.state.iteration - 1)  # the state after that many iterations
        engine.set_loss_limit(self.window.spike_limit())

    def iteration_completed(self, engine: Engine) -> None:
        """Act on the trainer's report of the iteration."""
        report = self.output_transform(engine.state.output)
        self.iteration = engine.state.iteration
        self.blame.seen(report.files)
        if report.stepped:
            self._stepped(engine, report)
        else:
            self._refused(engine, report)

    # ------------------------------------------------------------------------------------------------ the policy
    def _refused(self, engine: Engine, report: StepReport) -> None:
        self.counters["skipped_steps"] += 1
        self.window.refused()
        if report.amp_overflow:
            self.counters["amp_overflows"] += 1
            self.consecutive_amp += 1
            if self.consecutive_amp < self.amp_overflow_patience:
                return
        if report.event == "input":  # the file is at fault, not the training state
            self._record(engine, "input", report, "step skipped", "non-finite input")
            return
        self.consecutive += 1
        if not weights_finite(self.network):
            self.counters["weights_nonfinite"] += 1
            self._record(engine, "weights", report, "rolling back", "non-finite weights")
            self._recover(engine, "the weights became non-finite")
            return
        spike = report.event == "loss" and math.isfinite(report.loss)  # a finite loss that the limit refused
        what = f"loss spike (above {engine.loss_limit:.3g})" if spike else f"non-finite {report.event}"
        self._record(engine, report.event, report, "step skipped", what)
        if self.consecutive >= self.patience and self.steps_since_restore > 0:
            self._recover(engine, f"{self.consecutive} consecutive refused steps")
        elif self.consecutive >= self.max_refused_in_a_row:  # from the last good state: rolling back cannot help
            self._stop(engine, f"{self.consecutive} steps in a row were refused from the last good state")

    def _stepped(self, engine: Engine, report: StepReport) -> None:
        self.consecutive = self.consecutive_amp = 0
        self.steps_since_restore += 1
        self.target.stepped()
        self.lr_policy.remember(engine.state.batch)
        if self.window.applied(report) and not self._end_window(engine, report):
            return
        if not self.target.lr_checked and self.lr_control.warmup_done() and not self.lr_policy.enabled:
            self.target.checked()  # no search, nothing to check: the warm-up's end stands in for the LR check
        elif not self.target.lr_checked and self.lr_policy.ready_to_check() and self.lr_control.warmup_done():
            self._check_lr(engine)
        elif self.lr_policy.due_for_growth(engine.state.iteration):
            self._grow(engine)

    def _end_window(self, engine: Engine, report: StepReport) -> bool:
        """Update ratio, learning signal and snapshot refresh; ``False`` when the window ended in a rollback."""
        window = self.window.close()
        last_good = self.target.last_good
        network_state = last_good.network_state()
        drift = last_good.drift(network_state, self.target.steps_since)
        self.update_ratio, self.norm_growth = drift.update_ratio, drift.norm_growth
        exceeded = drift.exceeded(self.max_update_ratio, self.max_norm_growth)
        if exceeded == "update":
            what = f"update ratio {self.update_ratio:.2g}"
            self._record(engine, "update", report, "rolling back", what)
            self._recover(engine, f"the weights moved {what} of their norm per step (max {self.max_update_ratio:.2g})")
            return False
        if exceeded == "norm_growth":
            what = f"the weights' norm grew {self.norm_growth:.2g} per step (max {self.max_norm_growth:.2g}, SGD)"
            self._record(engine, "norm_growth", report, "rolling back", what)
            self._recover(engine, what)
            return False
        self.learning.add(window.score_gap)
        mean_loss = window.mean_loss
        kept_loss = self.target.window_loss
        grew = kept_loss is not None and mean_loss > self.max_loss_growth * max(kept_loss, 1e-8)
        if window.clean and math.isfinite(mean_loss) and not grew and not self.learning.collapsed():
            self.target.keep(engine.state.iteration, network_state, mean_loss)
        elif self.learning.stalled():
            return self._stall(engine, report)
        return True

    def _recover(self, engine: Engine, why: str) -> None:
        """Roll back to the `RollbackTarget`'s origin and continue at the LR that works from there."""
        self.consecutive = self.consecutive_amp = 0
        if self.counters["rollbacks"] >= self.max_rollbacks:
            self._stop(engine, why)
            return
        origin = self.target.origin()
        decision = self._searched(engine, self.lr_policy.after_fault(engine, origin))
        found = (
            "no LR worked in a search from there: backed off" if decision.back_off else "an LR search there chose it"
        )
        self._restart(
            engine, origin, decision, f"after {why} the run rolled back to iteration {origin.iteration}; {found}"
        )
        logger.warning(
            f"guard: {why}; rolled back to the state after iteration {origin.iteration}, LR now "
            f"{self.lr_control.current_lr():.3g} (x{self.lr_control.scale:.3g} of the schedule; rollback "
            f"{self.counters['rollbacks']}/{self.max_rollbacks})"
        )

    def _check_lr(self, engine: Engine) -> None:
        """
        When the schedule reaches its peak, the LR check (`LRPolicy.check`): a run whose peak LR holds goes on
        untouched; one that does not restarts from its first state (the warm-up at too high an LR may have damaged
        the detector for good without any event).
        """
        first, start = self.target.origin(), self.lr_control.peak_lr()
        decision = self._searched(
            engine, self.lr_policy.check(engine, self._copy_of_now(engine), self._may_roll_back())
        )
        if decision.restart:
            why = f"the recipe's peak LR failed its trial at the end of the warm-up: {decision.search.summary()}"
            self._restart(engine, first, decision, f"{why}; the run restarted from iteration {first.iteration}")
            logger.warning(f"guard: LR {start:.3g} too high: restarted after iteration {first.iteration}")
        elif decision.search is not None and decision.search.changed:  # the search's line names another LR
            logger.warning(f"guard: LR check: the recipe's peak LR {start:.3g} is kept (it trains: it did not fail)")
        self.target.checked()

    def _stall(self, engine: Engine, report: StepReport) -> bool:
        """The detector stopped separating nodules from background; ``False`` when a smaller LR cured it."""
        self.counters["stalls"] += 1
        level = f"score gap {self.learning.level:.3g}, best {self.learning.best:.3g}"
        self._record(engine, "stall", report, "searching the LR", f"learning stalled ({level})")
        now, last_good = self._copy_of_now(engine), self.target.last_good
        decision = self._searched(engine, self.lr_policy.on_stall(engine, last_good, now, self._may_roll_back()))
        if decision.restart:
            why = f"the detector stopped learning ({level}) and a smaller LR learned better"
            self._restart(engine, last_good, decision, f"{why}; the run rolled back to iteration {last_good.iteration}")
            logger.warning(f"guard: back to iteration {last_good.iteration}, LR {self.lr_control.current_lr():.3g}")
            return False
        self.learning.rebase()  # a smaller LR does not do better: not the LR's doing, carry on from here
        return True

    def _grow(self, engine: Engine) -> None:
        """After a healthy stretch at a reduced LR: one step up, when it learns about as well (`LRPolicy.grow`)."""
        before = self.lr_control.used_lr()
        decision = self._searched(engine, self.lr_policy.grow(engine, self._copy_of_now(engine)))
        if decision.peak_lr is not None:
            why = "one step up learned about as well after a healthy stretch at the reduced LR"
            used = self.lr_control.used_lr()
            self.log.record_lr_change(engine.state.iteration, engine.state.epoch, before, used, why)

    def _may_roll_back(self) -> bool:
        return self.counters["rollbacks"] < self.max_rollbacks

    def _searched(self, engine: Engine, decision: LRDecision) -> LRDecision:
        """Count and log the search behind ``decision``."""
        if decision.search is not None:
            self.counters["lr_searches"] += 1
            self.log.record_search(engine.state.iteration, decision.search)
        return decision

    def _copy_of_now(self, engine: Engine) -> Snapshot:
        snapshot = self.target.last_good
        current = Snapshot(self.network, self.optimizer, snapshot.scaler, snapshot.lr_scheduler, snapshot.device)
        current.take(engine.state.iteration)
        return current

    def _restart(self, engine: Engine, origin: Snapshot, decision: LRDecision, why: str) -> None:
        """Roll back to ``origin``, then set the LR ``decision`` chose (recorded with ``why`` when it changed)."""
        before = self.lr_control.used_lr()
        self.target.rolled_back_to(origin)
        self.counters["rollbacks"] += 1
        self.log.record_rollback(engine.state.iteration, engine.state.epoch, origin.iteration, why)
        self.window.clear()  # the abandoned trajectory is forgotten
        self.steps_since_restore = 0
        self.learning.restart()
        self.lr_policy.apply(decision, engine.state.iteration)
        used = self.lr_control.used_lr()
        if not math.isclose(before, used, rel_tol=1e-9):
            self.log.record_lr_change(engine.state.iteration, engine.state.epoch, before, used, why)

    def _record(self, engine: Engine, kind: str, report: StepReport, action: str, what: str) -> None:
        self.counters["events"] += 1
        blame = self.blame.blame(report.bad_files, kind)  # an applied step (update, stall) blames no file
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
                lr=self.lr_control.current_lr(),
                files=blame.files,
                update_ratio=self.update_ratio if kind == "update" else None,
                norm_growth=self.norm_growth if kind == "norm_growth" else None,
                positive_score=report.positive_score,
            )
        )
        for file, reason in blame.quarantine:
            self.quarantine.add(file, reason, "guard")

    # ------------------------------------------------------------------------------------------------ the end
    def _stop(self, engine: Engine, why: str) -> None:
        last_good = self.target.last_good
        last_good.restore()
        self.lr_control.reapply()
        self.status = "stopped"
        self._say_lr()
        saved = self.log.save_checkpoint(last_good.host_state())
        self.message = (
            f"Training stopped by the stability guard at epoch {engine.state.epoch} iteration "
            f"{engine.state.iteration}: {why} after {self.counters['rollbacks']} rollbacks "
            f"(LR x{self.lr_control.scale:.3g})."
            + (f" The last good state (iteration {last_good.iteration}) is saved in {saved}." if saved else "")
            + f" Report: {self.log.report_path}. Try a lower learning_rate, a longer warm-up or a smaller "
            "grad_clip_norm, and run check_data on the files named in the report."
        )
        logger.error(self.message)
        self.write_report()
        engine.terminate()

    def completed(self, engine: Engine) -> None:
        """At the end of the run: did the detector learn, and had it a fair chance to? Write the report."""
        if self.status == "running":
            epoch_length = max(engine.state.epoch_length or 1, 1)
            warmup_epochs = math.ceil(self.lr_control.lr_scheduler.warmup_iters / epoch_length)
            self.verdict = judge_learning(self.validator, self.min_val_metric, warmup_epochs, self.judge_after_epochs)
            self.status = "completed" if self.verdict.learned is not False else "not_learned"
            if self.verdict.note:
                logger.warning(f"guard: {self.verdict.note}")
            self._say_lr()
            if self.verdict.learned is False:
                self.message = (
                    f"The detector did not learn: its best validation metric is {self.verdict.best:.4g} "
                    f"(min_val_metric {self.min_val_metric:g}) after {self.verdict.last_epoch} epochs, "
                    f"{self.counters['rollbacks']} rollbacks and {self.counters['lr_searches']} LR searches. The saved "
                    f"model detects nothing; see {self.log.report_path}. Check the data (check_data), the "
                    "learning_rate and the warm-up."
                )
                logger.error(self.message)
        self.write_report()

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        """Record the crash in the report (a `UserError` stops the run, with its line as the message) and save the last
        good state (the trainer re-raises the exception)."""
        if isinstance(e, UserError):
            self.status, self.message = "stopped", str(e)
        else:
            self.status = f"crashed: {type(e).__name__}: {e}"
        if self.target.last_good.state is not None:
            self.log.save_checkpoint(self.target.last_good.host_state())
        self.write_report()

    def _say_lr(self) -> None:
        """At the end: say plainly when the run trained at another LR than it was given."""
        summary = self.log.lr_summary(self.lr_control.asked_lr(), self.lr_control.used_lr())
        if summary:
            logger.warning(f"guard: {summary}")

    def raise_if_failed(self) -> None:
        """Exit non-zero with the message if the guard stopped the run or the detector did not learn."""
        if self.message is not None:
            raise GuardStopped(self.message)

    def write_report(self) -> str | None:
        """Write the JSON report (where ``report_path`` is set)."""
        lr = self.lr_control
        return self.log.write_report(
            {
                "status": self.status,
                "message": self.message,
                "iteration": self.iteration,
                "counters": dict(self.counters),
                "learning_rate": {
                    "asked": lr.asked_lr(),
                    "used": lr.used_lr(),
                    "summary": self.log.lr_summary(lr.asked_lr(), lr.used_lr()),
                    "changes": self.log.lr_changes,
                },
                "lr_scale": lr.scale,
                "lr": lr.current_lr(),
                "lr_ceiling": lr.ceiling,
                "snapshot_iteration": self.target.last_good.iteration,
                "score_gap": {"level": self.learning.level, "best": self.learning.best},
                "best_validation": best_validation(self.validator),
                "judged_from_epoch": self.verdict.judged_from_epoch,
                "note": self.verdict.note,
                "quarantined": [{"image": k, **v} for k, v in self.quarantine.entries.items()],
            }
        )

    def telemetry(self) -> dict[str, int | float]:
        """The guard's numbers for the monitor: counters, LR scale, last update ratio and norm growth, smoothed score
        gap."""
        return {
            **{k: self.counters[k] for k in ("events", "skipped_steps", "rollbacks", "amp_overflows")},
            "lr_scale": self.lr_control.scale,
            "update_ratio": self.update_ratio,
            "norm_growth": self.norm_growth,
            "score_gap_level": self.learning.level,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            **self.lr_policy.state_dict(),
            "blame": self.blame.state_dict(),
            "learning": self.learning.state_dict(),
            "log": self.log.state_dict(),
            **self.target.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = {**dict.fromkeys(COUNTERS, 0), **state["counters"]}
        self.lr_policy.load_state_dict(state)
        self.blame.load_state_dict(state["blame"])
        self.learning.load_state_dict(state["learning"])
        self.log.load_state_dict(state["log"])
        self.target.load_state_dict(state)
