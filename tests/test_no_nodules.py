"""Scans without nodules (287 of LUNA16's 888): valid datalist items that train as negatives, validate and evaluate,
whether their box list is written ``[]`` or ``[[]]``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from bundle_helpers import parse
from ignite.engine import Events
from monai.data import Dataset
from monai.data.utils import no_collation
from scripts.data.datalist import resolved_items
from scripts.data.phantoms import generate_dataset
from scripts.data.quarantine import Quarantine, QuarantineSampler
from scripts.data.report import DataReport
from scripts.data.rules import check_annotations, no_boxes
from test_bundle import TINY_CONFIG, bundle
from training_helpers import make_trainer, tiny_sample


@pytest.mark.parametrize(
    ("boxes", "empty"),
    [([], True), ([[]], True), ([[], []], True), ((), True), ([[1, 2, 3, 4, 5, 6]], False), ([[1.0]], False),
     ("[]", False), ([[], [1, 2, 3, 4, 5, 6]], False), (None, False)],
)  # fmt: skip
def test_no_boxes_reads_every_shape_of_an_empty_list(boxes, empty):
    assert no_boxes(boxes) is empty


@pytest.mark.parametrize("boxes", [[], [[]]])
def test_an_item_without_nodules_passes_the_check_and_resolves_to_an_empty_box_array(tmp_path, boxes):
    item = {"image": "scan.nii.gz", "box": boxes, "label": []}
    report = DataReport("datalist.json", str(tmp_path))
    annotations = check_annotations(item, report.item("training", 0), num_classes=1)
    assert report.ok and annotations.boxes == []
    (resolved,) = resolved_items({"training": [item]}, "training", str(tmp_path), set())
    assert resolved["box"].shape == (0, 6) and resolved["label"] == []


def _negative(index: int) -> dict:
    sample = tiny_sample(index)
    return {**sample, "box": torch.zeros((0, 6)), "label": torch.zeros((0,), dtype=torch.long)}


@pytest.mark.slow
@pytest.mark.parametrize("sync_free", [True, False])
def test_a_batch_without_boxes_trains_on_its_negatives(tmp_path, sync_free):
    quarantine = Quarantine()
    dataset = Dataset([_negative(i) for i in range(2)])
    sampler = QuarantineSampler(dataset, quarantine, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=no_collation)
    trainer, guard = make_trainer(tmp_path, epochs=1, loader=loader, quarantine=quarantine, enabled=False)
    trainer.detector.set_sync_free(sync_free)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    reports = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: reports.append(e.state.output))
    trainer.run()
    assert len(reports) == 2
    for report in reports:
        assert report.event is None and report.stepped
        assert report.loss_reg == 0.0  # nothing to regress to
        assert report.loss_cls > 0 and torch.isfinite(torch.tensor(report.loss))
        assert report.positive_score != report.positive_score  # NaN: no anchor is matched to a box
    after = trainer.network.state_dict()
    moved = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("classification_head" in k for k in moved)  # the negatives taught the classifier


def test_crops_of_a_scan_without_nodules_are_negatives():
    crop = parse("train.json", patch_size=[16, 16, 8], batch_size=3).get_parsed_content("train#random_transforms")[0]
    image = torch.zeros((1, 40, 40, 20))
    crops = crop({"image": image, "box": torch.zeros((0, 6)), "label": torch.zeros((0,), dtype=torch.long)})
    assert len(crops) == 3
    for c in crops:
        assert tuple(c["image"].shape) == (1, 16, 16, 8)
        assert tuple(c["box"].shape) == (0, 6) and tuple(c["label"].shape) == (0,)


@pytest.mark.slow
def test_training_and_evaluation_with_scans_without_nodules(tmp_path):
    data = tmp_path / "data"
    path = generate_dataset(str(data), num_train=4, num_val=2, num_select=2, shape=(64, 64, 32), progress=False)
    with open(path) as f:
        datalist = json.load(f)
    empties = (("training", 0, []), ("training", 1, [[]]), ("selection", 0, []), ("validation", 0, [[]]))
    for section, index, empty in empties:
        datalist[section][index].update(box=empty, label=[])
    with open(path, "w") as f:
        json.dump(datalist, f)
    root = tmp_path / "bundle"
    bundle("training", root, TINY_CONFIG, dataset_dir=str(data), data_list_file_path=path)
    check = json.loads((root / "eval" / "data_check.json").read_text())
    assert check["ok"] and check["errors"] == 0, check
    assert os.path.isfile(root / "models" / "model.pt")
    bundle("evaluating", root, TINY_CONFIG, "configs/evaluate.json", dataset_dir=str(data), data_list_file_path=path)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 2
