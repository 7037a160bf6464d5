"""The clip-grad training iteration of RetinaNet 3D, with one fused finiteness decision per step.

MONAI's `SupervisedTrainer` assumes one tensor in and a loss function; the detector takes lists of images and
targets and computes its own losses, so the iteration is written here (as the model zoo does), with the
stabilised step: forward under autocast, weighted loss, backward, unscale, global gradient-norm clipping, and an
optimiser step only when the whole iteration was finite. Each iteration ends with one `StepReport`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.handlers import StatsHandler
from monai.inferers import Inferer, SimpleInferer
from scripts.data.quarantine import image_path
from scripts.detection.detector import ANCHOR_SCORE_NAMES, ANCHOR_SCORES, HEADS_FINITE
from scripts.detection.precision import autocast_type, precision_name
from scripts.detection.step_report import EVENT_KINDS, StepReport, read_to_host
from scripts.distributed import is_distributed
from scripts.errors import UserError
from torch.utils.data import DataLoader

__all__ = ["DetectionBatch", "StabilisedDetectionTrainer", "detection_prepare_batch"]

logger = logging.getLogger(__name__)


class DetectionBatch(NamedTuple):
    """The detector's inputs for one step: images, targets (``box``, ``label``) and each crop's file."""

    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]
    files: list[str]


def detection_prepare_batch(
    batchdata: list, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> DetectionBatch:
    """
    Flatten a batch of cropped samples (a list per image, as `RandCropBoxByPosNegLabeld` makes them with
    `no_collation`) into the detector's inputs.
    """
    samples = [s for item in batchdata for s in (item if isinstance(item, (list, tuple)) else [item])]
    images = [s["image"].to(device=device, non_blocking=non_blocking, **kwargs) for s in samples]
    targets = [
        {k: s[k].to(device=device, non_blocking=non_blocking, **kwargs) for k in ("box", "label")} for s in samples
    ]
    files = [image_path(s["image"]) for s in samples]
    return DetectionBatch(images, targets, files)


class StepLosses(NamedTuple):
    """One step's losses on the device, and whether the heads ran (``False``: they raised ``NaN or Inf``)."""

    loss: torch.Tensor
    loss_cls: torch.Tensor
    loss_reg: torch.Tensor
    anchor_scores: dict[str, torch.Tensor]
    heads_finite: torch.Tensor | None  # the sync-free detector's own finiteness flag (MONAI's heads raise instead)
    ran: bool


def _ratio(total: float, count: float) -> float:
    return total / count if count else math.nan


