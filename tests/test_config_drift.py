"""No silent drift between configs (issue 10): inference.json is standalone (the model-zoo convention), so everything
it repeats from train.json is checked here: the preprocessing (the same image comes out of both), the network, the
anchors and the detector settings they share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bundle_helpers import TINY, config, parse
from scripts.data.phantoms import generate_dataset

TRAIN = json.loads(Path(config("train.json")).read_text())
INFER = json.loads(Path(config("inference.json")).read_text())

# top-level IDs inference.json repeats from train.json, which must stay equal as written
SHARED_IDS = [
    "bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "data_list_file_path",  # the defaults of data and model
    "num_classes", "patch_size", "val_patch_size", "intensity_norm", "backbone_norm",  # preprocessing, network
    "stitch_device",  # sliding-window stitching at validation and inference
    "anchor_generator", "backbone", "feature_extractor", "network_def", "detector",
]  # fmt: skip
# the detector settings both configs apply (train.json also sets the matcher and sampler of training)
SHARED_DETECTOR_OPS = ("set_target_keys", "set_box_selector_parameters", "set_sliding_window_inferer")
BOX_KEYS = {"box", "label"}


@pytest.mark.parametrize("key", SHARED_IDS)
def test_shared_ids_are_equal(key: str) -> None:
    assert INFER[key] == TRAIN[key], f"inference.json's {key} differs from train.json's"


def _without_box_keys(transforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The transforms with the box and label keys taken out (inference has no boxes); those left with no key go."""
    out = []
    for t in transforms:
        keys = [t["keys"]] if isinstance(t.get("keys"), str) else list(t.get("keys", []))
        kept = [k for k in keys if k not in BOX_KEYS]
        if keys and not kept:
            continue
        out.append({**t, "keys": kept[0] if len(kept) == 1 else kept} if keys else t)
    return out


def test_loading_transforms_are_train_json_s_without_the_boxes() -> None:
    assert INFER["loading_transforms"] == _without_box_keys(TRAIN["loading_transforms"])


def test_pad_and_hu_window_are_train_json_s() -> None:
    assert INFER["pad"] == TRAIN["train"]["pad"]
    assert INFER["intensity_transforms"]["hu_window"] == TRAIN["intensity_transforms"]["hu_window"]
    assert set(INFER["intensity_transforms"]) == set(TRAIN["intensity_transforms"])


def _ops(config_ops: list[str]) -> dict[str, str]:
    """``detector_ops`` by method name (``$@detector.set_x(...)`` -> ``set_x``)."""
    return {op.split("(")[0].rsplit(".", 1)[-1]: op for op in config_ops}


def test_detector_ops_are_train_json_s() -> None:
    """The same settings; inference's window is the zoo's ``infer_patch_size``, train.json's ``val_patch_size``
    unless a user overrides it."""
    train, infer = _ops(TRAIN["detector_ops"]), _ops(INFER["detector_ops"])
    assert set(infer) == set(SHARED_DETECTOR_OPS)
    assert INFER["infer_patch_size"] == "@val_patch_size"
    train["set_sliding_window_inferer"] = train["set_sliding_window_inferer"].replace(
        "roi_size=@val_patch_size", "roi_size=@infer_patch_size"
    )
    for name in SHARED_DETECTOR_OPS:
        assert infer[name] == train[name], name


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("drift")
    datalist = json.loads(Path(generate_dataset(str(folder), num_train=1, num_val=0, progress=False)).read_text())
    item = datalist["training"][0]
    return {**item, "image": str(folder / item["image"])}


@pytest.mark.parametrize("norm", sorted(TRAIN["intensity_transforms"]))
def test_the_same_image_comes_out_of_validation_and_inference(phantom: dict[str, Any], norm: str) -> None:
    """train.json's validation preprocessing and inference.json's give the detector the same tensor."""
    train = parse("train.json", intensity_norm=norm).get_parsed_content("validate#preprocessing")(dict(phantom))
    infer = parse("inference.json", intensity_norm=norm).get_parsed_content("preprocessing")(
        {"image": phantom["image"]}
    )
    a, b = train["image"], infer["image"]
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine))
    torch.testing.assert_close(a.as_tensor(), b.as_tensor(), atol=1e-6, rtol=0)


def _detector(name: str, **overrides: Any) -> Any:
    parser = parse(name, **TINY, **overrides)
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    return detector


def test_the_detectors_are_set_alike() -> None:
    """Built from each config (the tiny test network), the detectors have the same network, anchors, box selector,
    sliding-window inferer and target keys."""
    torch.manual_seed(0)
    train = _detector("train.json")
    torch.manual_seed(0)
    infer = _detector("inference.json", network="$@network_def.to(@device)")
    assert type(train) is type(infer)
    a, b = train.network.state_dict(), infer.network.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(train.anchor_generator.cell_anchors, infer.anchor_generator.cell_anchors, strict=True):
        assert torch.equal(x, y)
    assert vars(train.box_selector) == vars(infer.box_selector)
    for key in ("roi_size", "overlap", "sw_batch_size", "mode", "device", "sw_device", "padding_mode"):
        assert getattr(train.inferer, key) == getattr(infer.inferer, key), key
    assert (train.target_box_key, train.target_label_key) == (infer.target_box_key, infer.target_label_key)
