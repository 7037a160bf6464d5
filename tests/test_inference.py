"""inference.json: inputs from a datalist or a folder, world-coordinate boxes that round-trip, previews, model.ts."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector as MonaiRetinaNetDetector
from monai.bundle import run
from scripts.data.workers import loader_workers
from scripts.errors import UserError
from scripts.inference.io import DetectionWriter, InferenceFailed, list_inputs
from scripts.tools.benchmark_inference import compare
from tests.bundle_helpers import REPO, TINY, bundle_paths, config, make_phantoms, parse, save_tiny_model


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data = str(tmp_path_factory.mktemp("phantoms"))
    return {"dir": data, "datalist": make_phantoms(data)}


def test_list_inputs_from_datalist_or_folder(phantoms: dict[str, str], tmp_path) -> None:
    items = list_inputs(phantoms["datalist"], phantoms["dir"], "training")
    assert [i["image_name"] for i in items] == ["images/train_000.nii.gz", "images/train_001.nii.gz"]
    assert all(os.path.isfile(i["image"]) for i in items)
    images = os.path.join(phantoms["dir"], "images")
    folder = list_inputs("", images)
    expected = ["select_000.nii.gz", "train_000.nii.gz", "train_001.nii.gz", "val_000.nii.gz"]
    assert [i["image_name"] for i in folder] == expected
    assert len(list_inputs(os.path.join(images, "missing.json"), images)) == len(expected)
    with pytest.raises(UserError, match="no 'test' list"):
        list_inputs(phantoms["datalist"], phantoms["dir"], "test")
    with pytest.raises(UserError, match=r"no image files \(\*.nii.gz, \*.nii, \*.mhd, \*.mha\)"):
        list_inputs("", str(tmp_path))


def test_true_boxes_round_trip_to_the_datalist(phantoms: dict[str, str]) -> None:
    """The nodules' image-coordinate boxes, written as predictions, come back as the datalist's world LPS boxes."""
    parser = parse("inference.json", dataset_dir=phantoms["dir"], data_list_file_path=phantoms["datalist"])
    item = parser.get_parsed_content("input_files")[0]
    loaded = parser.get_parsed_content("preprocessing")(item)
    with open(os.path.join(phantoms["dir"], "phantom_truth.json")) as f:
        nodules = json.load(f)[item["image_name"]]["nodules"]
    with open(phantoms["datalist"]) as f:
        expected = json.load(f)["validation"][0]
    boxes = torch.tensor([n["voxel_box"] for n in nodules], dtype=torch.float32)
    pred = {
        "box": boxes,
        "label": torch.zeros(len(boxes), dtype=torch.long),
        "label_scores": torch.linspace(0.9, 0.5, len(boxes)),
    }
    writer = DetectionWriter("unused", parser.get_parsed_content("postprocessing"))
    entry = writer.convert(loaded, pred)
    assert entry["image"] == expected["image"]
    np.testing.assert_allclose(entry["box"], expected["box"], atol=1e-3)
    assert entry["label"] == expected["label"]
    assert entry["label_scores"] == pytest.approx(pred["label_scores"].tolist())


@pytest.fixture(scope="module")
def inferred(phantoms: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """inference.json run from model.pt (with previews) and from model.ts of the same tiny untrained network."""
    root = str(tmp_path_factory.mktemp("bundle"))
    network = save_tiny_model(os.path.join(root, "models", "model.pt"))
    torch.jit.script(network).save(os.path.join(root, "models", "model.ts"))
    common = {"bundle_root": root, "dataset_dir": phantoms["dir"], "data_list_file_path": phantoms["datalist"]}
    common.update(TINY, **bundle_paths())
    run("inference", config_file=config("inference.json"), save_previews=True, preview_score_thresh=0.0, **common)
    ts_out = os.path.join(root, "from_ts")
    run(
        "run",
        config_file=config("inference.json"),
        model_path=os.path.join(root, "models", "model.ts"),
        output_dir=ts_out,
        **common,
    )
    return {"pt": os.path.join(root, "eval"), "ts": ts_out, "root": root}


@pytest.mark.slow
def test_result_json_structure(inferred: dict[str, str], phantoms: dict[str, str]) -> None:
    with open(os.path.join(inferred["pt"], "result.json")) as f:
        result = json.load(f)
    assert list(result) == ["validation", "failed"] and result["failed"] == []
    (entry,) = result["validation"]
    assert entry["image"] == "images/val_000.nii.gz"
    assert len(entry["box"]) == len(entry["label"]) == len(entry["label_scores"]) > 0
    assert all(len(b) == 6 and b[3] > 0 and b[4] > 0 and b[5] > 0 for b in entry["box"])
    assert all(isinstance(v, int) for v in entry["label"])
    assert all(0.0 <= s <= 1.0 for s in entry["label_scores"])
    assert os.path.getsize(os.path.join(inferred["pt"], "previews", "val_000.png")) > 0


@pytest.mark.slow
def test_torchscript_model_gives_the_same_result(inferred: dict[str, str]) -> None:
    results = []
    for key in ("pt", "ts"):
        with open(os.path.join(inferred[key], "result.json")) as f:
            results.append(json.load(f)["validation"][0])
    eager, scripted = results
    assert not os.path.exists(os.path.join(inferred["ts"], "previews"))
    top = 10
    np.testing.assert_allclose(eager["label_scores"][:top], scripted["label_scores"][:top], atol=1e-4)
    np.testing.assert_allclose(eager["box"][:top], scripted["box"][:top], atol=1e-3)


@pytest.mark.slow
def test_folder_input(inferred: dict[str, str], phantoms: dict[str, str], tmp_path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(os.path.join(phantoms["dir"], "images", "val_000.nii.gz"), folder / "scan.nii.gz")
    out = tmp_path / "out"
    common = {
        "bundle_root": inferred["root"],
        "dataset_dir": str(folder),
        "data_list_file_path": "",
        "output_dir": str(out),
    }
    run("inference", config_file=config("inference.json"), **common, **TINY, **bundle_paths())
    with open(out / "result.json") as f:
        (entry,) = json.load(f)["validation"]
    assert entry["image"] == "scan.nii.gz"
    with open(os.path.join(inferred["pt"], "result.json")) as f:
        assert entry["box"] == json.load(f)["validation"][0]["box"]


class FailsOn(torch.nn.Module):
    """The detector, except on the image whose file name ends with ``name``: there its box regression is NaN, so that
    MONAI's box decoding raises its own ``pred_whd_axis is NaN or Inf``, or ``error`` is raised when given."""

    def __init__(self, detector: torch.nn.Module, name: str, error: Exception | None = None) -> None:
        super().__init__()
        self.detector, self.name, self.error = detector, name, error

    def forward(self, images: list, use_inferer: bool = False) -> list:
        if not str(images[0].meta["filename_or_obj"]).endswith(self.name):
            return self.detector(images, use_inferer=use_inferer)
        if self.error is not None:
            raise self.error
        bias = self.detector.network.regression_head.bbox_reg.bias
        saved = bias.detach().clone()
        bias.data.fill_(float("nan"))
        try:
            return self.detector(images, use_inferer=use_inferer)
        finally:
            bias.data.copy_(saved)


