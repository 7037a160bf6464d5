"""Data QA (issue 4): every bad input made here gets its specific problem code and a message naming the file."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import parse

from scripts.data_check import DataReport, check_datalist, run_check_data, screen_datalists
from scripts.quarantine import Quarantine

SPACING = (0.703125, 0.703125, 1.25)
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = [-14.0, 20.0, -30.0]
SHAPE = (40, 40, 24)
PATCH = (32, 32, 16)
LOADER = parse("train.json").get_parsed_content("loader")  # the bundle's own loading and coordinate path


def world_box(centre: tuple[float, ...], size: tuple[float, ...], affine: np.ndarray = AFFINE) -> list[float]:
    """A voxel-space box (centre, size in voxels) as the datalist writes it: LPS world ``cccwhd`` in mm."""
    ras = affine @ np.array([*centre, 1.0])
    return [float(-ras[0]), float(-ras[1]), float(ras[2])] + [float(s * p) for s, p in zip(size, SPACING, strict=True)]


GOOD_BOX = world_box((20, 20, 12), (6, 6, 4))


def write_volume(path: Path, volume: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> Path:
    if volume is None:
        volume = np.random.default_rng(0).integers(-1000, 400, SHAPE).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def item(image: Path | str, boxes: list | None = None, labels: list | None = None) -> dict:
    boxes = [GOOD_BOX] if boxes is None else boxes
    return {"image": str(image), "box": boxes, "label": [0] * len(boxes) if labels is None else labels}


def write_datalist(path: Path, training: list, validation: list | None = None) -> Path:
    data = {"training": training} if validation is None else {"training": training, "validation": validation}
    path.write_text(json.dumps(data))
    return path


def check(tmp_path: Path, training: list, validation: list | None = None, **kwargs) -> DataReport:
    datalist = write_datalist(tmp_path / "datalist.json", training, validation)
    kwargs.setdefault("patch_size", PATCH)
    kwargs.setdefault("sections", ("training",) if validation is None else ("training", "validation"))
    return check_datalist(str(datalist), str(tmp_path), LOADER, progress=False, **kwargs)


# --- bad inputs: each builder writes its file and returns (item, problem, severity, reason) ----------------------


def corrupt_gzip(tmp: Path):
    raw = bytearray(write_volume(tmp / "v.nii.gz").read_bytes())
    raw[60:400] = bytes(range(256)) + bytes(84)  # valid gzip header, then garbage in the deflate stream
    (tmp / "v.nii.gz").write_bytes(bytes(raw))
    return item(tmp / "v.nii.gz"), "unreadable", "error", "corrupt_gzip"


def truncated_gzip(tmp: Path):
    raw = write_volume(tmp / "v.nii.gz").read_bytes()
    (tmp / "v.nii.gz").write_bytes(raw[: len(raw) // 2])
    return item(tmp / "v.nii.gz"), "unreadable", "error", "truncated_gzip"


def truncated_nifti(tmp: Path):
    raw = gzip.decompress(write_volume(tmp / "v.nii.gz").read_bytes())
    (tmp / "v.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a whole gzip of half a NIfTI
    return item(tmp / "v.nii.gz"), "unreadable", "error", "truncated_nifti"


def text_named_nii_gz(tmp: Path):
    (tmp / "v.nii.gz").write_text("patient 12, see the scanner log\n" * 20)
    return item(tmp / "v.nii.gz"), "unreadable", "error", "not_gzip"


def gzip_not_nifti(tmp: Path):
    (tmp / "v.nii.gz").write_bytes(gzip.compress(b"not an image\n" * 100))
    return item(tmp / "v.nii.gz"), "unreadable", "error", "not_nifti"


def empty_file(tmp: Path):
    (tmp / "v.nii.gz").write_bytes(b"")
    return item(tmp / "v.nii.gz"), "unreadable", "error", "empty_file"


def missing_file(tmp: Path):
    return item(tmp / "v.nii.gz"), "missing_file", "error", None


def nan_voxels(tmp: Path):
    volume = np.full(SHAPE, -500.0, dtype=np.float32)
    volume[1, 2, 3:8] = np.nan
    write_volume(tmp / "v.nii.gz", volume)
    return item(tmp / "v.nii.gz"), "nan_voxels", "error", None


def inf_voxels(tmp: Path):
    volume = np.full(SHAPE, -500.0, dtype=np.float32)
    volume[5, 5, :3] = [np.inf, -np.inf, np.inf]
    write_volume(tmp / "v.nii.gz", volume)
    return item(tmp / "v.nii.gz"), "inf_voxels", "error", None


def singular_affine(tmp: Path):
    volume = np.zeros(SHAPE, dtype=np.int16)
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.int16)
    header["srow_x"], header["srow_y"], header["srow_z"] = AFFINE[0], AFFINE[1], [0.0, 0.0, 0.0, -30.0]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(volume, None, header), str(tmp / "v.nii.gz"))
    return item(tmp / "v.nii.gz"), "degenerate_affine", "error", None


def zero_size_box(tmp: Path):
    return item(write_volume(tmp / "v.nii.gz"), [GOOD_BOX[:3] + [0.0, 4.0, 4.0]]), "box_size", "error", None


def negative_size_box(tmp: Path):
    return item(write_volume(tmp / "v.nii.gz"), [GOOD_BOX[:3] + [4.0, -4.0, 4.0]]), "box_size", "error", None


def five_value_box(tmp: Path):
    return item(write_volume(tmp / "v.nii.gz"), [GOOD_BOX[:5]]), "box_values", "error", None


def box_outside(tmp: Path):
    return item(write_volume(tmp / "v.nii.gz"), [world_box((200, 20, 12), (6, 6, 4))]), "box_outside", "error", None


def box_partly_outside(tmp: Path):
    box = world_box((1, 20, 12), (10, 6, 4))
    return item(write_volume(tmp / "v.nii.gz"), [box]), "box_partly_outside", "warning", None


def label_count(tmp: Path):
    return item(write_volume(tmp / "v.nii.gz"), [GOOD_BOX], [0, 0]), "label_count", "error", None


def label_range(tmp: Path):
    return item(write_volume(tmp / "v.nii.gz"), [GOOD_BOX], [1]), "label_range", "error", None


def box_not_nested(tmp: Path):
    return {"image": str(write_volume(tmp / "v.nii.gz")), "box": GOOD_BOX, "label": [0]}, "bad_box_type", "error", None


def label_not_int(tmp: Path):
    return item(write_volume(tmp / "v.nii.gz"), [GOOD_BOX], ["nodule"]), "bad_label_type", "error", None


def missing_box_key(tmp: Path):
    return {"image": str(write_volume(tmp / "v.nii.gz")), "label": []}, "missing_key", "error", None


def missing_label_key(tmp: Path):
    return {"image": str(write_volume(tmp / "v.nii.gz")), "box": [GOOD_BOX]}, "missing_key", "error", None


def intensity_outliers(tmp: Path):
    volume = np.full(SHAPE, -500, dtype=np.int16)
    volume[0, 0, :4] = [-3024, -2000, 8000, 30000]
    write_volume(tmp / "v.nii.gz", volume)
    return item(tmp / "v.nii.gz"), "intensity_range", "warning", None


def unexpected_spacing(tmp: Path):
    affine = np.diag([0.703125, 0.703125, 5.0, 1.0])
    write_volume(tmp / "v.nii.gz", affine=affine)
    return item(tmp / "v.nii.gz", [world_box((20, 20, 6), (6, 6, 2), affine)]), "unexpected_spacing", "warning", None


def small_volume(tmp: Path):
    write_volume(tmp / "v.nii.gz", np.zeros((40, 40, 8), dtype=np.int16))
    return item(tmp / "v.nii.gz", [world_box((20, 20, 4), (6, 6, 2))]), "small_volume", "warning", None


BAD_INPUTS: list[Callable] = [
    corrupt_gzip,
    truncated_gzip,
    truncated_nifti,
    text_named_nii_gz,
    gzip_not_nifti,
    empty_file,
    missing_file,
    nan_voxels,
    inf_voxels,
    singular_affine,
    zero_size_box,
    negative_size_box,
    five_value_box,
    box_outside,
    box_partly_outside,
    label_count,
    label_range,
    box_not_nested,
    label_not_int,
    missing_box_key,
    missing_label_key,
    intensity_outliers,
    unexpected_spacing,
    small_volume,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_named_with_its_file(tmp_path: Path, make: Callable) -> None:
    good = item(write_volume(tmp_path / "good.nii.gz"))
    bad, problem, severity, reason = make(tmp_path)
    report = check(tmp_path, [good, bad])
    found = [f for f in report.findings if f["problem"] == problem]
    assert found, report.summary()
    assert all(f["section"] == "training" and f["index"] == 1 and f["severity"] == severity for f in found)
    assert all(str(tmp_path / "v.nii.gz") in f["message"] for f in found)
    if reason is not None:
        assert found[0]["details"]["reason"] == reason
    assert not [f for f in report.findings if f["index"] == 0], "the good case must stay clean"
    assert report.ok is (severity == "warning")
    assert (str(tmp_path / "v.nii.gz") in report.bad_images("training")) is (severity == "error")
    assert str(tmp_path / "v.nii.gz") in report.summary()


def test_messages_are_specific(tmp_path: Path) -> None:
    volume = np.full(SHAPE, -500.0, dtype=np.float32)
    volume[0, 0, :7] = np.nan
    write_volume(tmp_path / "nan.nii.gz", volume)
    (tmp_path / "text.nii.gz").write_text("hello\n")
    report = check(tmp_path, [item(tmp_path / "nan.nii.gz"), item(tmp_path / "text.nii.gz")])
    found = {f["problem"]: f for f in report.findings}
    messages = {k: f["message"] for k, f in found.items()}
    assert "7 NaN voxels" in messages["nan_voxels"] and found["nan_voxels"]["details"]["count"] == 7
    assert "not a NIfTI file" in messages["unreadable"] and "text file" in messages["unreadable"]


def test_image_without_boxes_is_valid(tmp_path: Path) -> None:
    report = check(tmp_path, [item(write_volume(tmp_path / "v.nii.gz"), [], [])])
    assert report.ok and not report.findings and report.no_boxes == 1


def test_one_bad_box_does_not_hide_the_others(tmp_path: Path) -> None:
    boxes = [GOOD_BOX[:3] + [0.0, 1.0, 1.0], world_box((300, 20, 12), (6, 6, 4)), GOOD_BOX[:4], GOOD_BOX]
    report = check(tmp_path, [item(write_volume(tmp_path / "v.nii.gz"), boxes)])
    assert sorted((f["problem"], f["details"]["box"]) for f in report.findings) == [
        ("box_outside", 1),
        ("box_size", 0),
        ("box_values", 2),
    ]


def test_relative_and_absolute_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    write_volume(tmp_path / "images" / "a.nii.gz")
    write_volume(tmp_path / "images" / "b.nii.gz")
    report = check(tmp_path, [item("images/a.nii.gz")], [item(tmp_path / "images" / "b.nii.gz")])
    assert report.ok and not report.findings and dict(report.checked) == {"training": 1, "validation": 1}


def test_duplicate_images(tmp_path: Path) -> None:
    write_volume(tmp_path / "v.nii.gz")
    report = check(tmp_path, [item("v.nii.gz"), item(tmp_path / "v.nii.gz")], [item("./v.nii.gz")])
    dup = [f for f in report.findings if f["problem"] == "duplicate_image"]
    assert [(f["section"], f["index"]) for f in dup] == [("training", 1), ("validation", 0)]
    assert all(str(tmp_path / "v.nii.gz") in f["message"] and "training[0]" in f["message"] for f in dup)


@pytest.mark.parametrize("bad", [["v.nii.gz"], [{"box": [], "label": []}], [{"image": 3, "box": [], "label": []}]])
def test_datalist_item_errors(tmp_path: Path, bad: list) -> None:
    report = check(tmp_path, bad)
    assert {f["problem"] for f in report.errors} & {"item_not_dict", "missing_key", "bad_image_type"}
    assert all("training[0]" in f["message"] for f in report.errors)


@pytest.mark.parametrize(
    "content, problem",
    [(None, "datalist_missing"), ('{"training": [', "datalist_invalid_json"), ("[]", "datalist_not_dict")],
)
def test_bad_datalist_file(tmp_path: Path, content: str | None, problem: str) -> None:
    datalist = tmp_path / "datalist.json"
    if content is not None:
        datalist.write_text(content)
    report = check_datalist(str(datalist), str(tmp_path), LOADER, PATCH, progress=False)
    assert [f["problem"] for f in report.errors] == [problem]
    assert str(datalist) in report.errors[0]["message"]


def test_sections(tmp_path: Path) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [item(write_volume(tmp_path / "v.nii.gz"))]}))
    report = check_datalist(str(datalist), str(tmp_path), LOADER, PATCH, progress=False)
    assert report.ok and [(f["problem"], f["severity"]) for f in report.findings] == [("missing_section", "warning")]
    datalist.write_text(json.dumps({"validation": []}))
    report = check_datalist(str(datalist), str(tmp_path), LOADER, PATCH, progress=False)
    assert ("missing_section", "training") in {(f["problem"], f["section"]) for f in report.errors}


# --- run_check_data and screen_datalists ------------------------------------------------------------------------


def mixed_datalist(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """Training: 2 good (one without boxes), NaN voxels, missing file, zero-size box; validation: good, text file."""
    for name in ("good1", "good2", "good3", "good4"):
        write_volume(tmp_path / f"{name}.nii.gz")
    nan_voxels(tmp_path)
    os.replace(tmp_path / "v.nii.gz", tmp_path / "nan.nii.gz")
    (tmp_path / "corrupt.nii.gz").write_text("not nifti")
    training = [
        item("good1.nii.gz"),
        item("nan.nii.gz"),
        item("missing.nii.gz"),
        item("good2.nii.gz", [], []),
        item(tmp_path / "good4.nii.gz", [GOOD_BOX[:3] + [0.0, 1.0, 1.0]]),
    ]
    validation = [item("good3.nii.gz"), item("corrupt.nii.gz")]
    datalist = write_datalist(tmp_path / "datalist.json", training, validation)
    bad = {"training": ["nan", "missing", "good4"], "validation": ["corrupt"]}
    return datalist, {k: [str(tmp_path / f"{n}.nii.gz") for n in v] for k, v in bad.items()}


def test_run_check_data_bad(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    datalist, bad = mixed_datalist(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_check_data(str(datalist), str(tmp_path), str(tmp_path / "out"), LOADER, PATCH, progress=False)
    assert e.value.code not in (0, None) and "data check failed" in str(e.value.code)
    report = json.loads((tmp_path / "out" / "data_check.json").read_text())
    assert not report["ok"] and report["errors"] == 4
    assert {(f["image"], f["problem"]) for f in report["findings"]} == {
        (bad["training"][0], "nan_voxels"),
        (bad["training"][1], "missing_file"),
        (bad["training"][2], "box_size"),
        (bad["validation"][0], "unreadable"),
    }
    out = capsys.readouterr().out
    assert all(path in out for paths in bad.values() for path in paths)


def test_run_check_data_good(tmp_path: Path) -> None:
    write_volume(tmp_path / "a.nii.gz")
    datalist = write_datalist(tmp_path / "datalist.json", [item("a.nii.gz")], [])
    report = run_check_data(str(datalist), str(tmp_path), str(tmp_path / "out"), LOADER, PATCH, progress=False)
    assert report.ok and json.loads((tmp_path / "out" / "data_check.json").read_text())["ok"]


def test_screen_exclude(tmp_path: Path) -> None:
    datalist, bad = mixed_datalist(tmp_path)
    quarantine = Quarantine(str(tmp_path / "q.json"))
    lists = screen_datalists(
        "exclude", str(datalist), str(tmp_path), LOADER, PATCH, str(tmp_path / "out"), quarantine, progress=False
    )
    assert [d["image"] for d in lists["training"]] == [str(tmp_path / "good1.nii.gz"), str(tmp_path / "good2.nii.gz")]
    assert [d["image"] for d in lists["validation"]] == [str(tmp_path / "good3.nii.gz")]
    assert lists["training"][1]["box"] == [] and lists["training"][0]["box"] == [GOOD_BOX]
    entries = json.loads((tmp_path / "q.json").read_text())["quarantined"]
    assert sorted(e["image"] for e in entries) == sorted(bad["training"])
    assert all(e["source"] == "data_check" for e in entries)
    assert (tmp_path / "out" / "data_check.json").is_file()


def test_screen_exclude_every_rank_same_lists(tmp_path: Path) -> None:
    # a DDP rank other than 0 (train.json's write_outputs false): no report file, no quarantine file, same lists
    datalist, bad = mixed_datalist(tmp_path)
    quarantine = Quarantine(None)
    lists = screen_datalists("exclude", str(datalist), str(tmp_path), LOADER, PATCH, None, quarantine, progress=False)
    assert len(lists["training"]) == 2 and len(lists["validation"]) == 1
    assert sorted(quarantine.entries) == sorted(bad["training"])
    assert not (tmp_path / "q.json").exists() and not (tmp_path / "out").exists()


def test_screen_exclude_nothing_left(tmp_path: Path) -> None:
    datalist = write_datalist(tmp_path / "datalist.json", [item("missing.nii.gz")], [])
    with pytest.raises(SystemExit, match="nothing left to train on"):
        screen_datalists("exclude", str(datalist), str(tmp_path), LOADER, PATCH, str(tmp_path), progress=False)


def test_screen_strict(tmp_path: Path) -> None:
    datalist, _ = mixed_datalist(tmp_path)
    with pytest.raises(SystemExit, match="exclude") as e:
        screen_datalists("strict", str(datalist), str(tmp_path), LOADER, PATCH, str(tmp_path / "out"), progress=False)
    assert e.value.code not in (0, None)
    assert not json.loads((tmp_path / "out" / "data_check.json").read_text())["ok"]


def test_screen_off(tmp_path: Path) -> None:
    datalist, _ = mixed_datalist(tmp_path)
    lists = screen_datalists("off", str(datalist), str(tmp_path), None, PATCH, str(tmp_path / "out"))
    assert len(lists["training"]) == 5 and len(lists["validation"]) == 2
    assert all(os.path.isabs(d["image"]) for v in lists.values() for d in v)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy", ["off", "exclude", "strict"])
def test_screen_bad_datalist_file(tmp_path: Path, policy: str) -> None:
    (tmp_path / "datalist.json").write_text("{not json")
    with pytest.raises(SystemExit, match="datalist.json"):
        screen_datalists(policy, str(tmp_path / "datalist.json"), str(tmp_path), LOADER, PATCH, str(tmp_path))