class StabilisedDetectionTrainer(Trainer):
    """
    Trains a `RetinaNetDetector` with the stabilised step and reports every iteration as a `StepReport` in
    ``engine.state.output``.

    The finiteness of the input, the heads' ``NaN or Inf`` ValueError, the loss (and the loss-spike limit set with
    `set_loss_limit`) and the gradient norm are decided on device tensors that, with the telemetry of the step,
    reach the host in one read. A refused step leaves parameters, buffers, optimiser state and GradScaler exactly as
    they were (under AMP an fp16 gradient overflow still halves the loss scale, the scaler's own remedy).

    Under DDP (an initialised process group) the trainer does the data-parallel synchronisation itself: ranks start
    from rank 0's weights, and one all-reduce per step averages gradients and BatchNorm statistics together with the
    event flags, so every rank takes the same decision. Torch's `DistributedDataParallel` wrapper cannot be used
    here: when the heads raise on one rank only, its reducer is left mid-iteration (the processes abort at exit)
    and the other ranks would block in backward.

    Args:
        device: the device to train on.
        max_epochs: number of epochs.
        train_data_loader: loader yielding lists of crop lists (``no_collation``).
        detector: the detector (`scripts.detection.detector.RetinaNetDetector`); its ``network`` is what is optimised.
        inferer: runs the detector's training forward, ``inferer(images, detector, targets)`` -> losses (MONAI's
            `SimpleInferer` by default, as in `SupervisedTrainer`).
        optimizer: optimiser over the network's parameters.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        w_cls: weight of the classification loss.
        w_reg: weight of the box-regression loss.
        grad_clip_norm: clip the global gradient L2 norm to this value (``None`` or 0: no clipping).
        skip_nonfinite: refuse non-finite steps and report them (``False``: behave like the model-zoo trainer,
            where the heads' ValueError ends the run and every step is applied).
        amp: mixed precision, in the type `scripts.detection.precision.autocast_type` gives: fp16 autocast on CUDA
            (with ``scaler``), bf16 on a CPU with bf16 instructions, none (fp32) on other CPUs.
        amp_dtype: the autocast type on CUDA instead (``"float16"`` or ``"bfloat16"``; bf16 needs no GradScaler and
            cannot overflow the way fp16 does); ``None``: as ``amp`` says.
        scaler: the GradScaler of fp16 training (``None``: none; give one when ``amp`` is on and the device is CUDA).
        train_handlers: ignite handlers with ``attach(engine)``.
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: turns a loader batch into a `DetectionBatch`.
        key_train_metric, additional_metrics, metric_cmp_fn, event_names, event_to_attr:
            as in MONAI's `Trainer`.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        detector: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        inferer: Inferer | None = None,
        epoch_length: int | None = None,
        w_cls: float = 1.0,
        w_reg: float = 1.0,
        grad_clip_norm: float | None = 10.0,
        skip_nonfinite: bool = True,
        amp: bool = False,
        amp_dtype: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        train_handlers: Sequence | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = detection_prepare_batch,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
    ) -> None:
        device = torch.device(device)
        extra = {"metric_cmp_fn": metric_cmp_fn} if metric_cmp_fn is not None else {}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            **extra,
        )
        self.detector = detector
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.network = detector.network
        self.optimizer = optimizer
        self.w_cls = w_cls
        self.w_reg = w_reg
        self.grad_clip_norm = grad_clip_norm if grad_clip_norm else None
        self.skip_nonfinite = skip_nonfinite
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.buffers = list(self.network.buffers())
        self.autocast_type = autocast_type(device, amp, amp_dtype)
        # MONAI's Trainer.run makes a new scaler per run, which would lose its state on resume: it is given instead
        self.scaler = scaler if amp else None
        self.loss_limit = math.inf
        self.world_size = 1
        self._handled: BaseException | None = None  # the exception whose handlers have run
        self.add_event_handler(Events.STARTED, lambda engine: engine._broadcast_state())
        self.add_event_handler(
            Events.STARTED,
            lambda engine: logger.info(f"training in {precision_name(engine.autocast_type, amp, device)}"),
        )

    def run(self) -> None:  # type: ignore[override]
        """Run training with the GradScaler given at construction."""
        super(Trainer, self).run()

    def set_loss_limit(self, limit: float) -> None:
        """Refuse, as a ``loss`` event, any step whose loss exceeds ``limit`` (``math.inf``: no limit)."""
        self.loss_limit = float(limit)

    def _handle_exception(self, e: BaseException) -> None:
        """
        Give every ``EXCEPTION_RAISED`` handler its turn (report, final checkpoint), then re-raise.

        MONAI's handlers re-raise the exception from their own ``EXCEPTION_RAISED`` handler, so ignite would stop at
        the first of them and the handlers attached later (the checkpoint saver) would never save anything. Ignite
        hands an exception over twice (from the epoch's loop, then from the run's): the handlers run once. A
        `UserError` (the inputs' problem, ended by its one line) skips the traceback `StatsHandler` logs for a crash.
        """
        if e is self._handled:
            raise e
        self._handled = e
        for func, args, kwargs in list(self._event_handlers.get(Events.EXCEPTION_RAISED, [])):
            if isinstance(e, UserError) and isinstance(getattr(func, "__self__", None), StatsHandler):
                continue
            first, rest = ((args[0](),), args[1:]) if args and isinstance(args[0], weakref.ref) else ((), args)
            try:
                func(*first, e, *rest, **kwargs)
            # B036 asks for a re-raise in the handler: ``e`` is raised after the loop, once every handler had its turn.
            except BaseException as raised:  # noqa: B036 (the re-raise of ``e``, or a handler's own failure)
                if raised is not e:
                    logger.exception(f"an EXCEPTION_RAISED handler failed while handling {type(e).__name__}")
        raise e

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_type is None:
            return contextlib.nullcontext()
        return torch.autocast(self.state.device.type, dtype=self.autocast_type)

    def _forward_loss(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor] | None:
        """Detector losses under autocast, or ``None`` when a head raised its ``NaN or Inf`` ValueError."""
        try:
            with self._autocast():
                return self.inferer(images, self.detector, targets)
        except ValueError as e:
            if self.skip_nonfinite and "NaN or Inf" in str(e):
                return None
            raise

    def _iteration(self, engine: StabilisedDetectionTrainer, batchdata: list) -> StepReport:
        """One stabilised step; see the class docstring."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        return engine.train_step(batchdata)

    def train_step(self, batchdata: list, fire_events: bool = True) -> StepReport:
        """
        The stabilised step on one loader batch. ``fire_events=False`` runs it without MONAI's iteration events
        (``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``): the trial steps of an LR search are not iterations of the run.
        """
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking)
        self.detector.train()
        self.optimizer.zero_grad(set_to_none=True)
        saved_buffers = [b.clone() for b in self.buffers] if self.skip_nonfinite else []
        # 1. forward and backward. The losses are scripts/detection/sync_free_losses.py's when the detector was built
        # with sync_free=True (train.json's default: `RetinaNetDetector.set_sync_free`), MONAI's otherwise
        losses = self._forward_backward(batch, fire_events)
        # 2. every number the decision needs, on device, read to the host at once (the step's one sync point)
        finite_images = torch.stack([torch.isfinite(x).all() for x in batch.images])
        host = self._read_step(losses, finite_images)
        value = {name: v[0] for name, v in host.items() if name != "bad_images"}
        # 3. the decision: the first event kind that occurred, or none
        event = self._decide(value)
        # 4. the optimiser steps, or the step is refused and the state left as it was
        if event is None:
            self._step(grads_finite=math.isfinite(value["grad_norm"]))
        else:
            self._refuse_step(event, unscaled=losses.ran)
            with torch.no_grad():
                for b, s in zip(self.buffers, saved_buffers, strict=True):
                    b.copy_(s)
        self.optimizer.zero_grad(set_to_none=True)
        # 5. the report
        if event == "input":
            bad_files = [f for f, bad in zip(batch.files, host["bad_images"], strict=True) if bad]
        else:
            bad_files = list(batch.files) if event else []
        return self._report(value, event, batch.files, bad_files)

    def _forward_backward(self, batch: DetectionBatch, fire_events: bool) -> StepLosses:
        """The detector's losses (NaN when a head raised) and their backward pass, with MONAI's iteration events."""
        device = self.state.device
        losses = self._forward_loss(batch.images, batch.targets)
        if losses is None:
            nan = torch.full((), math.nan, device=device)  # a fill, not a copy from the host (a sync on a GPU)
            scores = {k: torch.zeros((), device=device) for k in ANCHOR_SCORE_NAMES}
            return StepLosses(loss=nan, loss_cls=nan, loss_reg=nan, anchor_scores=scores, heads_finite=None, ran=False)
        # MONAI returns the box loss of a batch without box samples as a CPU tensor: bring both to the device
        loss_cls = losses[self.detector.cls_key].to(device)
        loss_reg = losses[self.detector.box_reg_key].to(device)
        scores = {k: v.to(device) for k, v in losses[ANCHOR_SCORES].items()}
        loss = self.w_cls * loss_cls + self.w_reg * loss_reg
        if fire_events:
            self.state.output = {"loss": loss}  # what MONAI's iteration events expect to find
            self.fire_event(IterationEvents.LOSS_COMPLETED)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if fire_events:
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        return StepLosses(
            loss=loss,
            loss_cls=loss_cls,
            loss_reg=loss_reg,
            anchor_scores=scores,
            heads_finite=losses.get(HEADS_FINITE),
            ran=True,
        )

    def _read_step(self, losses: StepLosses, finite_images: torch.Tensor) -> dict[str, list[float]]:
        """
        The step's flags, losses, anchor scores and norms (summed over the DDP ranks where they are shared), read to
        the host in one read, by name (each a list; ``bad_images`` one flag per image).
        """
        device = self.state.device
        shared = {  # summed over the DDP ranks (flags: any rank)
            "bad_input": (~finite_images.all()).float(),
            "logits_failed": self._heads_failed(losses, device),
            "bad_loss": (~losses.loss.isfinite() | (losses.loss.detach() > self.loss_limit)).float(),
            "loss": losses.loss.detach().float(),
            "loss_cls": losses.loss_cls.detach().float(),
            "loss_reg": losses.loss_reg.detach().float(),
            **losses.anchor_scores,
        }
        if self.world_size > 1:
            shared = self._all_reduce(shared)
        grad_norm = self._unscale_and_clip(unscaled=losses.ran)
        return read_to_host(
            {
                **shared,
                "grad_norm": grad_norm,
                "weight_norm": torch.nn.utils.get_total_norm([p.detach() for p in self.params]),
                "amp_scale": self._loss_scale(),
                "bad_images": ~finite_images,
            }
        )

    def _decide(self, value: dict[str, float]) -> str | None:
        """The step's event (`EVENT_KINDS` in order) or ``None``; without ``skip_nonfinite``, as MONAI would."""
        flags = {
            "input": value["bad_input"],
            "logits": value["logits_failed"],
            "loss": value["bad_loss"],
            "grad": not math.isfinite(value["grad_norm"]),
        }
        if flags["logits"] and not self.skip_nonfinite:
            raise ValueError("cls_logits is NaN or Inf.")  # what MONAI's heads raise, read with the rest here
        return next((kind for kind in EVENT_KINDS if flags[kind]), None) if self.skip_nonfinite else None

    def _report(self, value: dict[str, float], event: str | None, files: list[str], bad_files: list[str]) -> StepReport:
        return StepReport(
            loss=value["loss"] / self.world_size,
            loss_cls=value["loss_cls"] / self.world_size,
            loss_reg=value["loss_reg"] / self.world_size,
            grad_norm=value["grad_norm"],
            weight_norm=value["weight_norm"],
            amp_scale=value["amp_scale"],
            lr=self.optimizer.param_groups[0]["lr"],
            positive_score=_ratio(value["positive_sum"], value["positive_count"]),
            negative_score=_ratio(value["negative_sum"], value["negative_count"]),
            event=event,
            amp_overflow=event == "grad" and self.scaler is not None,
            files=tuple(files),
            bad_files=tuple(bad_files),
        )

    @staticmethod
    def _heads_failed(losses: StepLosses, device: torch.device) -> torch.Tensor:
        """1.0 where a head output was not finite: the heads raised (MONAI's path), or the sync-free detector said."""
        if losses.heads_finite is not None:
            return (~losses.heads_finite).float()
        return torch.full((), float(not losses.ran), device=device)

    def _unscale_and_clip(self, unscaled: bool) -> torch.Tensor:
        """The global gradient norm before clipping (NaN when no gradient exists); clips when asked to."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.full((), math.nan, device=self.state.device)
        if self.scaler and unscaled:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip_norm, grad_norm)
        return grad_norm

    def _loss_scale(self) -> torch.Tensor:
        """The loss scale as a device tensor (``GradScaler.get_scale()`` would be a host sync of its own)."""
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        return scale.float() if scale is not None else torch.ones(1, device=self.state.device)

    def _step(self, grads_finite: bool) -> None:
        if self.scaler:
            # whether the unscaled gradients are finite is all `GradScaler.step` checks, with a host read of its own:
            # the fused read has told already (the scaler's update still backs its scale off on an overflow)
            if grads_finite:
                self.optimizer.step()
            self.scaler.update()
        else:
            self.optimizer.step()

    def _refuse_step(self, event: str, unscaled: bool) -> None:
        """Leave optimiser and scaler as they were; under AMP an fp16 gradient overflow still backs the scale off."""
        if self.scaler is None or not unscaled:
            return
        if event == "grad":
            self.scaler.update()  # the scaler's own remedy: halve the scale (the step was already skipped)
            return
        saved = self.scaler.state_dict()
        self.scaler.update()  # clears the per-step unscale record
        self.scaler.load_state_dict(saved)

    def _broadcast_state(self) -> None:
        """Start every DDP rank from rank 0's parameters and buffers (as `DistributedDataParallel` does)."""
        self.world_size = torch.distributed.get_world_size() if is_distributed() else 1
        if self.world_size > 1:
            with torch.no_grad():
                for t in [*self.network.parameters(), *self.buffers]:
                    torch.distributed.broadcast(t, src=0)

    def _all_reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """
        One all-reduce per step: gradients and float buffers (BatchNorm statistics) are averaged over the ranks, and
        the named ``stats`` (event flags, losses) summed. A rank whose forward failed contributes zero gradients.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        floats = [b for b in self.buffers if b.is_floating_point()]
        names = list(stats)
        tensors = [*grads, *floats, *(stats[n].reshape(-1) for n in names)]
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        torch.distributed.all_reduce(flat)
        chunks = flat.split([t.numel() for t in tensors])
        with torch.no_grad():
            for p, c in zip(self.params, chunks, strict=False):
                p.grad = c.view_as(p).div_(self.world_size).to(p.dtype)
            for b, c in zip(floats, chunks[len(grads) :], strict=False):
                b.copy_(c.view_as(b).div_(self.world_size))
        reduced = chunks[len(grads) + len(floats) :]
        return {n: c.view_as(stats[n]) for n, c in zip(names, reduced, strict=True)}