def runner(phantoms: dict[str, str], root, error: Exception | None = None):
    """inference.json's evaluator (the runner) on the two training phantoms, its detector failing on the second."""
    model = os.path.join(str(root), "model.pt")
    save_tiny_model(model)
    parser = parse(
        "inference.json",
        **TINY,
        dataset_dir=phantoms["dir"],
        data_list_file_path=phantoms["datalist"],
        data_list_key="training",
        model_path=model,
        output_dir=str(root / "out"),
    )
    run = parser.get_parsed_content("evaluator")
    run.detector = FailsOn(run.detector, "train_001.nii.gz", error)
    run.progress = False
    return run


@pytest.mark.slow
def test_a_nonfinite_prediction_is_listed_and_the_run_goes_on(phantoms: dict[str, str], tmp_path) -> None:
    run = runner(phantoms, tmp_path)
    with pytest.raises(InferenceFailed, match=r"inference failed on 1 of 2 images") as e:
        run.run()
    assert str(tmp_path / "out" / "result.json") in str(e.value) and "\n" not in str(e.value)
    with open(tmp_path / "out" / "result.json") as f:
        result = json.load(f)
    assert [r["image"] for r in result["training"]] == ["images/train_000.nii.gz"]
    assert result["failed"] == [
        {
            "image": "images/train_001.nii.gz",
            "problem": "nonfinite_prediction",
            "message": "ValueError: pred_whd_axis is NaN or Inf.",
        }
    ]


@pytest.mark.slow
def test_an_image_that_changed_since_the_data_check_is_listed_and_the_run_goes_on(
    phantoms: dict[str, str], tmp_path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantoms["dir"], data)
    copied = {"dir": str(data), "datalist": os.path.join(str(data), os.path.basename(phantoms["datalist"]))}
    run = runner(copied, tmp_path)  # the data check has passed both images
    run.detector = run.detector.detector  # no failing prediction: the file itself fails
    (data / "images" / "train_001.nii.gz").write_bytes(b"truncated")
    with pytest.raises(InferenceFailed, match=r"inference failed on 1 of 2 images"):
        run.run()
    with open(tmp_path / "out" / "result.json") as f:
        result = json.load(f)
    assert [r["image"] for r in result["training"]] == ["images/train_000.nii.gz"]
    (failure,) = result["failed"]
    assert failure["image"] == "images/train_001.nii.gz" and failure["problem"] == "load_failed"
    assert failure["message"].startswith("unreadable: not a NIfTI file")


