"""Per-iteration training telemetry: loss parts, gradient norm, weight norm, LR, AMP scale and guard counters.

MONAI's `StatsHandler`/`TensorBoardStatsHandler` log one loss value; this handler logs everything the stability
policy looks at, to the console, TensorBoard, a CSV file (for figures), a tqdm progress bar, and MLflow when an
`MLFlowHandler` is attached to the same engine (``--tracking mlflow``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from scripts.detection.step_report import StepReport
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

__all__ = ["TrainingMonitor"]

logger = logging.getLogger(__name__)

REPORT_VALUES = ("loss", "loss_cls", "loss_reg", "grad_norm", "weight_norm", "lr", "amp_scale", "positive_score")
GUARD_VALUES = (
    "events",
    "skipped_steps",
    "rollbacks",
    "amp_overflows",
    "lr_scale",
    "update_ratio",
    "norm_growth",
    "score_gap_level",
)
COLUMNS = ("iteration", "epoch", *REPORT_VALUES, "score_gap", "event", *GUARD_VALUES)


class TrainingMonitor:
    """
    Logs the stabilised trainer's per-iteration `StepReport` and the guard's numbers (it reads no tensor itself, so
    it adds no host sync).

    Every iteration: scalars to TensorBoard (``train/<name>``), a row to ``csv_path``, the progress bar's postfix,
    and MLflow metrics (``train_<name>``) when an `MLFlowHandler` is attached to the trainer. Every ``log_every``
    iterations and at each refused step: one console line. Under DDP the configs attach it on rank 0 only.

    The monitor becomes the MLflow handler's ``iteration_logger``: the handler's default one expects MONAI's
    decollated list output and fails on this trainer's dict (``float()`` of a tuple inside MLflow).

    Args:
        log_dir: TensorBoard log directory (``None``: no TensorBoard).
        log_every: iterations between console lines (0: only events).
        csv_path: CSV file of the per-iteration values (``None``: none).
        progress: show a tqdm progress bar over each epoch's iterations.
        guard: the `StabilityGuard` whose counters, LR scale and update ratio are logged (``None``: none).
        output_transform: maps ``engine.state.output`` to the trainer's `StepReport`.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        log_every: int = 10,
        csv_path: str | None = None,
        progress: bool = True,
        guard: Any = None,
        output_transform: Callable[[Any], StepReport] = lambda x: x,
    ) -> None:
        self.guard = guard
        self.output_transform = output_transform
        self.log_dir = log_dir
        self.log_every = log_every
        self.csv_path = csv_path
        self.progress = progress
        self.writer: SummaryWriter | None = None
        self.bar: tqdm | None = None
        self._csv_file: Any = None
        self._csv: Any = None
        self._mlflow: MLFlowHandler | None = None
        self._scalars: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Register with the trainer."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.close)
        engine.add_event_handler(Events.TERMINATE, self.close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, e: self.close(engine))

    def started(self, engine: Engine) -> None:
        self._mlflow = self._find_mlflow(engine)
        if self._mlflow is not None:
            self._mlflow.iteration_logger = self._log_mlflow
        if self.log_dir and self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        if self.csv_path and self._csv is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.csv_path)), exist_ok=True)
            resume = engine.state.iteration > 0 and os.path.exists(self.csv_path)
            self._csv_file = open(self.csv_path, "a" if resume else "w", newline="")
            self._csv = csv.writer(self._csv_file)
            if not resume:
                self._csv.writerow(COLUMNS)

    def epoch_started(self, engine: Engine) -> None:
        if self.progress:
            self.bar = tqdm(
                total=engine.state.epoch_length, desc=f"epoch {engine.state.epoch}/{engine.state.max_epochs}"
            )

    def _find_mlflow(self, engine: Engine) -> MLFlowHandler | None:
        for handler, _, _ in engine._event_handlers.get(Events.STARTED, []):
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, MLFlowHandler):
                return owner
        return None

    def values(self, engine: Engine) -> dict[str, Any]:
        """The values of the iteration that just completed, named as the CSV columns."""
        report = self.output_transform(engine.state.output)
        guard = self.guard.telemetry() if self.guard is not None else {}
        return {
            "iteration": engine.state.iteration,
            "epoch": engine.state.epoch,
            **{k: float(getattr(report, k)) for k in REPORT_VALUES},
            "score_gap": report.score_gap,
            "event": report.event or "",
            **{k: guard.get(k, math.nan) for k in GUARD_VALUES},
        }

    def iteration_completed(self, engine: Engine) -> None:
        values = self.values(engine)
        scalars = {k: v for k, v in values.items() if k not in ("iteration", "epoch", "event")}
        scalars["event"] = float(bool(values["event"]))
        step = values["iteration"]
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self._csv is not None:
            self._csv.writerow([values[c] for c in COLUMNS])
        self._scalars = scalars
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{values['loss']:.4g}", gnorm=f"{values['grad_norm']:.3g}", lr=f"{values['lr']:.3g}"
            )
            self.bar.update(1)
        if values["event"] or (self.log_every and step % self.log_every == 0):
            gap = values["score_gap"]
            # a batch whose crops hold no nodule has no positive anchor to score: no gap, and nothing wrong
            gap = f"{gap:.3g}" if math.isfinite(gap) else "-" if values["event"] else "- (no nodule in the batch)"
            line = (
                f"epoch {values['epoch']} it {step}: loss {values['loss']:.4g} (cls {values['loss_cls']:.4g}, "
                f"reg {values['loss_reg']:.4g}) grad norm {values['grad_norm']:.4g} "
                f"weight norm {values['weight_norm']:.4g} lr {values['lr']:.3g} amp scale {values['amp_scale']:.3g} "
                f"score gap {gap}"
            )
            if self.guard is not None:
                line += (
                    f" guard events {values['events']:.0f} skipped {values['skipped_steps']:.0f} "
                    f"rollbacks {values['rollbacks']:.0f}"
                )
            (logger.warning if values["event"] else logger.info)(
                line + (f" [{values['event']}]" if values["event"] else "")
            )

    def _log_mlflow(self, engine: Engine) -> None:
        """The MLflow handler's iteration logger: this iteration's scalars, as ``train_<name>``."""
        if self._mlflow is not None and self._mlflow.cur_run:
            metrics = {f"train_{k}": v for k, v in self._scalars.items() if math.isfinite(v)}
            self._mlflow._log_metrics(metrics, step=engine.state.iteration)

    def epoch_completed(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._csv_file is not None:
            self._csv_file.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self, engine: Engine | None = None) -> None:
        """Close the progress bar, the CSV file and the TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file, self._csv = None, None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
