"""The evaluation report of ``evaluate.json``: COCO metrics, the IoU-based FROC and the official LUNA16 FROC of the
predictions' world centres (`scripts.evaluation.luna16_froc`), written as JSON, CSV, figures and a submission."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.transforms.dictionary import AffineBoxToWorldCoordinated
from monai.utils import convert_to_numpy
from scripts.data.luna16_csv import seriesuid_of, write_submission
from scripts.distributed import gather_lists
from scripts.evaluation import luna16_froc
from scripts.evaluation.coco import coco_results
from scripts.evaluation.froc import LUNA16_FP_RATES, froc
from scripts.json_io import write_json

__all__ = ["EvaluationReport", "evaluation_metrics", "save_froc_figure", "world_boxes"]

logger = logging.getLogger(__name__)

_KEYS = ("box", "label", "label_scores")


def evaluation_metrics(
    preds: Sequence[dict],
    targets: Sequence[dict],
    coco_metric: COCOMetric,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    iou_threshold: float = 0.1,
    max_detections: int = 100,
) -> dict[str, Any]:
    """``{"num_images", "coco": {name: value}, "froc": {...}}`` of per-image predictions against targets."""
    coco = coco_results(coco_metric, preds, targets, max_detections=max_detections) if preds else {}
    return {
        "num_images": len(preds),
        "coco": coco,
        "froc": froc(preds, targets, fp_rates=fp_rates, iou_threshold=iou_threshold),
    }


def _flat(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report as ``(name, value)`` rows: COCO values, then FROC sensitivities and CPM."""
    rows: list[tuple[str, Any]] = [("num_images", metrics["num_images"])]
    rows += sorted(metrics["coco"].items())
    f = metrics["froc"]
    rows += [(f"froc_sensitivity_fp_{r:g}", s) for r, s in zip(f["fp_rates"], f["sensitivity"], strict=True)]
    rows += [("froc_cpm", f["cpm"]), ("froc_iou_threshold", f["iou_threshold"])]
    rows += [(k, f[k]) for k in ("num_nodules", "num_detected", "num_false_positives")]
    if "luna16_froc" in metrics:
        lf = metrics["luna16_froc"]
        rows += [(f"luna16_sensitivity_fp_{r:g}", s) for r, s in zip(lf["fp_rates"], lf["sensitivity"], strict=True)]
        rows += [("luna16_cpm", lf["cpm"])]
        rows += [(f"luna16_cpm_{k}", lf["bootstrap"][f"cpm_{k}"]) for k in ("low", "high") if "bootstrap" in lf]
    return rows


def world_boxes(boxes: Any, image: Any) -> np.ndarray:
    """``xyzxyz`` boxes in the voxel coordinates of ``image`` (a MetaTensor with its RAS affine) to world mm, LPS."""
    to_world = AffineBoxToWorldCoordinated(box_keys="box", box_ref_image_keys="image", affine_lps_to_ras=True)
    box = convert_to_numpy(boxes, dtype=np.float64, wrap_sequence=True).reshape(-1, 6)
    return convert_to_numpy(to_world({"box": box, "image": image})["box"], dtype=np.float64).reshape(-1, 6)


def _scan_detections(
    image: Any, pred: dict[str, np.ndarray], target: dict[str, np.ndarray]
) -> luna16_froc.ScanDetections:
    """One image's predictions and target boxes as world centres (and the boxes' largest sides)."""
    pred_world, target_world = world_boxes(pred["box"], image), world_boxes(target["box"], image)
    return luna16_froc.ScanDetections(
        seriesuid=seriesuid_of(image.meta["filename_or_obj"]),
        centres=(pred_world[:, :3] + pred_world[:, 3:]) / 2,
        probabilities=np.asarray(pred["label_scores"], dtype=np.float64).reshape(-1),
        box_centres=(target_world[:, :3] + target_world[:, 3:]) / 2,
        box_sizes=(target_world[:, 3:] - target_world[:, :3]).max(axis=1, initial=0.0),
    )