@pytest.mark.slow
def test_a_crash_keeps_the_results_so_far(phantoms: dict[str, str], tmp_path) -> None:
    """A bug (not the image's fault) keeps its traceback, and the results written before it stay on disk."""
    run = runner(phantoms, tmp_path, error=RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        run.run()
    with open(tmp_path / "out" / "result.json") as f:
        result = json.load(f)
    assert [r["image"] for r in result["training"]] == ["images/train_000.nii.gz"] and result["failed"] == []
    assert len(result["training"][0]["box"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["exclude", "strict", "off"])
def test_an_image_listed_three_times_is_inferred_once_for_each_listing_under_every_data_check_policy(
    inferred: dict[str, str], phantoms: dict[str, str], tmp_path, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the model zoo's CI lists one image three times: a repeat of an image that was inferred is not a failed image
    with open(phantoms["datalist"]) as f:
        item = json.load(f)["validation"][0]
    absolute = {**item, "image": os.path.join(phantoms["dir"], item["image"])}  # the same file, written otherwise
    datalist = tmp_path / "repeats.json"
    datalist.write_text(json.dumps({"validation": [item, item, absolute]}))
    listed = list_inputs(str(datalist), phantoms["dir"])
    assert [(i["image_name"], i["listings"]) for i in listed] == [(item["image"], 3)]
    out = tmp_path / "out"
    common = {"bundle_root": inferred["root"], "dataset_dir": phantoms["dir"], "output_dir": str(out)}
    with caplog.at_level(logging.WARNING):
        run("inference", config_file=config("inference.json"), data_list_file_path=str(datalist), data_check=policy,
            **common, **TINY)  # fmt: skip
    assert f"{item['image']} is listed 3 times" in caplog.text
    result = json.loads((out / "result.json").read_text())
    with open(os.path.join(inferred["pt"], "result.json")) as f:
        once = json.load(f)["validation"][0]
    assert result["failed"] == [] and result["validation"] == [once] * 3
    with open(out / "submission.csv") as f:
        rows = f.read().splitlines()[1:]
    assert len(rows) == min(len(once["box"]), 100)  # one scan, once


def _stitched(phantoms: dict[str, str], root, stitch_device: str) -> tuple[Any, torch.Tensor]:
    """inference.json's detector (tiny network, 32x32x16 windows: several per volume) and a loaded phantom."""
    model = os.path.join(str(root), "model.pt")
    save_tiny_model(model)
    overrides = {**TINY, "val_patch_size": [32, 32, 16], "stitch_device": stitch_device, "model_path": model}
    parser = parse("inference.json", **overrides, dataset_dir=phantoms["dir"], data_list_file_path=phantoms["datalist"])
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    item = {"image": os.path.join(phantoms["dir"], "images", "val_000.nii.gz")}
    return detector.eval(), parser.get_parsed_content("preprocessing")(item)["image"]


def test_auto_stitching_falls_back_to_the_host_when_the_device_runs_out_of_memory(
    phantoms: dict[str, str], tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``stitch_device`` "auto" stitches where the windows run; a volume out of device memory is stitched on the host,
    with the same detections as the zoo's host stitching, and the next volume is tried on the device again."""
    zoo, image = _stitched(phantoms, tmp_path, "cpu")
    auto, _ = _stitched(phantoms, tmp_path, "auto")
    assert str(zoo.inferer.device) == "cpu" and auto.inferer.device is None
    with torch.no_grad():
        expected = zoo([image], use_inferer=True)[0]
        assert len(expected["box"]) > 0
        monai_forward = MonaiRetinaNetDetector.forward
        seen: list[Any] = []

        def out_of_memory_on_the_device(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(self.inferer.device)
            if self.inferer.device is None and len(seen) == 1:
                self.anchors = [torch.zeros(1)]  # what a device run leaves cached
                raise torch.OutOfMemoryError("CUDA out of memory")
            return monai_forward(self, *args, **kwargs)

        monkeypatch.setattr(MonaiRetinaNetDetector, "forward", out_of_memory_on_the_device)
        with caplog.at_level(logging.WARNING, logger="scripts.detection.detector"):
            fallback = auto([image], use_inferer=True)[0]
        again = auto([image], use_inferer=True)[0]
    assert seen == [None, torch.device("cpu"), None]
    assert "ran out of device memory" in caplog.text and "stitched on the host" in caplog.text
    assert auto.inferer.device is None
    for result in (fallback, again):
        for key in ("box", "label", "label_scores"):
            assert torch.equal(result[key], expected[key]), key


def test_loader_workers_follow_the_cpus_of_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers() == 8 and loader_workers(cap=32) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers() == 0


@pytest.mark.slow
def test_the_inference_benchmark_runs_both_arms_to_the_same_results(tmp_path) -> None:
    """On a CPU both arms stitch on the host: the same result.json, and a table with both arms."""
    overrides = tmp_path / "cpu.json"
    overrides.write_text(json.dumps({"device": "$torch.device('cpu')", "amp": False, "val_patch_size": [32, 32, 16]}))
    configs = [config("inference.json"), os.path.join(REPO, "tests", "data", "tiny.json"), str(overrides)]
    table = compare(str(configs), [64, 64, 32], volumes=1, rounds=1, out=str(tmp_path / "bench"))
    assert "| zoo |" in table and "| ours |" in table and "speed-up" in table
    results = [
        json.loads((tmp_path / "bench" / f"result_{arm}" / "result.json").read_text()) for arm in ("zoo", "ours")
    ]
    assert results[0]["validation"] and results[0] == results[1]
