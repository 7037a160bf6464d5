"""Evaluation: the LUNA16 FROC and COCO figures on hand-made detections, and evaluate.json end to end."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from monai.apps.detection.metrics.coco import COCOMetric
from monai.bundle import run
from monai.data.box_utils import convert_box_mode
from scripts.evaluation.froc import LUNA16_FP_RATES, froc
from scripts.evaluation.report import evaluation_metrics
from tests.bundle_helpers import config, tiny_bundle

NODULE = np.array([[10.0, 10.0, 10.0, 20.0, 20.0, 16.0]])
FAR = np.array([[40.0, 40.0, 30.0, 48.0, 48.0, 36.0]])


def coco() -> COCOMetric:
    return COCOMetric(classes=["nodule"], iou_list=[0.1, 0.5], iou_range=[0.1, 0.5, 0.05], max_detection=[100])


def case(boxes: list[np.ndarray], scores: list[float]) -> tuple[dict, dict]:
    """A scan with the one nodule ``NODULE`` and the given predictions."""
    pred = {
        "box": np.concatenate(boxes) if boxes else np.zeros((0, 6)),
        "label": np.zeros(len(boxes), dtype=int),
        "label_scores": np.asarray(scores, dtype=float),
    }
    return pred, {"box": NODULE, "label": np.array([0])}


def run_froc(cases: list[tuple[dict, dict]]) -> dict:
    return froc([c[0] for c in cases], [c[1] for c in cases])


def test_perfect_predictions() -> None:
    cases = [case([NODULE], [0.9]) for _ in range(4)]
    result = run_froc(cases)
    assert result["sensitivity"] == [1.0] * 7 and result["cpm"] == 1.0
    metrics = evaluation_metrics([c[0] for c in cases], [c[1] for c in cases], coco())
    for key in ("mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.10_MaxDet_100", "AR_IoU_0.10_MaxDet_100"):
        assert metrics["coco"][key] == pytest.approx(1.0)
    assert metrics["froc"]["fp_rates"] == list(LUNA16_FP_RATES)


def test_one_confident_false_positive_per_scan() -> None:
    # every scan: a false positive scoring above the true positive -> no nodule found below 1 FP per scan
    result = run_froc([case([FAR, NODULE], [0.95, 0.9]) for _ in range(4)])
    assert result["sensitivity"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert result["cpm"] == pytest.approx(4 / 7)
    assert result["num_false_positives"] == 4


def test_false_positives_on_half_the_scans_score_high() -> None:
    cases = [case([FAR, NODULE], [0.95, 0.9]) for _ in range(2)] + [case([FAR, NODULE], [0.5, 0.9]) for _ in range(2)]
    result = run_froc(cases)
    # thresholds: 0.95 -> (0.5 FP/scan, sens 0); 0.9 -> (0.5, 1); 0.5 -> (1, 1); linear from (0, 0) below
    assert result["sensitivity"] == pytest.approx([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert result["curve"]["fps_per_image"][0] == 0.0 and result["curve"]["sensitivity"][0] == 0.0


def test_duplicates_are_ignored_and_misses_counted() -> None:
    shifted = NODULE + np.array([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])  # IoU 0.82 with the nodule
    hit = case([NODULE, shifted], [0.9, 0.3])
    missed = case([FAR], [0.2])
    result = run_froc([hit, missed])
    assert result["num_nodules"] == 2 and result["num_detected"] == 1
    assert result["num_false_positives"] == 1  # the duplicate is not a false positive
    assert max(result["sensitivity"]) == 0.5
    low_iou = case([NODULE + np.array([[8.0, 8.0, 0.0, 8.0, 8.0, 0.0]])], [0.9])  # IoU 0.04 < 0.1
    assert run_froc([low_iou])["num_detected"] == 0


def test_no_nodules_gives_no_sensitivity() -> None:
    pred = {"box": FAR, "label": np.array([0]), "label_scores": np.array([0.5])}
    result = froc([pred], [{"box": np.zeros((0, 6)), "label": np.zeros(0, dtype=int)}])
    assert result["cpm"] is None and result["num_false_positives"] == 1


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """evaluate.json and inference.json run with a tiny untrained model on tiny phantoms."""
    root = str(tmp_path_factory.mktemp("bundle"))
    common = tiny_bundle(root)
    run("evaluating", config_file=[config("train.json"), config("evaluate.json")], cache_rate=0.0, **common)
    run("inference", config_file=config("inference.json"), output_dir=os.path.join(root, "infer"), **common)
    return {"root": root, "datalist": common["data_list_file_path"]}


@pytest.mark.slow
def test_evaluate_writes_report(evaluated: dict[str, str]) -> None:
    out = os.path.join(evaluated["root"], "eval")
    for name in ("metrics.json", "metrics.csv", "froc.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for key in (
        "mAP_IoU_0.10_0.50_0.05_MaxDet_100",
        "AP_IoU_0.10_MaxDet_100",
        "mAR_IoU_0.10_0.50_0.05_MaxDet_100",
        "AR_IoU_0.10_MaxDet_100",
    ):
        assert 0.0 <= metrics["coco"][key] <= 1.0, key
    f = metrics["froc"]
    assert f["fp_rates"] == list(LUNA16_FP_RATES) and len(f["sensitivity"]) == 7
    assert f["cpm"] == pytest.approx(np.mean(f["sensitivity"]))
    assert metrics["num_images"] == 1 and metrics["checkpoint"].endswith("model.pt")
    with open(os.path.join(out, "metrics.csv")) as fh:
        rows = dict(csv.reader(fh))
    assert {"froc_cpm", "froc_sensitivity_fp_0.125", "AP_IoU_0.10_MaxDet_100"} <= set(rows)


@pytest.mark.slow
def test_inference_result_gives_the_same_figures(evaluated: dict[str, str]) -> None:
    """Metrics recomputed in world millimetres from inference's result.json agree with evaluate.json's."""
    with open(os.path.join(evaluated["root"], "infer", "result.json")) as f:
        result = json.load(f)["validation"]
    with open(evaluated["datalist"]) as f:
        truth = json.load(f)["validation"]

    def xyzxyz(boxes: list) -> np.ndarray:
        return convert_box_mode(np.asarray(boxes, dtype=float).reshape(-1, 6), src_mode="cccwhd", dst_mode="xyzxyz")

    preds = [
        {"box": xyzxyz(r["box"]), "label": np.array(r["label"]), "label_scores": np.array(r["label_scores"])}
        for r in result
    ]
    targets = [{"box": xyzxyz(t["box"]), "label": np.array(t["label"])} for t in truth]
    world = evaluation_metrics(preds, targets, coco())
    with open(os.path.join(evaluated["root"], "eval", "metrics.json")) as f:
        image = json.load(f)
    for key, value in image["coco"].items():
        assert world["coco"][key] == pytest.approx(value, abs=1e-6), key
    assert world["froc"]["sensitivity"] == pytest.approx(image["froc"]["sensitivity"], abs=1e-6)
    assert world["froc"]["num_false_positives"] == image["froc"]["num_false_positives"] > 0
