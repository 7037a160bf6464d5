"""The bundle as a user drives it: configs resolve, the detector matches the zoo's, and the run IDs train end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from bundle_helpers import CONFIGS, REPO, parse
from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.networks.nets.resnet import resnet50
from monai.utils import optional_import
from scripts.data.phantoms import generate_dataset

TINY_CONFIG = "tests/data/tiny.json"
ZOO_IDS = [
    "bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "data_list_file_path", "epochs", "val_interval",
    "learning_rate", "batch_size", "patch_size", "val_patch_size", "amp", "device", "network_def", "detector",
    "optimizer", "lr_scheduler", "train#trainer", "validate#evaluator", "training", "run", "check_data", "guard",
    "guard#enabled", "guard#patience", "guard#lr_backoff", "guard#max_rollbacks", "guard#snapshot_every",
    "guard#quarantine_after", "data_check", "grad_clip_norm", "w_cls", "w_reg", "optimizer_name", "warmup_epochs",
    "lr_decay", "intensity_norm", "backbone_norm",
]  # fmt: skip


def bundle(run_id: str, root, *configs: str, check: bool = True, **overrides) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <run_id>`` on train.json + ``configs`` in a fresh process."""
    files = "[" + ",".join(repr(c) for c in ["configs/train.json", *configs]) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, "--bundle_root", str(root)]
    for key, value in overrides.items():
        cmd += [f"--{key.replace('__', '#')}", repr(value) if not isinstance(value, str) else value]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def finite_checkpoint(path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _targets(node):
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".json") and f != "metadata.json"))
def test_every_target_resolves(name):
    targets = set(_targets(json.load(open(os.path.join(CONFIGS, name)))))
    locator = ComponentLocator()
    for target in targets:
        if locator.get_component_module_name(target) is None:
            module, _, attr = target.rpartition(".")
            obj, found = optional_import(module, name=attr)
            assert found and obj is not None, f"{name}: _target_ {target} does not resolve"


def test_config_ids_and_run_ids():
    parser = parse("train.json")
    for id_ in ZOO_IDS:
        assert id_ in parser, id_
    assert parser["run"] == "@training"
    assert parser.get_parsed_content("learning_rate") == 0.01


def test_network_state_dict_keys_equal_the_zoo_model():
    network = parse("train.json").get_parsed_content("network_def")
    backbone = resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    zoo = RetinaNet(3, 1, 3, resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None), size_divisible=[16, 16, 8])
    ours, theirs = network.state_dict(), zoo.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    network.load_state_dict(theirs, strict=True)


def test_transform_chain_maps_datalist_boxes_onto_the_phantom_voxels(tmp_path):
    datalist = generate_dataset(str(tmp_path), num_train=2, num_val=1, shape=(64, 64, 32), progress=False)
    truth = json.load(open(tmp_path / "phantom_truth.json"))
    parser = ConfigParser()
    parser.read_config([os.path.join(REPO, "configs", "train.json"), os.path.join(REPO, TINY_CONFIG)])
    parser.update({"dataset_dir": str(tmp_path), "data_list_file_path": datalist, "output_dir": str(tmp_path / "eval")})
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    for item in parser.get_parsed_content("datalists")["training"]:
        out = preprocessing(item)
        name = os.path.relpath(item["image"], tmp_path)
        expected = np.array([n["voxel_box"] for n in truth[name]["nodules"]])
        np.testing.assert_allclose(out["box"].numpy(), expected, atol=1e-3)
        assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0


@pytest.mark.slow
def test_training_run_writes_checkpoints_and_reports(tmp_path):
    bundle("run", tmp_path, TINY_CONFIG)
    models, evals = tmp_path / "models", tmp_path / "eval"
    assert {"model.pt", "checkpoint_final.pt", "train_checkpoint_epoch=1.pt"} <= set(os.listdir(models))
    network = parse("train.json", **json.load(open(os.path.join(REPO, TINY_CONFIG)))).get_parsed_content("network_def")
    network.load_state_dict(torch.load(models / "model.pt"), strict=True)
    report = json.load(open(evals / "guard_report.json"))
    assert report["status"] == "completed" and report["counters"]["events"] == 0
    rows = open(evals / "train_log.csv").read().splitlines()
    assert (
        rows[0].startswith("iteration,epoch,loss,loss_cls,loss_reg,grad_norm,weight_norm,lr") and len(rows) == 1 + 4
    )  # 4 images, one per iteration
    assert json.load(open(evals / "data_check.json"))["errors"] == 0


@pytest.mark.slow
def test_volumes_smaller_than_the_patch_are_padded(tmp_path):
    bundle("training", tmp_path, TINY_CONFIG, patch_size=[96, 96, 48])
    assert (tmp_path / "models" / "checkpoint_final.pt").exists()


