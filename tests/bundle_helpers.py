"""Helpers for the evaluate / inference / export tests: tiny-network overrides, tiny phantoms, a saved tiny model."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from monai.bundle import ConfigParser
from scripts.data.phantoms import generate_dataset
from scripts.tools.benchmark_inference import save_untrained

__all__ = [
    "CONFIGS",
    "REPO",
    "TINY",
    "config",
    "bundle_paths",
    "make_phantoms",
    "parse",
    "save_tiny_model",
    "tiny_bundle",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# the one-block-per-stage ResNet with an 8-channel FPN of tests/data/tiny.json: the bundle's network structure,
# small enough for a CPU test
with open(os.path.join(REPO, "tests", "data", "tiny.json")) as _f:
    _TINY_CONFIG = json.load(_f)
TINY: dict[str, Any] = {
    "backbone": _TINY_CONFIG["backbone"],
    "feature_extractor": _TINY_CONFIG["feature_extractor"],
    "val_patch_size": [64, 64, 32],
    "patch_size": [64, 64, 32],
    "num_workers": 0,
    "amp": False,
    "device": "$torch.device('cpu')",
}


def config(name: str) -> str:
    """Absolute path of ``configs/<name>``."""
    return os.path.join(CONFIGS, name)


def bundle_paths() -> dict[str, str]:
    """The ``meta_file`` and ``logging_file`` arguments of `monai.bundle.run`, absolute."""
    return {"meta_file": config("metadata.json"), "logging_file": config("logging.conf")}


def parse(*names: str, **overrides: Any) -> ConfigParser:
    """A parser of the named configs merged in order, with ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config([config(n) for n in names])
    parser.update(overrides)
    return parser


def make_phantoms(out_dir: str) -> str:
    """Two training and one validation phantom of 64 x 64 x 32 voxels in ``out_dir``; returns the datalist path."""
    return generate_dataset(out_dir, num_train=2, num_val=1, shape=(64, 64, 32), progress=False)


def save_tiny_model(path: str, seed: int = 0) -> torch.nn.Module:
    """
    Build the tiny ``network_def`` of inference.json, save its state dict to ``path`` and return it (eval mode).
    The classification bias is set to 0 (prior 0.5 instead of 0.01), so that the untrained network returns boxes.
    """
    torch.manual_seed(seed)
    network = parse("inference.json", **TINY).get_parsed_content("network_def")
    save_untrained(network, path)
    return network.eval()


def tiny_bundle(root: str) -> dict[str, Any]:
    """
    Tiny phantoms in ``root/data`` and a tiny untrained ``root/models/model.pt``: the overrides that run a workflow of
    the bundle on them (``bundle_root``, ``dataset_dir``, ``data_list_file_path``, `TINY` and `bundle_paths`).
    """
    data = os.path.join(root, "data")
    datalist = make_phantoms(data)
    save_tiny_model(os.path.join(root, "models", "model.pt"))
    return {"bundle_root": root, "dataset_dir": data, "data_list_file_path": datalist, **TINY, **bundle_paths()}
