"""Bad input anywhere gets one clear line, and nothing is lost (issue 12).

One datalist holds every bad input of tests/test_data_check.py (each in its own folder) beside good phantoms.
``check_data``, ``training`` (policies exclude and strict) and ``inference`` run on it as a user runs them, each in a
fresh process, and must name every bad file with its problem on one line, print no traceback, keep the good cases and
leave their results on disk. Setup errors (no inputs, a damaged or foreign model, a missing or mistyped datalist, a
wrong datalist key) end in one line that names the file, in every run ID; phantoms are generated only where no one's
data is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import REPO, TINY, bundle_paths, config, make_phantoms, save_tiny_model
from monai.bundle import run
from scripts.data.phantoms import ensure_dataset, generate_dataset
from scripts.errors import UserError
from test_data_check import BAD_INPUTS, item, write_volume

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow

TINY_CONFIG = os.path.join(REPO, "tests", "data", "tiny.json")
# problems of the datalist entry, not of the image: inference, which reads no boxes, runs these images
ENTRY_PROBLEMS = {
    "box_size",
    "box_values",
    "box_outside",
    "label_count",
    "label_range",
    "bad_box_type",
    "bad_label_type",
}
ENTRY_PROBLEMS |= {"missing_key"}


@dataclass(frozen=True)
class Case:
    """
    One input of the shared datalist.

    Args:
        name: the builder that made it.
        item: its datalist entry.
        image: its image, absolute.
        problem: the problem the check must name (``""``: none).
        severity: ``"error"``, ``"warning"`` or ``""``.
    """

    name: str
    item: dict
    image: str
    problem: str
    severity: str


@dataclass(frozen=True)
class Matrix:
    """The shared datalist: ``root`` (bundle root), ``data`` (dataset_dir, the good phantoms), ``datalist``."""

    root: Path
    data: Path
    datalist: Path
    cases: list[Case]

    def with_problem(self, severity: str) -> list[Case]:
        return [c for c in self.cases if c.severity == severity]


def monai_run(run_id: str, configs: list[str], root: Path, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id>`` on ``configs`` with ``--key value`` overrides, in a fresh process."""
    files = "[" + ",".join(repr(c) for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, "--bundle_root", str(root)]
    for key, value in {**bundle_paths(), **overrides}.items():
        cmd += [f"--{key.replace('__', '#')}", value if isinstance(value, str) else repr(value)]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}  # tiny tensors: a second thread only contends
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def named_on_one_line(output: str, cases: list[Case], also: str = "") -> None:
    """Each case's file and problem (and ``also``) appear together on one line of ``output``."""
    lines = output.splitlines()
    for c in cases:
        assert any(c.image in line and c.problem in line and also in line for line in lines), (c, output[-3000:])


