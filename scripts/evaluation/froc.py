"""LUNA16-style FROC of box detections: sensitivity at fixed false-positive rates per scan, and their mean (CPM).

Hit criterion: a prediction *hits* a nodule when both have the same label and their box IoU is at least
``iou_threshold`` (0.1 by default, the IoU of the model zoo's ``AP_IoU_0.10`` figure). LUNA16 itself counts a
candidate whose centre lies inside the sphere of radius diameter / 2 around the nodule centre; with boxes on both
sides the IoU criterion needs no diameter convention, does not depend on the voxel spacing (IoU is invariant under
the per-axis scaling and translation that map image coordinates to world millimetres), so the same figures come
out of image-coordinate boxes (``evaluate.json``) and world-coordinate boxes (``inference.json``'s ``result.json``).

Scoring, as in the LUNA16 evaluation script:

- a nodule is detected with the highest score among the predictions that hit it; the other predictions that hit
  it are duplicates and are ignored (neither true nor false positives); a prediction may hit several nodules;
- a prediction that hits no nodule is a false positive;
- the FROC curve is swept over the score threshold (MONAI's `compute_froc_curve_data`), and the sensitivity at
  each false-positive rate is linearly interpolated on it (MONAI's `compute_froc_score`, one rate at a time);
  beyond the last operating point the sensitivity stays at its maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data.box_utils import box_iou
from monai.metrics.froc import compute_froc_curve_data, compute_froc_score
from monai.utils import convert_to_numpy

__all__ = ["LUNA16_FP_RATES", "froc", "image_fp_tp_probs"]

LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def image_fp_tp_probs(
    pred_boxes: Any, pred_scores: Any, pred_labels: Any, gt_boxes: Any, gt_labels: Any, iou_threshold: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """
    Scores of the false positives of one image, and per nodule the score it is detected with (0 if missed).

    Boxes are ``xyzxyz`` (or any one mode shared by both sides that `box_iou` accepts) in one coordinate frame.
    """
    pred = convert_to_numpy(pred_boxes, dtype=np.float64, wrap_sequence=True).reshape(-1, 6)
    scores = convert_to_numpy(pred_scores, dtype=np.float64, wrap_sequence=True).reshape(-1)
    plabels = convert_to_numpy(pred_labels, dtype=np.int64, wrap_sequence=True).reshape(-1)
    gt = convert_to_numpy(gt_boxes, dtype=np.float64, wrap_sequence=True).reshape(-1, 6)
    glabels = convert_to_numpy(gt_labels, dtype=np.int64, wrap_sequence=True).reshape(-1)
    if len(gt) == 0 or len(pred) == 0:
        return scores.copy(), np.zeros(len(gt))
    hit = (np.asarray(box_iou(pred, gt)) >= iou_threshold) & (plabels[:, None] == glabels[None, :])
    tp_probs = np.where(hit, scores[:, None], 0.0).max(axis=0)
    return scores[~hit.any(axis=1)], tp_probs


def froc(
    preds: Sequence[dict],
    targets: Sequence[dict],
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    iou_threshold: float = 0.1,
    box_key: str = "box",
    label_key: str = "label",
    score_key: str = "label_scores",
) -> dict[str, Any]:
    """
    FROC of per-image predictions (dicts with boxes, labels, scores) against per-image targets (boxes, labels).

    Returns a JSON-ready dict: ``criterion``, ``fp_rates``, ``sensitivity`` (one per rate), ``cpm`` (their mean),
    ``num_images``, ``num_nodules``, ``num_detected`` (nodules hit at any score), ``num_false_positives`` (at the
    lowest score) and ``curve`` (``fps_per_image`` and ``sensitivity``, ascending). Sensitivities are ``None``
    when there is no nodule.
    """
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
    fp_all, tp_all = [np.zeros(0)], [np.zeros(0)]
    for p, t in zip(preds, targets, strict=True):
        fp, tp = image_fp_tp_probs(p[box_key], p[score_key], p[label_key], t[box_key], t[label_key], iou_threshold)
        fp_all.append(fp)
        tp_all.append(tp)
    fp_probs, tp_probs = np.concatenate(fp_all), np.concatenate(tp_all)
    result: dict[str, Any] = {
        "criterion": f"box IoU >= {iou_threshold:g} with a nodule of the same label; duplicates ignored",
        "iou_threshold": float(iou_threshold),
        "fp_rates": [float(r) for r in fp_rates],
        "num_images": len(preds),
        "num_nodules": int(len(tp_probs)),
        "num_detected": int(np.count_nonzero(tp_probs > 0)),
        "num_false_positives": int(len(fp_probs)),
    }
    if len(tp_probs) == 0 or len(preds) == 0:
        return {**result, "sensitivity": [None] * len(fp_rates), "cpm": None, "curve": {}}
    # MONAI's curve sweeps every score but the lowest, which it takes to be the 0 that missed targets score
    # (CAMELYON convention); a 0 sentinel among the false positives keeps every real score as a threshold.
    fps, sens = compute_froc_curve_data(np.append(fp_probs, 0.0), tp_probs, len(tp_probs), len(preds))
    sensitivity = [float(compute_froc_score(fps, sens, (float(r),))) for r in fp_rates]
    return {
        **result,
        "sensitivity": sensitivity,
        "cpm": float(np.mean(sensitivity)),
        "curve": {"fps_per_image": fps[::-1].tolist(), "sensitivity": sens[::-1].tolist()},
    }
