"""The NaN guard: the policy that turns non-finite training events into skips, rollbacks, LR backoff, quarantine
and, when recovery is hopeless, a clean stop with a report.

Ignite's `TerminateOnNan` only stops a run and AMP's GradScaler only skips fp16 overflow steps; nothing in
MONAI, ignite or torch restores a last good state and carries on, hence this handler.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import deque
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.distributed import gather_lists, is_rank0
from scripts.json_io import write_json
from scripts.quarantine import Quarantine

__all__ = ["NaNGuard", "scale_lr", "GuardStopped"]

logger = logging.getLogger(__name__)


class GuardStopped(SystemExit):
    """Raised by `NaNGuard.raise_if_stopped` after a clean stop: a non-zero exit with one clear message."""


def _to_host(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor cloned to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


def scale_lr(optimizer: torch.optim.Optimizer, lr_scheduler: Any, factor: float) -> None:
    """Multiply the learning rate by ``factor`` for good: in the optimiser and in every (chained) scheduler."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    schedulers = [lr_scheduler, *getattr(lr_scheduler, "_schedulers", [])] if lr_scheduler is not None else []
    for sched in schedulers:
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * factor for b in sched.base_lrs]
        if hasattr(sched, "eta_min"):
            sched.eta_min *= factor
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def _weights_finite(network: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``network`` is finite (one host sync)."""
    tensors = [*network.parameters(), *network.buffers()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all())


class NaNGuard:
    """
    Owns the stability policy of a `StabilisedDetectionTrainer` (which refuses non-finite steps and reports them in
    ``engine.state.output["event"]``):

    - keeps a last-good snapshot (network, optimiser, GradScaler, LR scheduler) in host memory, refreshed every
      ``snapshot_every`` iterations while training is healthy: no event in the window, finite weights, and a mean
      loss no more than ``max_loss_growth`` times that of the previous snapshot's window;
    - at each refresh measures the update ratio, how far the weights moved since the snapshot relative to their
      norm, per optimiser step: ``||w - w_snapshot|| / ||w_snapshot|| / steps``. An LR ten times too high moves
      them by several percent per step while loss and gradients stay finite (healthy runs measured 5e-4 to 3e-3),
      so a ratio above ``max_update_ratio`` is an ``update`` event that rolls back at once;
    - after ``patience`` consecutive events, or at once when the weights are non-finite, restores the snapshot
      and multiplies the LR by ``lr_backoff``;
    - records every event (iteration, epoch, kind, loss parts, grad norm, LR, files) and quarantines an image
      file after ``quarantine_after`` events in which it took part: at once for non-finite voxels, otherwise only
      if, seen at least 4 times, it failed in at least 3/4 of its iterations and twice as often as the iterations
      without it (so an LR blow-up, which fails every file alike, quarantines none);
    - after ``max_rollbacks`` rollbacks, restores the snapshot, saves it to ``ckpt_path``, writes the report and
      terminates the engine; `raise_if_stopped` then exits non-zero with one message;
    - under AMP, an fp16 overflow that the GradScaler absorbs is counted, not escalated, unless it repeats
      ``amp_overflow_patience`` times in a row.

    Its counters, LR scale, event log and file statistics are in `state_dict` (saved with the checkpoint).

    Args:
        network: the trained network.
        optimizer: its optimiser.
        lr_scheduler: the LR scheduler (or ``None``).
        enabled: ``False`` attaches nothing (the trainer then behaves like the model-zoo trainer).
        patience: consecutive events that trigger a rollback.
        lr_backoff: LR factor applied at each rollback.
        max_rollbacks: rollbacks allowed before the run is stopped.
        snapshot_every: iterations between snapshot refreshes.
        quarantine_after: events a file must take part in before it is quarantined (0 disables quarantine).
        max_loss_growth: a loss above this factor times the median of the last ``snapshot_every`` healthy losses
            (at least 1) is refused as a ``loss`` event, and a window whose mean loss grew more than this factor
            is not snapshotted.
        max_update_ratio: the update ratio above which the run rolls back (0 disables the check).
        amp_overflow_patience: consecutive AMP overflows counted as one grad event.
        quarantine: the shared quarantine record (data QA writes to it as well).
        report_path: JSON report written at the end of the run (or at the stop).
        ckpt_path: where the last good state is saved when the run is stopped.
        max_logged_events: events kept in the report (the counters count them all).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        enabled: bool = True,
        patience: int = 3,
        lr_backoff: float = 0.1,
        max_rollbacks: int = 8,
        snapshot_every: int = 10,
        quarantine_after: int = 2,
        max_loss_growth: float = 10.0,
        max_update_ratio: float = 0.02,
        amp_overflow_patience: int = 20,
        quarantine: Quarantine | None = None,
        report_path: str | None = None,
        ckpt_path: str | None = None,
        max_logged_events: int = 1000,
    ) -> None:
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.enabled = enabled
        self.patience = patience
        self.lr_backoff = lr_backoff
        self.max_rollbacks = max_rollbacks
        self.snapshot_every = snapshot_every
        self.quarantine_after = quarantine_after
        self.max_loss_growth = max_loss_growth
        self.max_update_ratio = max_update_ratio
        self.amp_overflow_patience = amp_overflow_patience
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self.report_path = report_path
        self.ckpt_path = ckpt_path
        self.max_logged_events = max_logged_events
        self.write_files = True  # False on DDP ranks other than 0
        self.scaler: torch.amp.GradScaler | None = None
        self.snapshot: dict[str, Any] | None = None
        self.stop_message: str | None = None
        self._window: list[float] = []
        self._recent: deque[float] = deque(maxlen=snapshot_every)  # losses of the last stepped iterations
        self._window_clean = True
        self.reset()

    def reset(self) -> None:
        """Clear the counters and the event log."""
        self.counters = {"events": 0, "skipped_steps": 0, "rollbacks": 0, "amp_overflows": 0, "weights_nonfinite": 0}
        self.consecutive = 0
        self.consecutive_amp = 0
        self.lr_scale = 1.0
        self.events: list[dict[str, Any]] = []
        self.file_stats: dict[str, list[int]] = {}  # file -> [events, times seen]
        self.iterations = 0
        self.snapshot_iteration = 0
        self.snapshot_lr_scale = 1.0
        self.snapshot_loss: float | None = None
        self.steps_since_snapshot = 0
        self.update_ratio = math.nan  # the last measured one
        self.status = "running"

    def attach(self, engine: Engine) -> None:
        """Register the guard with the trainer (nothing when disabled)."""
        if not self.enabled:
            return
        self.write_files = is_rank0()
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        engine.state.guard = self

    # ---------------------------------------------------------------- snapshots
    def take_snapshot(self, engine: Engine, network_state: dict[str, torch.Tensor] | None = None) -> None:
        """Copy network (unless its host copy is given), optimiser, scaler and scheduler state to host memory."""
        self.scaler = getattr(engine, "scaler", None)
        self.snapshot = _to_host(
            {
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            }
        )
        self.snapshot["network"] = network_state if network_state is not None else _to_host(self.network.state_dict())
        self.snapshot_iteration = engine.state.iteration
        self.snapshot_lr_scale = self.lr_scale
        self.steps_since_snapshot = 0

    def restore_snapshot(self) -> None:
        """Load the last good state back (exactly: parameters, buffers, optimiser, scaler, scheduler)."""
        assert self.snapshot is not None, "no snapshot to restore"
        self.network.load_state_dict(self.snapshot["network"])
        self.optimizer.load_state_dict(copy.deepcopy(self.snapshot["optimizer"]))
        if self.scaler is not None and self.snapshot["scaler"] is not None:
            self.scaler.load_state_dict(self.snapshot["scaler"])
        if self.lr_scheduler is not None and self.snapshot["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(copy.deepcopy(self.snapshot["lr_scheduler"]))
        self.steps_since_snapshot = 0

    def iteration_started(self, engine: Engine) -> None:
        """Take the first snapshot, and give the trainer this iteration's loss-spike limit."""
        if self.snapshot is None:
            self.take_snapshot(engine)
        # a loss spike (``max_loss_growth`` times the median of the recent healthy losses, at least 1) is refused
        recent = sorted(self._recent)
        engine.loss_limit = self.max_loss_growth * max(recent[len(recent) // 2], 1.0) if recent else math.inf

    def _update_ratio(self, network_state: dict[str, torch.Tensor]) -> float:
        """``||w - w_snapshot|| / ||w_snapshot||`` over the trained parameters, per step since the snapshot."""
        assert self.snapshot is not None
        old = self.snapshot["network"]
        names = [n for n, p in self.network.named_parameters() if p.requires_grad]
        moved = torch.nn.utils.get_total_norm([network_state[n].float() - old[n].float() for n in names])
        norm = torch.nn.utils.get_total_norm([old[n].float() for n in names])
        return float(moved / norm.clamp_min(1e-12)) / max(self.steps_since_snapshot, 1)

    def _maybe_refresh_snapshot(self, engine: Engine, out: dict[str, Any]) -> None:
        self._window.append(out["loss"])
        if len(self._window) < self.snapshot_every:
            return
        mean = sum(self._window) / len(self._window)
        healthy = self._window_clean and math.isfinite(mean)
        if healthy and self.snapshot_loss is not None:
            healthy = mean <= self.max_loss_growth * max(self.snapshot_loss, 1e-8)
        self._window, self._window_clean = [], True
        if not _weights_finite(self.network):
            return
        network_state = _to_host(self.network.state_dict())
        self.update_ratio = self._update_ratio(network_state)
        if self.max_update_ratio and self.update_ratio > self.max_update_ratio:
            self.counters["events"] += 1
            self._record(engine, "update", out)
            self._rollback(
                engine,
                f"the weights moved {self.update_ratio:.2g} of their norm per step over the last "
                f"{self.steps_since_snapshot} steps (max_update_ratio {self.max_update_ratio:.2g})",
            )
        elif healthy:
            self.take_snapshot(engine, network_state)
            self.snapshot_loss = mean

    # ---------------------------------------------------------------- the policy
    def iteration_completed(self, engine: Engine) -> None:
        """Act on the trainer's report of the iteration."""
        out = engine.state.output
        files = [os.path.abspath(f) for f in out.get("files", []) if f]
        self.iterations += 1
        for f in set(files):
            self.file_stats.setdefault(f, [0, 0])[1] += 1
        event = out.get("event")
        if event is None:
            self.consecutive = 0
            self.consecutive_amp = 0
            self.steps_since_snapshot += 1
            self._recent.append(out["loss"])
            self._maybe_refresh_snapshot(engine, out)
            return
        self.counters["skipped_steps"] += 1
        self._window_clean = False
        if out.get("amp_overflow"):
            self.counters["amp_overflows"] += 1
            self.consecutive_amp += 1
            if self.consecutive_amp < self.amp_overflow_patience:
                return
        self.counters["events"] += 1
        self.consecutive += 1
        weights_ok = _weights_finite(self.network)
        kind = event if weights_ok else "weights"
        self._record(engine, kind, out)
        if not weights_ok:
            self.counters["weights_nonfinite"] += 1
            self._rollback(engine, "the weights became non-finite")
        elif self.consecutive >= self.patience:
            self._rollback(engine, f"{self.consecutive} consecutive refused steps")

    def _record(self, engine: Engine, kind: str, out: dict[str, Any]) -> None:
        local_files = sorted({os.path.abspath(f) for f in out.get("bad_files", []) if f})
        candidates = []
        for f in local_files:
            stats = self.file_stats.setdefault(f, [0, 1])
            stats[0] += 1
            if (
                self.quarantine_after
                and stats[0] >= self.quarantine_after
                and (kind == "input" or self._stands_out(stats))
            ):
                candidates.append((f, f"{stats[0]} non-finite events in {stats[1]} iterations (last: {kind})"))
        # every rank records the same event: merge the files and the quarantine decisions of all ranks
        bad_files, candidates = gather_lists(local_files, candidates)
        bad_files = sorted(set(bad_files))
        entry = {
            "iteration": engine.state.iteration,
            "epoch": engine.state.epoch,
            "kind": kind,
            "loss": out.get("loss"),
            "loss_cls": out.get("loss_cls"),
            "loss_reg": out.get("loss_reg"),
            "grad_norm": out.get("grad_norm"),
            "update_ratio": self.update_ratio if kind == "update" else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "files": bad_files,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if len(self.events) < self.max_logged_events:
            self.events.append(entry)
        if self.write_files:
            if kind == "update":
                what, action = f"update ratio {self.update_ratio:.2g}", "rolling back"
            elif kind == "loss" and math.isfinite(entry["loss"]):
                what, action = f"loss spike (above {engine.loss_limit:.3g})", "step skipped"
            else:
                what, action = f"non-finite {kind}", "step skipped"
            logger.warning(
                f"guard: {what} at epoch {entry['epoch']} iteration {entry['iteration']} "
                f"(loss {entry['loss']:.4g}, grad norm {entry['grad_norm']:.4g}, lr {entry['lr']:.3g}); {action}; "
                f"files: {', '.join(os.path.basename(f) for f in bad_files) or '-'}"
            )
        for f, reason in candidates:
            self.quarantine.add(f, reason, "guard")

    def _stands_out(self, stats: list[int]) -> bool:
        """Whether a file seen 4+ times fails in 3/4 of its iterations and twice as often as iterations without it."""
        events, seen = stats
        others = (self.counters["events"] - events) / max(self.iterations - seen, 1)
        return seen >= 4 and 4 * events >= 3 * seen and events / seen >= 2 * others

    def _rollback(self, engine: Engine, why: str) -> None:
        self.consecutive = 0
        self.consecutive_amp = 0
        if self.counters["rollbacks"] >= self.max_rollbacks:
            self._stop(engine, why)
            return
        self.restore_snapshot()
        self._recent.clear()
        self.lr_scale *= self.lr_backoff
        # the snapshot holds the LR of its time: bring it to the new cumulative scale
        scale_lr(self.optimizer, self.lr_scheduler, self.lr_scale / self.snapshot_lr_scale)
        self.counters["rollbacks"] += 1
        self._window, self._window_clean = [], True
        logger.warning(
            f"guard: {why}; rolled back to the snapshot of iteration {self.snapshot_iteration} and scaled the LR "
            f"by {self.lr_backoff} (now {self.optimizer.param_groups[0]['lr']:.3g}, "
            f"rollback {self.counters['rollbacks']}/{self.max_rollbacks})"
        )

    def _stop(self, engine: Engine, why: str) -> None:
        self.restore_snapshot()
        self.status = "stopped"
        saved = ""
        if self.ckpt_path and self.write_files:
            os.makedirs(os.path.dirname(os.path.abspath(self.ckpt_path)), exist_ok=True)
            torch.save(self.snapshot, self.ckpt_path)
            saved = f" The last good state (iteration {self.snapshot_iteration}) is saved in {self.ckpt_path}."
        self.stop_message = (
            f"Training stopped by the NaN guard at epoch {engine.state.epoch} iteration {engine.state.iteration}: "
            f"{why} after {self.counters['rollbacks']} rollbacks (LR scaled by {self.lr_scale:.3g})."
            f"{saved} Report: {self.report_path}. Try a lower learning_rate, a longer warm-up or a smaller "
            f"grad_clip_norm, and run check_data on the files named in the report."
        )
        logger.error(self.stop_message)
        self.write_report(engine)
        engine.terminate()

    def raise_if_stopped(self) -> None:
        """Exit non-zero with the stop message if the guard stopped the run (the last step of the ``training`` run)."""
        if self.stop_message is not None:
            raise GuardStopped(self.stop_message)

    # ---------------------------------------------------------------- reporting
    def completed(self, engine: Engine) -> None:
        if self.status == "running":
            self.status = "completed"
        self.write_report(engine)

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        """Record the crash in the report (the trainer re-raises the exception)."""
        self.status = f"crashed: {type(e).__name__}: {e}"
        self.write_report(engine)

    def report(self) -> dict[str, Any]:
        """Everything the guard knows, as a JSON-able dict."""
        return {
            "status": self.status,
            "message": self.stop_message,
            "counters": dict(self.counters),
            "lr_scale": self.lr_scale,
            "lr": self.optimizer.param_groups[0]["lr"],
            "snapshot_iteration": self.snapshot_iteration,
            "settings": {
                k: getattr(self, k)
                for k in (
                    "patience",
                    "lr_backoff",
                    "max_rollbacks",
                    "snapshot_every",
                    "quarantine_after",
                    "max_loss_growth",
                    "max_update_ratio",
                )
            },
            "quarantined": [{"image": k, **v} for k, v in self.quarantine.entries.items()],
            "events": self.events,
        }

    def write_report(self, engine: Engine | None = None) -> None:
        """Write `report` to ``report_path`` (rank 0 only)."""
        if not (self.report_path and self.write_files):
            return
        write_json(self.report_path, self.report(), default=str)

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "lr_scale": self.lr_scale,
            "events": list(self.events),
            "file_stats": {k: list(v) for k, v in self.file_stats.items()},
            "iterations": self.iterations,
            "snapshot_loss": self.snapshot_loss,
            "quarantine": self.quarantine.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = dict(state["counters"])
        self.lr_scale = float(state["lr_scale"])
        self.events = list(state["events"])
        self.file_stats = {k: list(v) for k, v in state["file_stats"].items()}
        self.iterations = int(state.get("iterations", 0))
        self.snapshot_loss = state["snapshot_loss"]
        self.quarantine.load_state_dict(state["quarantine"])