def last_line(result: subprocess.CompletedProcess) -> str:
    """The line a failed run ends with (Python prints a `SystemExit` message to stderr)."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-5000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    root = tmp_path_factory.mktemp("matrix")
    data = root / "data"
    datalist_path = Path(generate_dataset(str(data), num_train=3, num_val=1, shape=(64, 64, 32), progress=False))
    datalist = json.loads(datalist_path.read_text())
    cases = []
    for make in BAD_INPUTS:
        folder = root / "cases" / make.__name__
        folder.mkdir(parents=True)
        bad, problem, severity, _ = make(folder)
        cases.append(Case(make.__name__, bad, os.path.abspath(bad["image"]), problem, severity))
    (root / "outside").mkdir()
    write_volume(root / "outside" / "climbs.nii.gz")
    climbs = item("../outside/climbs.nii.gz")
    cases.append(Case("climbs_out", climbs, str(root / "outside" / "climbs.nii.gz"), "outside_dataset_dir", "warning"))
    datalist["training"] += [c.item for c in cases]
    datalist_path.write_text(json.dumps(datalist))
    return Matrix(root, data, datalist_path, cases)


def test_check_data_names_every_bad_file(matrix: Matrix) -> None:
    done = monai_run(
        "check_data", ["configs/train.json", TINY_CONFIG], matrix.root / "check", dataset_dir=str(matrix.data)
    )
    assert done.returncode != 0
    line = last_line(done)
    assert line.startswith("data check failed:") and f"errors in {len(matrix.with_problem('error'))} items" in line
    named_on_one_line(done.stdout, matrix.with_problem("error"), "ERROR")
    named_on_one_line(done.stdout, matrix.with_problem("warning"), "WARNING")
    report = json.loads((matrix.root / "check" / "eval" / "data_check.json").read_text())
    assert report["items"] == {"training": 3 + len(matrix.cases), "selection": 1, "validation": 1}
    good = {str(matrix.data / f"images/{n}.nii.gz") for n in ("train_000", "train_001", "train_002", "val_000")}
    assert not good & {f["image"] for f in report["findings"]}


def test_training_excludes_every_bad_case_and_trains_on_the_rest(matrix: Matrix) -> None:
    root = matrix.root / "exclude"
    done = monai_run("training", ["configs/train.json", TINY_CONFIG], root, dataset_dir=str(matrix.data))
    assert done.returncode == 0, done.stderr[-5000:]
    assert "Traceback" not in done.stdout + done.stderr
    errors = matrix.with_problem("error")
    named_on_one_line(done.stdout + done.stderr, errors, "dropped")
    quarantined = {q["image"] for q in json.loads((root / "eval" / "quarantine.json").read_text())["quarantined"]}
    assert quarantined == {c.image for c in errors}
    assert (root / "models" / "checkpoint_final.pt").is_file()
    # every case with a warning only, and the good phantoms, took part in training: 3 + warnings per epoch
    rows = (root / "eval" / "train_log.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 + len(matrix.with_problem("warning"))


def test_strict_training_refuses_to_start_in_one_line(matrix: Matrix) -> None:
    root = matrix.root / "strict"
    done = monai_run(
        "training", ["configs/train.json", TINY_CONFIG], root, dataset_dir=str(matrix.data), data_check="strict"
    )
    assert done.returncode != 0 and not (root / "models").exists()
    line = last_line(done)
    assert line.startswith("data check failed") and "data_check to exclude" in line
    assert str(root / "eval" / "data_check.json") in line
    named_on_one_line(done.stdout, matrix.with_problem("error"), "ERROR")


def test_inference_skips_bad_images_and_writes_the_others(matrix: Matrix) -> None:
    root = matrix.root / "infer"
    save_tiny_model(str(root / "models" / "model.pt"))
    done = monai_run(
        "inference",
        ["configs/inference.json"],
        root,
        dataset_dir=str(matrix.data),
        data_list_file_path=str(matrix.datalist),
        data_list_key="training",
        **TINY,
    )
    assert done.returncode != 0
    failed_images = [c for c in matrix.with_problem("error") if c.problem not in ENTRY_PROBLEMS]
    result_path = root / "eval" / "result.json"
    line = last_line(done)
    total = 3 + len(matrix.cases)
    assert line.startswith(f"inference failed on {len(failed_images)} of {total} images") and str(result_path) in line
    named_on_one_line(done.stdout + done.stderr, failed_images, "no result for")
    result = json.loads(result_path.read_text())
    names = [json.loads(matrix.datalist.read_text())["training"][i]["image"] for i in range(total)]
    failed = {f["image"]: f["problem"] for f in result["failed"]}
    assert failed == {c.item["image"]: c.problem for c in failed_images}
    assert [r["image"] for r in result["training"]] == [n for n in names if n not in failed]
    assert json.loads((root / "eval" / "data_check.json").read_text())["errors"] == len(failed_images)


# --- setup errors: one line naming the file, in every run ID ------------------------------------------------------


def test_a_mistyped_datalist_beside_data_is_an_error_not_phantoms(matrix: Matrix) -> None:
    before = sorted(p.name for p in matrix.data.iterdir())
    typo = matrix.data / "datalst.json"
    root = matrix.root / "typo"
    done = monai_run(
        "training",
        ["configs/train.json", TINY_CONFIG],
        root,
        dataset_dir=str(matrix.data),
        data_list_file_path=str(typo),
    )
    assert done.returncode != 0
    line = last_line(done)
    assert str(typo) in line and "check data_list_file_path" in line
    assert sorted(p.name for p in matrix.data.iterdir()) == before


def train_configs() -> list[str]:
    return [config("train.json"), TINY_CONFIG]


def exit_line(run_id: str, configs: list[str], **overrides) -> str:
    """The message a run in this process exits with (it must exit with one)."""
    with pytest.raises(SystemExit) as e:
        run(run_id, config_file=configs, **bundle_paths(), **overrides)
    message = str(e.value.code)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "run_id, extra, policy",
    [
        ("check_data", [], "exclude"),
        ("training", [], "exclude"),
        ("training", [], "off"),
        ("evaluating", ["evaluate"], "strict"),
    ],
)
def test_wrong_datalist_key(tmp_path: Path, run_id: str, extra: list[str], policy: str) -> None:
    datalist = tmp_path / "data" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"train": [], "val": []}))
    (tmp_path / "models").mkdir()
    save_tiny_model(str(tmp_path / "models" / "model.pt"))  # so evaluating gets as far as the datalist
    configs = train_configs() + [config(f"{name}.json") for name in extra]
    line = exit_line(
        run_id, configs, bundle_root=str(tmp_path), dataset_dir=str(datalist.parent), data_check=policy, **TINY
    )
    assert str(datalist) in line and ("training" in line or "validation" in line), line


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_datalist_that_is_not_a_datalist(tmp_path: Path, content: str) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(content)
    line = exit_line("training", train_configs(), bundle_root=str(tmp_path), data_list_file_path=str(datalist))
    assert str(datalist) in line


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good tiny model.pt, a truncated one, a text file named .pt, and the weights of the zoo-size network."""
    folder = tmp_path_factory.mktemp("models")
    save_tiny_model(str(folder / "model.pt"))
    raw = (folder / "model.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (folder / "text.ts").write_text("not a model")
    return {"good": folder / "model.pt", "truncated": folder / "truncated.pt", "text": folder / "text.ts"}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", "or download the zoo's LUNA16 weights that large_files.yml lists (https://developer"),
        ("truncated_model", "cannot be read"),
        ("text_model", "cannot be read"),
        ("foreign_weights", "weights are for another network"),
        ("empty_folder", "no image files (*.nii.gz, *.nii, *.mhd, *.mha)"),
        ("wrong_key", "no 'test' list"),
    ],
)
def test_inference_setup_errors(tmp_path: Path, models: dict[str, Path], case: str, expected: str) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    if case != "empty_folder":
        write_volume(scans / "scan.nii.gz")
    (scans / "list.json").write_text(json.dumps({"validation": [{"image": "scan.nii.gz"}]}))
    chosen = {"missing_model": tmp_path / "nothing.pt", "truncated_model": models["truncated"]}
    model = {**chosen, "text_model": models["text"]}.get(case, models["good"])
    overrides = dict(TINY)
    if case == "foreign_weights":  # the bundle's full-size network_def, given the tiny network's weights
        del overrides["backbone"], overrides["feature_extractor"]
    line = exit_line(
        "inference",
        [config("inference.json")],
        bundle_root=str(tmp_path),
        dataset_dir=str(scans),
        data_list_file_path="" if case == "empty_folder" else str(scans / "list.json"),
        data_list_key="test" if case == "wrong_key" else "validation",
        model_path=str(model),
        output_dir=str(tmp_path / "out"),
        **overrides,
    )
    assert expected in line, line
    assert str(scans if case in ("empty_folder", "wrong_key") else model) in line, line


