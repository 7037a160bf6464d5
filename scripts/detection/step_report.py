"""The record of one training iteration: the only contract between the trainer and the handlers that act on it.

The trainer computes every quantity of the step on the device and brings them to the host in one copy
(`read_to_host`, by name); the handlers (the stability guard, the monitor, MONAI's stats handlers through an
``output_transform``) read the resulting `StepReport` and never a tensor, so they add no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["EVENT_KINDS", "StepReport", "read_to_host"]

# what a trainer can refuse a step for, in order of precedence: non-finite input voxels, the heads' "NaN or Inf"
# ValueError, a non-finite (or spiking) loss, a non-finite gradient norm
EVENT_KINDS = ("input", "logits", "loss", "grad")


@dataclass(frozen=True)
class StepReport:
    """
    What one iteration did, as host values.

    Attributes:
        loss: the weighted total loss (averaged over DDP ranks; NaN when the heads raised).
        loss_cls: the classification loss (MONAI's default, binary cross-entropy with logits, which train.json keeps).
        loss_reg: the box-regression loss.
        grad_norm: the global gradient L2 norm before clipping (unscaled under AMP).
        weight_norm: the L2 norm of the weights the iteration started from.
        amp_scale: the GradScaler's loss scale the iteration ran with (1.0 without a scaler).
        lr: the learning rate of the first parameter group the iteration ran with.
        positive_score: the mean classifier score (sigmoid) at the anchors matched to a box (NaN when no crop has
            one).
        negative_score: the mean classifier score at the anchors matched to no box (the background).
        event: the kind of the refused step (one of `EVENT_KINDS`), or ``None`` when the step was applied.
        amp_overflow: the refused step was an fp16 gradient overflow that the GradScaler handles.
        files: the image file of each crop of the batch.
        bad_files: the files held responsible for the event: those with non-finite voxels for an ``input``
            event, every file of the batch for other events, none for an applied step.
    """

    loss: float
    loss_cls: float
    loss_reg: float
    grad_norm: float
    weight_norm: float
    amp_scale: float = 1.0
    lr: float = math.nan
    positive_score: float = math.nan
    negative_score: float = math.nan
    event: str | None = None
    amp_overflow: bool = False
    files: tuple[str, ...] = field(default_factory=tuple)
    bad_files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def score_gap(self) -> float:
        """
        ``positive_score - negative_score``: a cheap sign of learning. Both start at the classifier's prior (about
        0.01); a detector that learns separates them, one stalled by too high a learning rate scores both alike.
        """
        return self.positive_score - self.negative_score

    @property
    def stepped(self) -> bool:
        """Whether the optimiser step was applied."""
        return self.event is None


def read_to_host(values: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """
    Named device tensors as host lists of floats, in one device-to-host copy (a single CPU-GPU sync point).

    The tensors are flattened and concatenated in order and split back by name, so no caller indexes the fused
    vector by position.
    """
    names = list(values)
    flat = [values[n].detach().reshape(-1).float() for n in names]
    host = torch.cat(flat).tolist() if flat else []
    out, start = {}, 0
    for name, t in zip(names, flat, strict=True):
        out[name] = host[start : start + t.numel()]
        start += t.numel()
    return out
