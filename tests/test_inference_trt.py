"""configs/inference_trt.json (the zoo's TensorRT inference) without TensorRT: what it changes in inference.json, and
the pipeline around the engine, run with a traced TorchScript stand-in that, like a TensorRT module, has a fixed
input shape, list outputs and none of the network's Python attributes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from tests.bundle_helpers import TINY, bundle_paths, config, make_phantoms, parse, save_tiny_model

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow

INFERENCE_IMPORTS = json.loads(Path(config("inference.json")).read_text())["imports"]


def test_merged_over_inference_json() -> None:
    parser = parse("inference.json", "inference_trt.json")
    assert parser["imports"] == [*INFERENCE_IMPORTS, "$import torch_tensorrt"]
    assert parser["network_def"] == "$torch.jit.load(@ckpt_dir + '/model_trt.ts')"
    assert parser["amp"] is False and parser["force_sliding_window"] is True and parser["load_pretrain"] is False
    # the attributes a TensorRT module lacks: equal to the network's own
    network = parse("inference.json").get_parsed_content("network_def")
    assert parser["detector#spatial_dims"] == network.spatial_dims
    assert parser["detector#size_divisible"] == list(network.size_divisible)
    assert parser.get_parsed_content("detector#num_classes") == network.num_classes


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """result.json of inference.json from model.pt, and of inference_trt.json from the same weights traced."""
    data = str(tmp_path_factory.mktemp("phantoms"))
    datalist = make_phantoms(data)
    root = str(tmp_path_factory.mktemp("bundle"))
    network = save_tiny_model(os.path.join(root, "models", "model.pt"))
    network.use_list_output = True  # as trt_export's --network_def#use_list_output True
    window = torch.rand(1, 1, *TINY["val_patch_size"])
    torch.jit.trace(network, window).save(os.path.join(root, "models", "model_trt.ts"))
    common = {"bundle_root": root, "dataset_dir": data, "data_list_file_path": datalist, **TINY, **bundle_paths()}
    out = {}
    for name, files, extra in (
        ("pt", [config("inference.json")], {"force_sliding_window": True}),
        ("trt", [config("inference.json"), config("inference_trt.json")], {"imports": INFERENCE_IMPORTS}),
    ):
        run("inference", config_file=files, output_dir=os.path.join(root, name), **common, **extra)
        with open(os.path.join(root, name, "result.json")) as f:
            out[name] = json.load(f)
    return out


def test_trt_config_pipeline_gives_the_eager_boxes(results: dict[str, dict]) -> None:
    assert results["trt"]["failed"] == [] and len(results["trt"]["validation"]) == 1
    eager, traced = results["pt"]["validation"][0], results["trt"]["validation"][0]
    assert traced["image"] == eager["image"] == "images/val_000.nii.gz"
    assert len(traced["box"]) == len(eager["box"]) > 0
    np.testing.assert_allclose(traced["label_scores"], eager["label_scores"], atol=1e-5)
    np.testing.assert_allclose(traced["box"], eager["box"], atol=1e-3)
    assert traced["label"] == eager["label"]