@pytest.mark.slow
def test_stress_reproduces_the_crash_without_the_guard_and_recovers_with_it(tmp_path):
    data = tmp_path / "data"
    generate_dataset(str(data), num_train=12, num_val=2, shape=(64, 64, 32), progress=False)
    stress = ["configs/demo.json", "configs/stress.json"]
    # 3 epochs are too short for the guard to judge whether the detector learned: a warning, not a failure
    kw = {"dataset_dir": str(data), "epochs": 3, "val_interval": 3, "num_workers": 0}
    # the zoo's trainer: no guard and no clipping (the guard switch leaves clipping on, grad_clip_norm 0 turns it off)
    off = bundle("training", tmp_path / "off", *stress, check=False, guard__enabled=False, grad_clip_norm=0, **kw)
    assert off.returncode != 0 and "cls_logits is NaN or Inf" in off.stderr
    bundle("training", tmp_path / "on", *stress, **kw)  # the full guard: clipping keeps this run healthy
    report = json.load(open(tmp_path / "on" / "eval" / "guard_report.json"))
    assert report["status"] == "completed"
    assert finite_checkpoint(tmp_path / "on" / "models" / "checkpoint_final.pt")
    assert (tmp_path / "on" / "models" / "model.pt").exists()  # validated and saved
    # without clipping the guard alone must catch the blow-up: skip, roll back, back off, finish
    bundle("training", tmp_path / "noclip", *stress, grad_clip_norm=0, **kw)
    report = json.load(open(tmp_path / "noclip" / "eval" / "guard_report.json"))
    assert report["status"] == "completed" and report["counters"]["rollbacks"] >= 1 and report["lr_scale"] < 1
    assert finite_checkpoint(tmp_path / "noclip" / "models" / "checkpoint_final.pt")
    # the guard's counters and LR scale survive a resume
    resumed = {**kw, "epochs": 4, "resume_from": str(tmp_path / "noclip" / "models" / "checkpoint_final.pt")}
    bundle("training", tmp_path / "noclip", *stress, grad_clip_norm=0, **resumed)
    after = json.load(open(tmp_path / "noclip" / "eval" / "guard_report.json"))
    assert after["counters"]["rollbacks"] >= report["counters"]["rollbacks"] and after["lr_scale"] <= report["lr_scale"]
    assert after["events"][: len(report["events"])] == report["events"]


@pytest.mark.slow
def test_poisoned_data_is_named_by_check_data_and_excluded_from_training(tmp_path):
    import nibabel as nib

    data = tmp_path / "data"
    datalist = generate_dataset(str(data), num_train=4, num_val=1, shape=(64, 64, 32), progress=False)
    items = json.load(open(datalist))["training"]
    (data / items[0]["image"]).write_text("not an image")
    img = nib.load(data / items[1]["image"])
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), data / items[1]["image"])
    failed = bundle("check_data", tmp_path, TINY_CONFIG, check=False, dataset_dir=str(data))
    assert failed.returncode != 0
    log = failed.stdout + failed.stderr
    assert os.path.basename(items[0]["image"]) in log and os.path.basename(items[1]["image"]) in log
    bundle("training", tmp_path, TINY_CONFIG, dataset_dir=str(data))
    quarantined = {
        os.path.basename(q["image"]) for q in json.load(open(tmp_path / "eval" / "quarantine.json"))["quarantined"]
    }
    assert quarantined == {os.path.basename(items[0]["image"]), os.path.basename(items[1]["image"])}
    strict = bundle(
        "training", tmp_path / "strict", TINY_CONFIG, check=False, dataset_dir=str(data), data_check="strict"
    )
    assert strict.returncode != 0 and not (tmp_path / "strict" / "models").exists()


@pytest.mark.slow
def test_a_crash_leaves_the_final_checkpoint_and_the_guard_report(tmp_path):
    crash = {"_target_": "scripts.tools.faults.Crash", "iteration": 3, "message": "injected crash for the test"}
    result = bundle("training", tmp_path, TINY_CONFIG, check=False, epochs=2, train__extra_handlers__fault=crash)
    assert result.returncode != 0 and "injected crash for the test" in result.stderr
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    assert {"model", "optimizer", "guard", "trainer"} <= set(checkpoint) and checkpoint["trainer"]["iteration"] == 3
    report = json.load(open(tmp_path / "eval" / "guard_report.json"))
    assert report["status"] == "crashed: RuntimeError: injected crash for the test"
    assert torch.load(tmp_path / "models" / "last_good.pt", weights_only=True)["network"]  # the last good state too