# --- phantoms only where no one's data is -------------------------------------------------------------------------


def test_phantoms_are_generated_only_into_the_default_or_an_empty_folder(tmp_path: Path) -> None:
    kw = {"num_train": 1, "num_val": 0, "shape": (32, 32, 32)}
    users = tmp_path / "luna16"
    users.mkdir()
    write_volume(users / "scan.nii.gz")
    with pytest.raises(UserError, match="check data_list_file_path") as e:
        ensure_dataset(str(users / "datalst.json"), str(users), default_dir=str(tmp_path / "default"), **kw)
    assert str(users / "datalst.json") in str(e.value)
    assert sorted(p.name for p in users.iterdir()) == ["scan.nii.gz"]
    # the bundle's default folder is regenerated even when it holds files (an interrupted generation)
    default = tmp_path / "default"
    default.mkdir()
    (default / "images").mkdir()
    path = ensure_dataset(str(default / "datalist.json"), str(default), default_dir=str(default), **kw)
    assert os.path.isfile(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert os.path.isfile(ensure_dataset(str(empty / "datalist.json"), str(empty), default_dir=str(default), **kw))


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_a_bad_checkpoint_to_evaluate_or_resume_is_one_line(tmp_path: Path, models: dict[str, Path], case: str):
    checkpoint = tmp_path / "nothing.pt" if case == "missing" else models["truncated"]
    make_phantoms(str(tmp_path / "data"))
    common = {"bundle_root": str(tmp_path), "dataset_dir": str(tmp_path / "data"), **TINY}
    evaluate = exit_line("evaluating", train_configs() + [config("evaluate.json")], ckpt_path=str(checkpoint), **common)
    resume = exit_line("training", train_configs(), resume_from=str(checkpoint), **common)
    for line in (evaluate, resume):
        assert str(checkpoint) in line and (
            "does not exist" in line or "cannot be read" in line or "not a complete" in line
        )


def test_a_run_left_without_training_images_ends_in_one_line(tmp_path: Path) -> None:
    # every training image holds NaN voxels and the data check is off: the guard quarantines each after its second
    # event, and the next epoch has nothing to train on
    data = tmp_path / "data"
    datalist = Path(generate_dataset(str(data), num_train=2, num_val=1, shape=(64, 64, 32), progress=False))
    for entry in json.loads(datalist.read_text())["training"]:
        path = data / entry["image"]
        image = nib.load(str(path))
        volume = np.asarray(image.dataobj, dtype=np.float32)
        volume[::6] = np.nan  # every crop holds some
        nib.save(nib.Nifti1Image(volume, image.affine), str(path))
    root = tmp_path / "bundle"
    done = monai_run(
        "training",
        ["configs/train.json", TINY_CONFIG],
        root,
        dataset_dir=str(data),
        data_list_file_path=str(datalist),
        data_check="off",
        epochs=4,
        val_interval=10,
    )
    assert done.returncode != 0
    quarantine = root / "eval" / "quarantine.json"
    assert last_line(done) == (
        f"every training image is quarantined (2 of them; why, for each: {quarantine}): fix or replace the files, "
        "then train again"
    )
    assert len(json.loads(quarantine.read_text())["quarantined"]) == 2
    report = json.loads((root / "eval" / "guard_report.json").read_text())
    assert report["status"] == "stopped" and report["message"] == last_line(done)
    assert (root / "models" / "checkpoint_final.pt").is_file()
