"""Bundle metadata: valid against MONAI's 20240725 schema offline, versioned, and true to the network's input/output."""

from __future__ import annotations

import hashlib
import json
import os

import monai.apps.utils
import pytest
import torch
from monai.bundle import verify_metadata

from tests.bundle_helpers import REPO, TINY, config, parse

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "meta_schema_20240725.json")


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
    assert metadata["version"] in metadata["changelog"]
    assert metadata["monai_version"] == "1.6.1"
    requirements = os.path.join(REPO, "requirements.txt")
    with open(requirements) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line)
    for name, version in metadata["required_packages_version"].items():
        assert pins[name] == version, name
    assert metadata["pytorch_version"] == pins["torch"]


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