def save_froc_figure(result: dict[str, Any], path: str) -> None:
    """Plot a `froc` result (curve, operating points, CPM) to ``path`` (PNG), log-scaled FP axis as in LUNA16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    curve = result.get("curve") or {}
    if curve:
        fps = np.asarray(curve["fps_per_image"])
        sens = np.asarray(curve["sensitivity"])
        grid = np.geomspace(min(result["fp_rates"]) / 2, max(max(result["fp_rates"]), float(fps.max(initial=0))), 200)
        ax.plot(grid, np.interp(grid, fps, sens), "-", color="tab:blue", label="FROC")
    if result.get("cpm") is not None:
        ax.plot(result["fp_rates"], result["sensitivity"], "o", color="tab:red", label=f"CPM {result['cpm']:.3f}")
    title = f"FROC, {result['num_images']} scans, {result['num_nodules']} nodules"
    luna16_froc.save_froc_plot(fig, ax, title, path, legend="lower right")


class EvaluationReport:
    """
    Collects per-image predictions and targets of an evaluator run; at the end of the epoch computes MONAI's
    `COCOMetric`, the IoU-based FROC (`scripts.evaluation.froc.froc`) and the official LUNA16 FROC of the boxes'
    world centres (`scripts.evaluation.luna16_froc.score_detections`), writes ``metrics.json``, ``metrics.csv``,
    ``froc.png``, ``luna16_froc.json``, ``luna16_froc.png`` and the predictions as a LUNA16 ``submission.csv`` to
    ``output_dir`` and logs a summary. Under DDP the records of all ranks are gathered and the rank given an
    ``output_dir`` writes.

    Args:
        output_dir: folder of the report files (created if missing; ``None``: compute, write nothing).
        coco_metric: the configured `COCOMetric` (classes, IoU list and range, max detections).
        fp_rates: false positives per scan at which the FROC sensitivity is read.
        iou_threshold: box IoU from which a prediction hits a nodule (FROC).
        max_detections: top-scoring predictions per image the COCO matching keeps.
        output_transform: engine output -> ``(preds, targets)``, lists of dicts with ``box``, ``label`` (and
            ``label_scores`` for predictions), boxes ``xyzxyz`` in one coordinate frame.
        prefix: file name stem of the JSON and CSV files.
        extra: more JSON-ready fields to record in ``metrics.json`` (e.g. the checkpoint path).
        luna16_dir: a LUNA16 download's folder: its annotations.csv and annotations_excluded.csv are the official
            FROC's ground truth (``None``: the datalist's boxes).
        bootstrap_samples: resamples of the scans for the official FROC's 95% interval (0: none).
        bootstrap_seed: their seed.
        image_transform: engine output -> the list of images (MetaTensors: file name and affine).
    """

    def __init__(
        self,
        output_dir: str | None,
        coco_metric: COCOMetric,
        fp_rates: Sequence[float] = LUNA16_FP_RATES,
        iou_threshold: float = 0.1,
        max_detections: int = 100,
        output_transform: Callable[[Any], tuple[Sequence[dict], Sequence[dict]]] = lambda o: (o["pred"], o["label"]),
        prefix: str = "metrics",
        extra: dict[str, Any] | None = None,
        luna16_dir: str | None = None,
        bootstrap_samples: int = 1000,
        bootstrap_seed: int = 0,
        image_transform: Callable[[Any], Sequence[Any]] = lambda o: o["image"],
    ) -> None:
        self.output_dir = output_dir
        self.coco_metric = coco_metric
        self.fp_rates = [float(r) for r in fp_rates]
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        self.output_transform = output_transform
        self.prefix = prefix
        self.extra = dict(extra or {})
        self.luna16_dir = luna16_dir
        self.bootstrap_samples = int(bootstrap_samples)
        self.bootstrap_seed = int(bootstrap_seed)
        self.image_transform = image_transform
        self.metrics: dict[str, Any] = {}
        self.reset()

    def attach(self, engine: Engine) -> None:
        """Reset at each epoch start, collect at each iteration, report at each epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.report)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the collected records."""
        self._preds: list[dict[str, np.ndarray]] = []
        self._targets: list[dict[str, np.ndarray]] = []
        self._scans: list[luna16_froc.ScanDetections] = []

    def update(self, engine: Engine) -> None:
        """Record the predictions and targets of the engine's current output as numpy arrays."""
        preds, targets = self.output_transform(engine.state.output)
        if targets is None:
            raise ValueError("EvaluationReport needs targets: the datalist items must have 'box' and 'label'")
        preds = [{k: convert_to_numpy(p[k], wrap_sequence=True) for k in _KEYS} for p in preds]
        targets = [{k: convert_to_numpy(t[k], wrap_sequence=True) for k in _KEYS[:2]} for t in targets]
        images = self.image_transform(engine.state.output)
        self._preds += preds
        self._targets += targets
        self._scans += [_scan_detections(i, p, t) for i, p, t in zip(images, preds, targets, strict=True)]

    def report(self, engine: Engine | None = None) -> dict[str, Any]:
        """Compute the metrics, write the files (rank 0) and return the metrics."""
        preds, targets, scans = gather_lists(self._preds, self._targets, self._scans)
        self.metrics = evaluation_metrics(
            preds, targets, self.coco_metric, self.fp_rates, self.iou_threshold, self.max_detections
        )
        official, submission = luna16_froc.score_detections(
            scans,
            self.luna16_dir,
            self.max_detections,
            fp_rates=self.fp_rates,
            bootstrap_samples=self.bootstrap_samples,
            bootstrap_seed=self.bootstrap_seed,
        )
        # metrics.json keeps the figures; the curve and the band are in luna16_froc.json
        self.metrics["luna16_froc"] = {k: v for k, v in official.items() if k not in ("curve", "bootstrap")}
        if "bootstrap" in official:
            self.metrics["luna16_froc"]["bootstrap"] = {k: v for k, v in official["bootstrap"].items() if k != "band"}
        self.metrics |= self.extra
        if self.output_dir is None:  # another DDP rank than 0: gathered, computed, not written
            return self.metrics
        os.makedirs(self.output_dir, exist_ok=True)
        write_json(os.path.join(self.output_dir, f"{self.prefix}.json"), self.metrics)
        write_submission(os.path.join(self.output_dir, "submission.csv"), submission)
        luna16_froc.write_luna16_report(official, self.output_dir)
        with open(os.path.join(self.output_dir, f"{self.prefix}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "value"])
            writer.writerows((k, "" if v is None else v) for k, v in _flat(self.metrics))
        save_froc_figure(self.metrics["froc"], os.path.join(self.output_dir, "froc.png"))
        logger.info(self.summary())
        return self.metrics

    def summary(self) -> str:
        """One paragraph: the headline COCO values, the FROC points and CPM, and where the files are."""
        coco = self.metrics.get("coco", {})
        f = self.metrics["froc"]
        heads = [k for k in coco if not k.startswith(tuple(f"{c}_" for c in self.coco_metric.classes))]
        parts = [f"{k} {coco[k]:.4f}" for k in heads]
        points = ", ".join(
            f"{r:g}: {'n/a' if s is None else f'{s:.3f}'}" for r, s in zip(f["fp_rates"], f["sensitivity"], strict=True)
        )
        cpm = "n/a" if f["cpm"] is None else f"{f['cpm']:.4f}"
        return (
            f"evaluation on {self.metrics['num_images']} scans, {f['num_nodules']} nodules: {'; '.join(parts)}; "
            f"FROC sensitivity at FP/scan {{{points}}}, CPM {cpm}; {luna16_froc.summary(self.metrics['luna16_froc'])}; "
            f"report in {self.output_dir}"
        )
