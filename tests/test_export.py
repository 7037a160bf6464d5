"""TorchScript export of network_def from inference.json, as the model zoo checks it, and eager/scripted agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser
from tests.bundle_helpers import REPO, TINY, config, save_tiny_model

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow


def test_ckpt_export_matches_eager(tmp_path) -> None:
    ckpt = str(tmp_path / "models" / "model.pt")
    ts_path = str(tmp_path / "models" / "model.ts")
    eager = save_tiny_model(ckpt, seed=1)
    args_file = tmp_path / "tiny.json"
    args_file.write_text(json.dumps({k: TINY[k] for k in ("backbone", "feature_extractor")}))
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", ts_path,
        "--ckpt_file", ckpt,
        "--meta_file", config("metadata.json"),
        "--config_file", config("inference.json"),
        "--bundle_root", str(tmp_path),
        "--args_file", str(args_file),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(ts_path, _extra_files=extra)
    assert (
        json.loads(extra["metadata.json"])["version"]
        == ConfigParser.load_config_file(config("metadata.json"))["version"]
    )
    scripted.eval()
    volume = torch.rand(1, 1, 64, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = eager(volume), scripted(volume)
    assert set(got) == set(expected) == {"classification", "box_regression"}
    for key in expected:
        assert len(got[key]) == len(expected[key]) == 3
        for a, b in zip(expected[key], got[key], strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert os.path.getsize(ts_path) > 0
