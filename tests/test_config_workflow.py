"""The bundle driven the way the model zoo's CI drives a bundle: MONAI's `ConfigWorkflow` with its workflow type,
`initialize`, `check_properties`, `run` and `finalize`, for training, training then evaluating, and inference."""

from __future__ import annotations

import json

import pytest
from bundle_helpers import TINY, bundle_paths, config, make_phantoms
from monai.bundle import ConfigWorkflow

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow


def run_workflow(workflow_type: str, config_files: list[str], **overrides) -> ConfigWorkflow:
    """Initialise, check MONAI's properties of ``workflow_type`` (none may be missing), run and finalise."""
    workflow = ConfigWorkflow(
        workflow_type=workflow_type, config_file=[config(c) for c in config_files], **bundle_paths(), **overrides
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Three epochs of training on tiny phantoms (the zoo's training case), in a bundle root of its own."""
    root = tmp_path_factory.mktemp("bundle")
    datalist = make_phantoms(str(root / "data"))
    overrides = {
        **TINY,
        "bundle_root": str(root),
        "dataset_dir": str(root / "data"),
        "data_list_file_path": datalist,
        "epochs": 3,
        "batch_size": 1,
        "val_interval": 2,
        "train#dataloader#num_workers": 0,
        "validate#dataloader#num_workers": 0,
    }
    workflow = run_workflow("train", ["train.json"], **overrides)
    return {"root": root, "overrides": overrides, "trainer": workflow.trainer}


def test_training_as_the_zoo_ci_runs_it(trained):
    # three epochs in a 10-epoch warm-up: the guard leaves the detector unjudged, and the run ends normally
    assert trained["trainer"].state.epoch == 3
    report = json.loads((trained["root"] / "eval" / "guard_report.json").read_text())
    assert report["status"] == "completed" and report["counters"]["rollbacks"] == 0
    assert (trained["root"] / "models" / "model.pt").exists()


def test_training_then_evaluating_as_the_zoo_ci_runs_it(trained):
    # the zoo's CI runs evaluate.json merged over train.json as a "train" workflow
    run_workflow("train", ["train.json", "evaluate.json"], **trained["overrides"])
    metrics = json.loads((trained["root"] / "eval" / "metrics.json").read_text())
    assert "froc" in json.dumps(metrics).lower()


def test_inference_as_the_zoo_ci_runs_it(trained):
    root = trained["root"]
    overrides = {
        **TINY,
        "bundle_root": str(root),
        "dataset_dir": trained["overrides"]["dataset_dir"],
        "data_list_file_path": trained["overrides"]["data_list_file_path"],
    }
    workflow = run_workflow("infer", ["inference.json"], **overrides)
    # the properties MONAI's inference workflows require are the objects inference runs with
    assert workflow.evaluator.dataset is workflow.dataset and workflow.evaluator.inferer is workflow.inferer
    result = json.loads((root / "eval" / "result.json").read_text())
    assert [r["image"] for r in result["validation"]] == ["images/val_000.nii.gz"] and result["failed"] == []
