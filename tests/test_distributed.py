"""Two-process DDP on CPU (gloo, torchrun): the guard's decisions are the same on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(TORCHRUN + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_worker(out, *args: str) -> tuple[dict, dict]:
    torchrun([os.path.join(REPO, "tests", "ddp_worker.py"), str(out), *args])
    return tuple(torch.load(out / f"rank{r}.pt") for r in (0, 1))


def assert_identical(a: dict, b: dict) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"]))
    assert all(torch.isfinite(x).all() for x in a["params"])


def test_normal_run_keeps_ranks_identical(tmp_path):
    a, b = run_worker(tmp_path, "--epochs", "2")
    assert a["events"] == b["events"] == [None] * 8  # 8 images, 4 per rank, 2 epochs
    assert_identical(a, b)  # the ranks started from different random weights: rank 0's were broadcast


def test_inf_on_one_rank_skips_the_step_on_both(tmp_path):
    a, b = run_worker(tmp_path, "--epochs", "2", "--inf-rank", "1", "--inf-iterations", "3")
    assert a["events"][2] == b["events"][2] == "grad"
    assert a["events"].count("grad") == b["events"].count("grad") == 1
    assert a["counters"] == b["counters"] and a["counters"]["skipped_steps"] == 1
    assert_identical(a, b)


def test_rollback_on_one_rank_trigger_rolls_back_both(tmp_path):
    a, b = run_worker(tmp_path, "--epochs", "3", "--inf-rank", "0", "--inf-iterations", "4", "5", "6")
    assert a["counters"]["rollbacks"] == b["counters"]["rollbacks"] == 1
    assert a["lr"] == b["lr"] == pytest.approx(0.01 * 0.1)
    assert_identical(a, b)


def test_bundle_multi_gpu_config_runs(tmp_path):
    configs = "['configs/train.json','tests/data/tiny.json','configs/multi_gpu_train.json']"
    torchrun(["-m", "monai.bundle", "run", "training", "--config_file", configs, "--bundle_root", str(tmp_path)])
    assert (tmp_path / "models" / "model.pt").exists() and (tmp_path / "models" / "checkpoint_final.pt").exists()
    assert (tmp_path / "eval" / "guard_report.json").exists()
    state = torch.load(tmp_path / "models" / "model.pt")
    assert not any(k.startswith("module.") for k in state)


def test_multi_gpu_config_disables_exactly_the_rank0_writers():
    # multi_gpu_train.json disables handlers by their position in train.json's lists (the model zoo's way): a
    # reordered list would silently let every rank write logs and checkpoints, or silence rank 0
    from bundle_helpers import config, parse

    train = parse("train.json")
    with open(config("multi_gpu_train.json")) as f:
        disabled = [k.removesuffix("#_disabled_") for k in json.load(f) if k.endswith("#_disabled_")]
    targets = {k: train[f"{k}#_target_"] for k in disabled if "#handlers#" in k}
    assert targets == {
        "train#handlers#3": "StatsHandler",
        "train#handlers#4": "TensorBoardStatsHandler",
        "validate#handlers#0": "StatsHandler",
        "validate#handlers#1": "TensorBoardStatsHandler",
        "validate#handlers#2": "CheckpointSaver",
    }
    assert "train#checkpointer" in disabled
