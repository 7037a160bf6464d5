"""The clip-grad training iteration of RetinaNet 3D, with one fused finiteness decision per step.

MONAI's `SupervisedTrainer` assumes one tensor in and a loss function; the detector takes lists of images
and targets and computes its own losses, so the iteration is written here (as the model zoo does), with
the stabilised step of design.md section 5.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader

from scripts.distributed import is_distributed

__all__ = ["StabilisedDetectionTrainer", "detection_prepare_batch", "EVENT_KINDS"]


# kinds of non-finite events, in the order of the fused flag vector
EVENT_KINDS = ("input", "logits", "loss", "grad")


def detection_prepare_batch(
    batchdata: list, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[str]]:
    """
    Flatten a batch of cropped samples (a list per image, as `RandCropBoxByPosNegLabeld` makes them with
    `no_collation`) into the detector's inputs: images, targets (``box``, ``label``) and each crop's file.
    """
    samples = [s for item in batchdata for s in (item if isinstance(item, (list, tuple)) else [item])]
    images = [s["image"].to(device=device, non_blocking=non_blocking, **kwargs) for s in samples]
    targets = [
        {k: s[k].to(device=device, non_blocking=non_blocking, **kwargs) for k in ("box", "label")} for s in samples
    ]
    files = [str(s["image"].meta.get("filename_or_obj", "")) if hasattr(s["image"], "meta") else "" for s in samples]
    return images, targets, files


class StabilisedDetectionTrainer(Trainer):
    """
    Trains a `RetinaNetDetector` with the stabilised step: forward under autocast, weighted loss, backward,
    unscale, global gradient-norm clipping, and an optimiser step only when the whole iteration was finite.

    The finiteness of the input, the heads' ``NaN or Inf`` ValueError, the loss and the gradient norm are
    gathered in one flag vector and read with a single host synchronisation. A refused step leaves parameters,
    buffers, optimiser state and GradScaler exactly as they were. The iteration reports what happened in
    ``engine.state.output`` (keys ``loss``, ``loss_cls``, ``loss_reg``, ``grad_norm`` before clipping, ``event``,
    ``bad_files``, ``files``; and, read in the same sync for the monitor, ``weight_norm`` and ``amp_scale`` of the
    weights and loss scale the iteration ran with); the `NaNGuard` handler acts on it.

    Under DDP (an initialised process group) the trainer does the data-parallel synchronisation itself: ranks start
    from rank 0's weights, and one all-reduce per step averages gradients and BatchNorm statistics together with the
    event flags, so every rank takes the same decision. Torch's `DistributedDataParallel` wrapper cannot be used
    here: when the heads raise on one rank only, its reducer is left mid-iteration (the processes abort at exit)
    and the other ranks would block in backward.

    Args:
        device: the device to train on.
        max_epochs: number of epochs.
        train_data_loader: loader yielding lists of crop lists (``no_collation``).
        detector: the `RetinaNetDetector`; its ``network`` is what is optimised.
        optimizer: optimiser over the network's parameters.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        w_cls: weight of the classification loss.
        w_reg: weight of the box-regression loss.
        grad_clip_norm: clip the global gradient L2 norm to this value (``None``: no clipping).
        skip_nonfinite: refuse non-finite steps and report them (``False``: behave like the model-zoo trainer,
            where the heads' ValueError ends the run).
        amp: mixed precision: fp16 with a GradScaler on CUDA, bf16 autocast on CPU.
        train_handlers: ignite handlers with ``attach(engine)``.
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: turns a loader batch into ``(images, targets, files)``.
        key_train_metric, additional_metrics, metric_cmp_fn, event_names, event_to_attr, to_kwargs:
            as in MONAI's `Trainer`.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        detector: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        w_cls: float = 1.0,
        w_reg: float = 1.0,
        grad_clip_norm: float | None = 10.0,
        skip_nonfinite: bool = True,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = detection_prepare_batch,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
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
            to_kwargs=to_kwargs,
            **extra,
        )
        self.detector = detector
        self.network = detector.network
        self.optimizer = optimizer
        self.w_cls = w_cls
        self.w_reg = w_reg
        self.grad_clip_norm = grad_clip_norm if grad_clip_norm else None
        self.skip_nonfinite = skip_nonfinite
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.buffers = list(self.network.buffers())
        cuda = device.type == "cuda"
        self.amp_dtype = torch.float16 if cuda else torch.bfloat16
        self.world_size = 1
        self.loss_limit = math.inf  # losses above it are refused like non-finite ones (set by the NaN guard)
        self.add_event_handler(Events.STARTED, lambda engine: engine._broadcast_state())
        # created once (MONAI's Trainer.run makes a new one per run, which would lose its state on resume)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda) if amp and cuda else None

    def run(self) -> None:  # type: ignore[override]
        """Run training, keeping the GradScaler made at construction."""
        super(Trainer, self).run()

    def _handle_exception(self, e: BaseException) -> None:
        """Let every ``EXCEPTION_RAISED`` handler save what it holds (report, final checkpoint), then re-raise."""
        if Events.EXCEPTION_RAISED in self._event_handlers:
            self._fire_event(Events.EXCEPTION_RAISED, e)
        raise e

    def _forward_loss(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor] | None:
        """Detector losses under autocast, or ``None`` when a head raised its ``NaN or Inf`` ValueError."""
        autocast = (
            torch.autocast(self.state.device.type, dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()
        )
        try:
            with autocast:
                return self.detector(images, targets)
        except ValueError as e:
            if self.skip_nonfinite and "NaN or Inf" in str(e):
                return None
            raise

    def _iteration(self, engine: StabilisedDetectionTrainer, batchdata: list) -> dict[str, Any]:
        """One stabilised step; see the class docstring."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, targets, files = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.detector.train()
        engine.optimizer.zero_grad(set_to_none=True)
        saved_buffers = [b.clone() for b in engine.buffers] if engine.skip_nonfinite else []
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: targets}

        nan = torch.tensor(float("nan"), device=engine.state.device)
        losses = engine._forward_loss(images, targets)
        if losses is None:
            loss_cls = loss_reg = loss = nan
        else:
            # MONAI returns the box loss of a batch without box samples as a CPU tensor: bring both to the device
            keys = (engine.detector.cls_key, engine.detector.box_reg_key)
            loss_cls, loss_reg = (losses[k].to(nan.device) for k in keys)
            loss = engine.w_cls * loss_cls + engine.w_reg * loss_reg
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            (engine.scaler.scale(loss) if engine.scaler else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        # the fused decision: one vector, one host sync (and under DDP one all-reduce, which also averages grads)
        finite_images = torch.stack([torch.isfinite(x).all() for x in images])
        logits_failed = torch.tensor(float(losses is None), device=engine.state.device)
        bad_loss = ~loss.isfinite() | (loss.detach() > engine.loss_limit)  # the guard's spike limit (inf: none)
        flags = torch.stack([(~finite_images.all()).float(), logits_failed, bad_loss.float()])
        shared = torch.cat([flags, torch.stack([t.detach().float() for t in (loss, loss_cls, loss_reg)])])
        if engine.world_size > 1:
            shared = engine._all_reduce(shared)
        grads = [p.grad for p in engine.params if p.grad is not None]
        grad_norm = nan
        if grads:
            if engine.scaler and losses is not None:
                engine.scaler.unscale_(engine.optimizer)
            grad_norm = torch.nn.utils.get_total_norm(grads)
            if engine.grad_clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(engine.params, engine.grad_clip_norm, grad_norm)
        # telemetry read in the same sync: the weight norm and the loss scale this iteration ran with
        weight_norm = torch.nn.utils.get_total_norm([p.detach() for p in engine.params])
        scale = getattr(engine.scaler, "_scale", None)  # the tensor behind GradScaler.get_scale(), which syncs
        scale = scale.float().reshape(1) if scale is not None else torch.ones(1, device=nan.device)
        telemetry = [grad_norm.float()[None], weight_norm.float()[None], scale]
        values = torch.cat([shared, *telemetry, (~finite_images).float()]).tolist()
        flags_ = [*values[:3], 0.0 if math.isfinite(values[6]) else 1.0]
        loss_v, cls_v, reg_v = (v / engine.world_size for v in values[3:6])
        gnorm_v, wnorm_v, scale_v, bad_images = values[6], values[7], values[8], values[9:]
        event = next((k for k, f in zip(EVENT_KINDS, flags_) if f), None)
        if event is not None and not engine.skip_nonfinite:
            event = None  # the zoo trainer: step anyway
        if event is None:
            if engine.scaler:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()
        else:
            engine._refuse_step(event, unscaled=losses is not None)
            with torch.no_grad():
                for b, s in zip(engine.buffers, saved_buffers):
                    b.copy_(s)
        engine.optimizer.zero_grad(set_to_none=True)
        if event == "input":
            bad_files = [f for f, bad in zip(files, bad_images) if bad]
        else:
            bad_files = list(files) if event else []
        engine.state.output.update(
            {
                Keys.LOSS: loss_v,
                "loss_cls": cls_v,
                "loss_reg": reg_v,
                "grad_norm": gnorm_v,
                "weight_norm": wnorm_v,
                "amp_scale": scale_v,
                "event": event,
                "amp_overflow": event == "grad" and engine.scaler is not None,
                "files": files,
                "bad_files": bad_files,
            }
        )
        return engine.state.output

    def _broadcast_state(self) -> None:
        """Start every DDP rank from rank 0's parameters and buffers (as `DistributedDataParallel` does)."""
        self.world_size = torch.distributed.get_world_size() if is_distributed() else 1
        if self.world_size > 1:
            with torch.no_grad():
                for t in [*self.network.parameters(), *self.buffers]:
                    torch.distributed.broadcast(t, src=0)

    def _all_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """
        One all-reduce per step: gradients and float buffers (BatchNorm statistics) are averaged over the ranks, and
        ``stats`` (event flags, losses) summed and returned. A rank whose forward failed contributes zero gradients.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        floats = [b for b in self.buffers if b.is_floating_point()]
        flat = torch.cat([t.reshape(-1).float() for t in (*grads, *floats)] + [stats])
        torch.distributed.all_reduce(flat)
        chunks = flat.split([t.numel() for t in (*grads, *floats)] + [stats.numel()])
        with torch.no_grad():
            for p, c in zip(self.params, chunks):
                p.grad = c.view_as(p).div_(self.world_size).to(p.dtype)
            for b, c in zip(floats, chunks[len(grads) :]):
                b.copy_(c.view_as(b).div_(self.world_size))
        return chunks[-1]

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
