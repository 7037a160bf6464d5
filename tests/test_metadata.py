"""Bundle metadata: valid against MONAI's 20240725 schema offline, versioned, and true to the network's input/output."""

from __future__ import annotations

import hashlib
import json
import os
import re

import monai.apps.utils
import pytest
import torch
from monai.bundle import verify_metadata
from packaging.version import Version
from tests.bundle_helpers import REPO, TINY, config, parse

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "meta_schema_20240725.json")
# the zoo's CPU premerge installs metadata.json's pins on Python 3.10; requirements.txt is our CI's (Python 3.11),
# whose numpy and matplotlib releases need Python 3.11: metadata.json names the newest releases for Python 3.10
PYTHON_310_PINS = {"numpy": "2.2.6", "matplotlib": "3.10.9"}
# the model zoo's published LUNA16 weights, as its models/lung_nodule_ct_detection/large_files.yml gives them
ZOO_FILES = (
    "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/model_lung_nodule_ct_detection"
)


@pytest.fixture(scope="module")
def metadata() -> dict:
    with open(config("metadata.json")) as f:
        return json.load(f)


def test_verify_metadata_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", no_download)
    with open(SCHEMA, "rb") as f:
        md5 = hashlib.md5(f.read()).hexdigest()
    verify_metadata(meta_file=config("metadata.json"), filepath=SCHEMA, hash_val=md5, hash_type="md5")


def test_version_and_packages(metadata: dict) -> None:
    assert metadata["monai_version"] == "1.6.1"
    requirements = os.path.join(REPO, "requirements.txt")
    with open(requirements) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line)
    for name, version in metadata["required_packages_version"].items():
        assert version == PYTHON_310_PINS.get(name, pins[name]), name
    assert metadata["pytorch_version"] == pins["torch"]
    assert metadata["numpy_version"] == PYTHON_310_PINS["numpy"]
    assert "numpy" not in pins and Version(pins["matplotlib"]) > Version(PYTHON_310_PINS["matplotlib"])


def test_changelog_continues_the_zoo_s(metadata: dict) -> None:
    versions = list(metadata["changelog"])
    # the zoo's ci/utils.py takes the latest version as the last of the sorted strings
    assert metadata["version"] == versions[0] == sorted(versions)[-1] == str(max(map(Version, versions))) == "1.1.0"
    assert versions == sorted(versions, key=Version, reverse=True)
    zoo = [v for v in versions if Version(v) <= Version("0.6.8")]
    assert len(zoo) == 29 and zoo[0] == "0.6.8" and zoo[-1] == "0.1.0"
    assert metadata["changelog"]["0.6.8"] == "update issue for IgniteInfo"
    assert metadata["changelog"]["0.1.0"] == "complete the model package"


def test_eval_metrics_name_their_model(metadata: dict) -> None:
    zoo = metadata["eval_metrics"]["luna16_fold0_zoo_weights"]
    assert "large_files.yml" in zoo["description"] and "fold 0" in zoo["description"]
    assert zoo["mAP_IoU_0.10_0.50_0.05_MaxDet_100"] == 0.852 and zoo["AP_IoU_0.10_MaxDet_100"] == 0.858
    assert zoo["mAR_IoU_0.10_0.50_0.05_MaxDet_100"] == 0.998 and zoo["AR_IoU_0.10_MaxDet_100"] == 1.0
    assert "phantoms" in metadata["eval_metrics"]["phantom_demo"]["description"]


def test_large_files_are_the_zoo_s_weights() -> None:
    # the zoo reads it with PyYAML (ci/utils.py download_large_files), which the bundle does not need: its entries
    # are flat `key: "value"` lines, each starting at "- path"
    with open(os.path.join(REPO, "large_files.yml")) as f:
        text = f.read()
    assert text.startswith("large_files:\n")
    entries = [dict(re.findall(r'(\w+): "([^"]*)"', entry)) for entry in text.split("\n- ")[1:]]
    files = {f["path"]: f for f in entries}
    assert set(files) == {"models/model.pt", "models/model.ts"}
    assert files["models/model.pt"]["url"] == ZOO_FILES + ".pt"
    assert files["models/model.ts"]["url"] == ZOO_FILES + ".ts"
    assert files["models/model.pt"]["hash_val"] == "b2e732a7c2786e2f8398fa45293b1e73"
    assert files["models/model.ts"]["hash_val"] == "f5567e1c74b41964b2a0b19ea855f3b0"
    assert {f["hash_type"] for f in files.values()} == {"md5"}


def test_network_matches_declared_io(metadata: dict) -> None:
    fmt = metadata["network_data_format"]
    image = fmt["inputs"]["image"]
    n = 2
    shape = [eval(str(s), {"n": n}) for s in image["spatial_shape"]]
    parser = parse("inference.json", **TINY)
    network = parser.get_parsed_content("network_def").eval()
    x = torch.rand(1, image["num_channels"], *shape, dtype=getattr(torch, image["dtype"]))
    lo, hi = image["value_range"]
    assert float(x.min()) >= lo and float(x.max()) <= hi
    with torch.no_grad():
        out = network(x)
    num_classes = parser.get_parsed_content("num_classes")
    num_anchors = parser.get_parsed_content("network_def#num_anchors")
    assert set(out) == set(fmt["outputs"]) == {"classification", "box_regression"}
    per_anchor = {"classification": num_classes, "box_regression": 6}
    for key, spec in fmt["outputs"].items():
        assert len(out[key]) == spec["num_levels"]
        assert spec["num_channels"] == num_anchors * per_anchor[key]
        for level, tensor in enumerate(out[key]):
            expected = [eval(str(s), {"n": n}) for s in spec["level_spatial_shapes"][level]]
            assert list(tensor.shape) == [1, spec["num_channels"], *expected], (key, level)
            assert tensor.dtype == getattr(torch, spec["dtype"])
        assert spec["level_spatial_shapes"][0] == spec["spatial_shape"]
