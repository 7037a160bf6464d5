"""MONAI's detection `COCOMetric` as an ignite metric, so it can be a key metric of a MONAI evaluator."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ignite.metrics import Metric
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.utils import convert_to_numpy
from scripts.distributed import gather_lists

__all__ = ["CocoDetectionMetric", "coco_results"]


def coco_results(
    coco: COCOMetric,
    preds: Sequence[dict],
    targets: Sequence[dict],
    box_key: str = "box",
    label_key: str = "label",
    score_key: str = "label_scores",
    max_detections: int = 100,
) -> dict[str, float]:
    """COCO metrics of per-image predictions against per-image targets (boxes xyzxyz in one coordinate frame)."""
    results = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=coco.iou_thresholds,
        pred_boxes=[convert_to_numpy(p[box_key], wrap_sequence=True) for p in preds],
        pred_classes=[convert_to_numpy(p[label_key], wrap_sequence=True) for p in preds],
        pred_scores=[convert_to_numpy(p[score_key], wrap_sequence=True) for p in preds],
        gt_boxes=[convert_to_numpy(t[box_key], wrap_sequence=True) for t in targets],
        gt_classes=[convert_to_numpy(t[label_key], wrap_sequence=True) for t in targets],
        max_detections=max_detections,
    )
    return {k: float(v) for k, v in coco(results)[0].items()}


class CocoDetectionMetric(Metric):
    """
    Accumulates per-image predictions and targets over an epoch and computes MONAI's `COCOMetric` on them.
    Under DDP the per-image records are gathered from every rank before computing.

    Args:
        coco_metric: the configured `COCOMetric` (classes, IoU thresholds, max detections).
        key: which of its results is this metric's value, e.g. ``"mAP_IoU_0.10_0.50_0.05_MaxDet_100"`` or
            ``"AP_IoU_0.10_MaxDet_100"``, matched as a suffix of the class-prefixed name.
        output_transform: maps the engine output to ``(preds, targets)``, lists of dicts.
        box_key, label_key, score_key: dict keys of boxes, labels and prediction scores.
    """

    def __init__(
        self,
        coco_metric: COCOMetric,
        key: str = "AP_IoU_0.10_MaxDet_100",
        output_transform: Callable = lambda out: (out["pred"], out["label"]),
        box_key: str = "box",
        label_key: str = "label",
        score_key: str = "label_scores",
    ) -> None:
        self.coco = coco_metric
        self.key = key
        self.box_key, self.label_key, self.score_key = box_key, label_key, score_key
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._preds: list[dict[str, np.ndarray]] = []
        self._targets: list[dict[str, np.ndarray]] = []

    def update(self, output: tuple[Sequence[dict], Sequence[dict]]) -> None:
        preds, targets = output
        keys = (self.box_key, self.label_key)
        self._preds += [{k: convert_to_numpy(p[k], wrap_sequence=True) for k in (*keys, self.score_key)} for p in preds]
        self._targets += [{k: convert_to_numpy(t[k], wrap_sequence=True) for k in keys} for t in targets]

    def compute(self) -> float:
        preds, targets = gather_lists(self._preds, self._targets)
        values = coco_results(self.coco, preds, targets, self.box_key, self.label_key, self.score_key)
        self.results = values
        matches = [v for k, v in values.items() if k.endswith(self.key)]
        if not matches:
            raise KeyError(f"COCO metric has no result named *{self.key}; it has {sorted(values)}")
        return float(np.mean(matches))
