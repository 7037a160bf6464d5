"""Model selection never on the test fold: training validates, picks model.pt and is judged on a part of ``training``
(or the datalist's ``selection`` list) and never opens ``validation``; evaluation reads ``validation``."""

from __future__ import annotations

import json
import os

import pytest
from bundle_helpers import parse
from scripts.data.phantoms import generate_dataset
from scripts.data.selection import NoSelectionImages, selection_count, training_datalists
from scripts.errors import UserError
from test_bundle import TINY_CONFIG, bundle


@pytest.mark.parametrize(
    ("num_training", "expected"), [(1, 0), (2, 1), (4, 1), (19, 1), (20, 1), (21, 2), (24, 2), (100, 5), (639, 32)]
)
def test_the_zoo_rule_keeps_the_last_five_percent(num_training, expected):
    # the zoo trains on training[: int(0.95 * n)] and selects on the rest
    assert selection_count(num_training, 0.05) == expected
    assert num_training - selection_count(num_training, 0.05) in (int(0.95 * num_training), num_training)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_a_fraction_outside_the_open_interval_is_refused(fraction):
    with pytest.raises(UserError, match="selection_fraction"):
        selection_count(10, fraction)


def _fold_file(tmp_path, selection: list | None = None, num_training: int = 4) -> tuple[str, str, dict]:
    """A zoo-style fold file over phantoms: ``training`` real, ``validation`` naming images that do not exist."""
    data = tmp_path / "data"
    path = generate_dataset(str(data), num_train=num_training, num_val=0, shape=(64, 64, 32), progress=False)
    with open(path) as f:
        datalist = json.load(f)
    fold = {"training": datalist["training"]}
    if selection is not None:
        fold["selection"] = selection
    fold["validation"] = [{"image": "absent/test_scan.nii.gz", "box": [[1.0, 2.0, 3.0, 6.0, 6.0, 6.0]], "label": [0]}]
    fold_path = str(tmp_path / "dataset_fold0.json")
    with open(fold_path, "w") as f:
        json.dump(fold, f)
    return fold_path, str(data), datalist


def _screen(fold_path: str, data: str, tmp_path, policy: str = "exclude") -> dict:
    loader = parse("train.json").get_parsed_content("loader")
    return training_datalists(policy, fold_path, data, loader=loader, patch_size=None, output_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("policy", ["exclude", "strict", "off"])
def test_without_a_selection_list_the_end_of_training_selects_and_validation_is_never_read(tmp_path, policy):
    fold_path, data, datalist = _fold_file(tmp_path)
    lists = _screen(fold_path, data, tmp_path, policy)
    assert sorted(lists) == ["selection", "training"]
    names = [os.path.join(data, item["image"]) for item in datalist["training"]]
    assert [item["image"] for item in lists["training"]] == names[:3]
    assert [item["image"] for item in lists["selection"]] == names[3:]
    if policy != "off":
        with open(tmp_path / "out" / "data_check.json") as f:
            report = json.load(f)
        assert "absent/test_scan" not in json.dumps(report)


def test_a_named_selection_list_is_used_as_it_is_and_training_keeps_every_image(tmp_path):
    fold_path, data, datalist = _fold_file(tmp_path, selection=None)
    with open(fold_path) as f:
        fold = json.load(f)
    fold["selection"] = fold["training"][:1]
    fold["training"] = fold["training"][1:]
    with open(fold_path, "w") as f:
        json.dump(fold, f)
    lists = _screen(fold_path, data, tmp_path)
    assert [item["image"] for item in lists["selection"]] == [os.path.join(data, datalist["training"][0]["image"])]
    assert len(lists["training"]) == 3


def test_an_empty_selection_list_is_named(tmp_path):
    fold_path, data, _ = _fold_file(tmp_path, selection=[])
    with pytest.raises(NoSelectionImages, match='"selection" list has no usable image'):
        _screen(fold_path, data, tmp_path)


def test_one_training_image_trains_and_selects_on_itself(tmp_path, caplog):
    fold_path, data, _ = _fold_file(tmp_path, num_training=1)
    lists = _screen(fold_path, data, tmp_path)
    assert lists["training"] == lists["selection"] and len(lists["training"]) == 1
    assert "trains and selects the model on the same image" in caplog.text


def test_phantom_datalists_name_their_selection_set(tmp_path):
    path = generate_dataset(str(tmp_path), num_train=2, num_val=1, shape=(64, 64, 32), progress=False)
    with open(path) as f:
        datalist = json.load(f)
    assert list(datalist) == ["training", "selection", "validation"]
    images = [[item["image"] for item in datalist[s]] for s in datalist]
    assert [len(v) for v in images] == [2, 1, 1]
    assert len({i for v in images for i in v}) == 4  # disjoint
    # the training and test cases do not depend on how many selection cases there are
    generate_dataset(str(tmp_path / "b"), num_train=2, num_val=1, shape=(64, 64, 32), progress=False, num_select=3)
    for name in images[0] + images[2]:
        assert (tmp_path / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.slow
def test_training_on_a_fold_whose_test_images_do_not_exist_selects_model_pt(tmp_path):
    fold_path, data, _ = _fold_file(tmp_path)
    root = tmp_path / "bundle"
    result = bundle("training", root, TINY_CONFIG, dataset_dir=data, data_list_file_path=fold_path, epochs=1)
    assert os.path.isfile(root / "models" / "model.pt")
    assert "model selection on the last 1 of 4 training images" in result.stderr + result.stdout
    assert "absent/test_scan" not in result.stderr + result.stdout
    assert "test_scan" not in (root / "eval" / "data_check.json").read_text()
