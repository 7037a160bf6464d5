"""Validation of the detector: whole-volume sliding-window inference inside a MONAI `SupervisedEvaluator`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer

__all__ = ["DetectionInferer", "DetectionEvaluator", "detection_prepare_val_batch"]


def detection_prepare_val_batch(
    batchdata: Sequence[dict], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """Images and, where the samples have them, targets (``box``, ``label``) of a ``no_collation`` batch."""
    images = [d["image"].to(device=device, non_blocking=non_blocking, **kwargs) for d in batchdata]
    if not all(isinstance(d.get("box"), torch.Tensor) for d in batchdata):
        return images, None
    targets = [{k: d[k].to(device=device, non_blocking=non_blocking) for k in ("box", "label")} for d in batchdata]
    return images, targets


class DetectionInferer(Inferer):
    """Runs a `RetinaNetDetector` in evaluation mode with its sliding-window inferer on whole volumes."""

    def __call__(self, inputs: list[torch.Tensor], network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return network(inputs, use_inferer=True)


class DetectionEvaluator(SupervisedEvaluator):
    """
    A `SupervisedEvaluator` for the detector: batches are lists of whole volumes, predictions lists of dicts
    (``box``, ``label``, ``label_scores``); no decollation. Arguments as in `SupervisedEvaluator`, with
    ``network`` the `RetinaNetDetector`. AMP autocast is used on CUDA only.
    """

    def __init__(self, device: torch.device | str, val_data_loader: Any, network: torch.nn.Module, **kwargs: Any):
        device = torch.device(device)
        kwargs.setdefault("prepare_batch", detection_prepare_val_batch)
        kwargs.setdefault("inferer", DetectionInferer())
        kwargs["amp"] = bool(kwargs.get("amp", False)) and device.type == "cuda"
        kwargs["decollate"] = False
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, **kwargs)
