"""The 10-fold tool: a real fold trained, inferred and scored; resuming skips what finished; a failed stage stops."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from bundle_helpers import config, make_phantoms
from scripts.data.luna16_csv import Candidate, seriesuid_of, write_submission
from scripts.errors import UserError
from scripts.tools.luna16_folds import find_folds, fold_commands, held_out_scans, run_folds

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow

# the demo network for one epoch on the 64 x 64 x 32 phantoms
FAST = ["--epochs", "1", "--val_interval", "1", "--warmup_epochs", "0", "--patch_size", "[64,64,32]"]
FAST += ["--val_patch_size", "[64,64,32]", "--num_workers", "0", "--cache_rate", "0"]


def fold_data(root: str, folds: tuple[int, ...]) -> tuple[str, str]:
    """Phantoms with one fold datalist per fold (the same split) and LUNA16 tables of their validation boxes."""
    data, raw = os.path.join(root, "data"), os.path.join(root, "raw")
    with open(make_phantoms(data)) as f:
        datalist = json.load(f)
    for k in folds:
        with open(os.path.join(data, f"dataset_fold{k}.json"), "w") as f:
            json.dump(datalist, f)
    os.makedirs(raw)
    with open(os.path.join(raw, "annotations.csv"), "w") as f:
        f.write("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
        for item in datalist["validation"]:
            f.writelines(f"{seriesuid_of(item['image'])},{b[0]},{b[1]},{b[2]},{max(b[3:])}\n" for b in item["box"])
    with open(os.path.join(raw, "seriesuids.csv"), "w") as f:
        f.writelines(seriesuid_of(i["image"]) + "\n" for i in datalist["validation"])
    return data, raw


def test_a_fold_end_to_end_then_resumed(tmp_path) -> None:
    data, raw = fold_data(str(tmp_path), (0,))
    out = str(tmp_path / "runs")
    result = run_folds(data, raw, out, config_files=[config("demo.json")], extra_args=FAST, bootstrap_samples=10)
    assert os.path.getsize(os.path.join(out, "fold0", "models", "model.pt")) > 0
    with open(os.path.join(out, "fold0", "fold.json")) as f:
        assert json.load(f)["done"] == ["training", "inference"]
    with open(os.path.join(out, "luna16_froc.json")) as f:
        written = json.load(f)
    assert written["cpm"] == result["cpm"] and written["num_scans"] == 1 and written["num_nodules"] == 2
    assert written["files"]["submission"] == [os.path.join(out, "fold0", "infer", "submission.csv")]
    ran: list[list[str]] = []
    again = run_folds(data, raw, out, runner=lambda cmd: ran.append(cmd) or 0, bootstrap_samples=10)
    assert ran == [] and again["sensitivity"] == result["sensitivity"]


def test_failed_stage_stops_and_the_next_call_resumes_there(tmp_path) -> None:
    data, raw = fold_data(str(tmp_path), (0, 1))
    out = str(tmp_path / "runs")
    submission = [Candidate("val_000", (0.0, 0.0, 0.0), 0.5)]
    ran: list[tuple[str, str]] = []

    def runner(fail_at: str | None):
        def run(cmd: list[str]) -> int:
            stage = cmd[cmd.index("run") + 1]
            fold = os.path.basename(os.path.dirname(cmd[cmd.index("--output_dir") + 1]))
            ran.append((fold, stage))
            if f"{fold}/{stage}" == fail_at:
                return 3
            if stage == "inference":
                write_submission(os.path.join(cmd[cmd.index("--output_dir") + 1], "submission.csv"), submission)
            return 0

        return run

    with pytest.raises(UserError, match="fold 1: inference exited 3"):
        run_folds(data, raw, out, runner=runner("fold1/inference"), bootstrap_samples=0)
    assert ran == [("fold0", "training"), ("fold0", "inference"), ("fold1", "training"), ("fold1", "inference")]
    ran.clear()
    result = run_folds(data, raw, out, runner=runner(None), bootstrap_samples=0)
    assert ran == [("fold1", "inference")]
    assert result["num_candidates"] == 2 and result["num_scans"] == 1  # both folds' files read together
    shutil.rmtree(os.path.join(out, "fold0"))
    ran.clear()
    run_folds(data, raw, out, folds=[0], runner=runner(None), bootstrap_samples=0)
    assert ran == [("fold0", "training"), ("fold0", "inference")]


def test_commands_and_missing_datalists(tmp_path) -> None:
    data, raw = fold_data(str(tmp_path), (3,))
    with pytest.raises(UserError, match=r"dataset_fold4\.json does not exist"):
        run_folds(data, raw, str(tmp_path / "runs"), folds=[3, 4], runner=lambda cmd: 0)
    fold = find_folds(data, None, str(tmp_path / "runs"))[0]
    assert fold.fold == 3
    commands = fold_commands(fold, data, ["/x/demo.json"], ["--epochs", "2"])
    train, infer = commands["training"], commands["inference"]
    for cmd in (train, infer):
        assert cmd[cmd.index("--data_list_file_path") + 1] == os.path.join(data, "dataset_fold3.json")
        assert cmd[-2:] == ["--epochs", "2"] and "/x/demo.json" in cmd[cmd.index("--config_file") + 1]
    assert train[train.index("--ckpt_dir") + 1] == os.path.join(str(tmp_path), "runs", "fold3", "models")
    assert infer[infer.index("--data_list_key") + 1] == "validation"
    assert infer[infer.index("--model_path") + 1] == os.path.join(str(tmp_path), "runs", "fold3", "models", "model.pt")


def test_a_partial_run_scores_the_held_out_scans_of_its_folds_only(tmp_path) -> None:
    data, raw = fold_data(str(tmp_path), (0, 1))
    with open(os.path.join(data, "dataset_fold1.json")) as f:
        fold1 = json.load(f)
    fold1["validation"] = [{**fold1["validation"][0], "image": "images/other_scan.nii.gz"}]
    with open(os.path.join(data, "dataset_fold1.json"), "w") as f:
        json.dump(fold1, f)
    with open(os.path.join(raw, "seriesuids.csv"), "a") as f:
        f.write("other_scan\n")
    out = str(tmp_path / "runs")

    def runner(cmd: list[str]) -> int:
        if cmd[cmd.index("run") + 1] == "inference":
            write_submission(os.path.join(cmd[cmd.index("--output_dir") + 1], "submission.csv"), [])
        return 0

    assert held_out_scans(find_folds(data, [1], out)) == ["other_scan"]
    assert run_folds(data, raw, out, folds=[0], runner=runner, bootstrap_samples=0)["num_scans"] == 1
    assert run_folds(data, raw, out, runner=runner, bootstrap_samples=0)["num_scans"] == 2  # seriesuids.csv
