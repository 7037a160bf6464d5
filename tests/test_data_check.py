"""Data QA (issue 4): every bad input made here gets its specific problem code and a message naming the file."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import parse
from scripts.data.check import DataCheckFailed, DataReport, check_datalist, run_check_data
from scripts.data.datalist import DatalistError
from scripts.data.quarantine import Quarantine
from scripts.data.screening import screen_datalists

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


def header_bytes(shape: tuple[int, ...], affine: np.ndarray = AFFINE) -> bytes:
    """The 352 bytes of an int16 NIfTI-1 file of ``shape`` up to its voxels."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_sform(affine, 1)
    header.set_qform(affine, 1)
    header.set_data_offset(352)
    return header.binaryblock + bytes(4)  # 348 bytes and the (empty) extension flag


def lying_header(path: Path, shape: tuple[int, ...], compress: bool = True) -> Path:
    """A NIfTI header claiming ``shape`` int16 voxels, followed by a few bytes instead of them."""
    raw = header_bytes(shape) + bytes(100)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def image_2d(tmp: Path):
    write_volume(tmp / "v.nii.gz", np.zeros((40, 40), dtype=np.int16))
    return item(tmp / "v.nii.gz"), "wrong_dimensions", "error", None


def image_5d(tmp: Path):
    write_volume(tmp / "v.nii.gz", np.zeros((*SHAPE, 1, 2), dtype=np.int16))
    return item(tmp / "v.nii.gz"), "wrong_dimensions", "error", None


def three_volumes(tmp: Path):
    write_volume(tmp / "v.nii.gz", np.zeros((*SHAPE, 3), dtype=np.int16))
    return item(tmp / "v.nii.gz"), "multi_channel", "error", None


def header_claims_gigabytes(tmp: Path):  # the 221-byte .nii.gz of issue 12 that claims 1600 x 1600 x 800
    return item(lying_header(tmp / "v.nii.gz", (1600, 1600, 800))), "unreadable", "error", "size_mismatch"


def header_claims_5000_cubed(tmp: Path):
    return item(lying_header(tmp / "v.nii.gz", (5000, 5000, 5000))), "unreadable", "error", "size_mismatch"


def uncompressed_shorter_than_header(tmp: Path):
    return item(lying_header(tmp / "v.nii", SHAPE, compress=False)), "unreadable", "error", "truncated_nifti"


def int8_voxels(tmp: Path):
    write_volume(tmp / "v.nii.gz", np.zeros(SHAPE, dtype=np.int8))
    return item(tmp / "v.nii.gz"), "dtype_range", "warning", None


def uint16_voxels(tmp: Path):
    write_volume(tmp / "v.nii.gz", np.full(SHAPE, 24, dtype=np.uint16))
    return item(tmp / "v.nii.gz"), "dtype_range", "warning", None


def complex_voxels(tmp: Path):
    write_volume(tmp / "v.nii.gz", np.zeros(SHAPE, dtype=np.complex64))
    return item(tmp / "v.nii.gz"), "unsupported_dtype", "error", None


def beyond_float32(tmp: Path):  # training loads float32, where 1e300 is Inf
    volume = np.full(SHAPE, -500.0)
    volume[3, 3, 3] = 1e300
    write_volume(tmp / "v.nii.gz", volume)
    return item(tmp / "v.nii.gz"), "inf_voxels", "error", None


def symlink_loop(tmp: Path):
    os.symlink(tmp / "w.nii.gz", tmp / "v.nii.gz")
    os.symlink(tmp / "v.nii.gz", tmp / "w.nii.gz")
    return item(tmp / "v.nii.gz"), "unreadable", "error", "symlink_loop"


def broken_symlink(tmp: Path):
    os.symlink(tmp / "gone.nii.gz", tmp / "v.nii.gz")
    return item(tmp / "v.nii.gz"), "missing_file", "error", "broken_symlink"


def folder_named_like_an_image(tmp: Path):
    (tmp / "v.nii.gz").mkdir()
    return item(tmp / "v.nii.gz"), "unreadable", "error", "directory"


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
    image_2d,
    image_5d,
    three_volumes,
    header_claims_gigabytes,
    header_claims_5000_cubed,
    uncompressed_shorter_than_header,
    int8_voxels,
    uint16_voxels,
    complex_voxels,
    beyond_float32,
    symlink_loop,
    broken_symlink,
    folder_named_like_an_image,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_named_with_its_file(tmp_path: Path, make: Callable) -> None:
    good = item(write_volume(tmp_path / "good.nii.gz"))
    bad, problem, severity, reason = make(tmp_path)
    image = str(bad["image"])
    report = check(tmp_path, [good, bad])
    found = [f for f in report.findings if f.problem == problem]
    assert found, report.summary()
    assert all(f.section == "training" and f.index == 1 and f.severity == severity for f in found)
    assert all(image in f.message for f in found)
    if reason is not None:
        assert found[0].details["reason"] == reason
    assert not [f for f in report.findings if f.index == 0], "the good case must stay clean"
    assert report.ok is (severity == "warning")
    assert (image in report.bad_images("training")) is (severity == "error")
    assert image in report.summary()


def test_messages_are_specific(tmp_path: Path) -> None:
    volume = np.full(SHAPE, -500.0, dtype=np.float32)
    volume[0, 0, :7] = np.nan
    write_volume(tmp_path / "nan.nii.gz", volume)
    (tmp_path / "text.nii.gz").write_text("hello\n")
    report = check(tmp_path, [item(tmp_path / "nan.nii.gz"), item(tmp_path / "text.nii.gz")])
    found = {f.problem: f for f in report.findings}
    messages = {k: f.message for k, f in found.items()}
    assert "7 NaN voxels" in messages["nan_voxels"] and found["nan_voxels"].details["count"] == 7
    assert "not a NIfTI file" in messages["unreadable"] and "text file" in messages["unreadable"]


def test_a_volume_larger_than_the_check_accepts_is_named_before_it_is_loaded(tmp_path: Path, monkeypatch) -> None:
    # the limit (2**29 voxels, 2 GB as float32) scaled down to this volume: the header alone tells
    path = write_volume(tmp_path / "big.nii.gz")
    monkeypatch.setattr(type(LOADER), "__call__", lambda *a, **k: pytest.fail("a too large volume was loaded"))
    report = check(tmp_path, [item(path)], max_voxels=40 * 40 * 24 - 1)
    (finding,) = report.findings
    assert finding.problem == "too_large" and finding.severity == "error" and not report.ok
    assert finding.message == (
        f"training[0] {path}: 40x40x24 = 38400 voxels, more than the 38399 the data check accepts (153.6 kB as "
        "float32, as training loads it): crop or resample the image"
    )
    assert finding.details["voxels"] == 38400


def test_image_without_boxes_is_valid(tmp_path: Path) -> None:
    report = check(tmp_path, [item(write_volume(tmp_path / "v.nii.gz"), [], [])])
    assert report.ok and not report.findings and report.no_boxes == 1


def test_one_bad_box_does_not_hide_the_others(tmp_path: Path) -> None:
    boxes = [GOOD_BOX[:3] + [0.0, 1.0, 1.0], world_box((300, 20, 12), (6, 6, 4)), GOOD_BOX[:4], GOOD_BOX]
    report = check(tmp_path, [item(write_volume(tmp_path / "v.nii.gz"), boxes)])
    assert sorted((f.problem, f.details["box"]) for f in report.findings) == [
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
    dup = [f for f in report.findings if f.problem == "duplicate_image"]
    assert [(f.section, f.index) for f in dup] == [("training", 1), ("validation", 0)]
    assert all(str(tmp_path / "v.nii.gz") in f.message and "training[0]" in f.message for f in dup)


@pytest.mark.parametrize("bad", [["v.nii.gz"], [{"box": [], "label": []}], [{"image": 3, "box": [], "label": []}]])
def test_datalist_item_errors(tmp_path: Path, bad: list) -> None:
    report = check(tmp_path, bad)
    assert {f.problem for f in report.errors} & {"item_not_dict", "missing_key", "bad_image_type"}
    assert all("training[0]" in f.message for f in report.errors)


@pytest.mark.parametrize(
    "content, problem",
    [(None, "datalist_missing"), ('{"training": [', "datalist_invalid_json"), ("[]", "datalist_not_dict")],
)
def test_bad_datalist_file(tmp_path: Path, content: str | None, problem: str) -> None:
    datalist = tmp_path / "datalist.json"
    if content is not None:
        datalist.write_text(content)
    report = check_datalist(str(datalist), str(tmp_path), LOADER, PATCH, progress=False)
    assert [f.problem for f in report.errors] == [problem]
    assert str(datalist) in report.errors[0].message


def test_sections(tmp_path: Path) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [item(write_volume(tmp_path / "v.nii.gz"))]}))
    report = check_datalist(str(datalist), str(tmp_path), LOADER, PATCH, progress=False)
    assert report.ok and [(f.problem, f.severity) for f in report.findings] == [("missing_section", "warning")]
    datalist.write_text(json.dumps({"validation": []}))
    report = check_datalist(str(datalist), str(tmp_path), LOADER, PATCH, progress=False)
    assert ("missing_section", "training") in {(f.problem, f.section) for f in report.errors}


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
    with pytest.raises(DataCheckFailed, match="data check failed"):
        run_check_data(str(datalist), str(tmp_path), str(tmp_path / "out"), LOADER, PATCH, progress=False)
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
    assert lists["training"][0]["box"] == [GOOD_BOX]
    assert lists["training"][1]["box"].shape == (0, 6)  # no box, in the one shape MONAI's box transforms take
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
    with pytest.raises(DataCheckFailed, match="nothing left to train on"):
        screen_datalists("exclude", str(datalist), str(tmp_path), LOADER, PATCH, str(tmp_path), progress=False)


def test_screen_strict(tmp_path: Path) -> None:
    datalist, _ = mixed_datalist(tmp_path)
    with pytest.raises(DataCheckFailed, match="exclude"):
        screen_datalists("strict", str(datalist), str(tmp_path), LOADER, PATCH, str(tmp_path / "out"), progress=False)
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
    with pytest.raises(DatalistError, match="datalist.json"):
        screen_datalists(policy, str(tmp_path / "datalist.json"), str(tmp_path), LOADER, PATCH, str(tmp_path))


# --- layout, path policy, robustness and memory -----------------------------------------------------------------


def test_one_volume_4d_image_is_a_3d_image(tmp_path: Path) -> None:
    write_volume(tmp_path / "v.nii.gz", np.zeros((*SHAPE, 1), dtype=np.int16))
    report = check(tmp_path, [item(tmp_path / "v.nii.gz")])
    assert report.ok and not report.findings, report.summary()


def test_relative_path_climbing_out_of_dataset_dir_warns(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_volume(tmp_path / "outside.nii.gz")
    write_volume(tmp_path / "data" / "inside.nii.gz")
    items = [item("../outside.nii.gz"), item("inside.nii.gz"), item(tmp_path / "outside.nii.gz")]
    datalist = write_datalist(tmp_path / "datalist.json", items)
    report = check_datalist(str(datalist), str(tmp_path / "data"), LOADER, PATCH, sections=("training",))
    assert [(f.index, f.problem, f.severity) for f in report.findings] == [
        (0, "outside_dataset_dir", "warning"),  # once: the absolute path to the same file is its duplicate
        (2, "duplicate_image", "error"),
    ]
    assert "'../outside.nii.gz'" in report.findings[0].message and str(tmp_path / "outside.nii.gz") in report.summary()


def test_a_failure_of_the_check_itself_keeps_the_other_cases(tmp_path: Path, monkeypatch) -> None:
    import scripts.data.check

    real = scripts.data.check.check_voxels

    def fails_on_b(stats, rec, intensity_range):
        if rec.image.endswith("b.nii.gz"):
            raise KeyError("a bug")
        return real(stats, rec, intensity_range)

    monkeypatch.setattr(scripts.data.check, "check_voxels", fails_on_b)
    for name in "abc":
        write_volume(tmp_path / f"{name}.nii.gz")
    datalist = write_datalist(tmp_path / "datalist.json", [item(f"{n}.nii.gz") for n in "abc"], [])
    with pytest.raises(DataCheckFailed):
        run_check_data(str(datalist), str(tmp_path), str(tmp_path / "out"), LOADER, PATCH, progress=False)
    report = json.loads((tmp_path / "out" / "data_check.json").read_text())
    assert report["items"] == {"training": 3}
    (finding,) = [f for f in report["findings"] if f["severity"] == "error"]
    assert finding["problem"] == "internal_error" and finding["image"] == str(tmp_path / "b.nii.gz")
    assert "KeyError: 'a bug'" in finding["message"] and str(tmp_path / "b.nii.gz") in finding["message"]


def test_an_exception_without_a_message_still_gives_a_reason(tmp_path: Path, monkeypatch) -> None:
    import scripts.data.check

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(scripts.data.check, "read_voxel_stats", out_of_memory)
    report = check(tmp_path, [item(write_volume(tmp_path / "v.nii.gz"))])
    (finding,) = report.errors
    assert finding.problem == "unreadable" and finding.message.endswith("cannot be loaded: MemoryError: out of memory")


PEAK_MEMORY = """
import json, resource, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from bundle_helpers import parse
from scripts.data.check import check_datalist
loader = parse("train.json").get_parsed_content("loader")
check_datalist({warmup!r}, {folder!r}, loader, [32, 32, 16], progress=False, sections=["training"])  # imports
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = check_datalist({datalist!r}, {folder!r}, loader, [32, 32, 16], progress=False, sections=["training"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({{"peak_kib": peak, "problems": [f.problem for f in report.findings]}}))
"""


@pytest.mark.slow
def test_the_check_holds_no_volume_whole(tmp_path: Path) -> None:
    """
    A true 1024 x 1024 x 256 int16 volume in LPS order (512 MiB on disk, 1 GiB as the float32 that training loads;
    a sparse file, so the test writes next to nothing) and a lying header: the check's peak memory, measured in a fresh
    process after a run on a small image (imports and first-call allocations), stays far below the volume's size.
    """
    shape = (1024, 1024, 256)
    with open(tmp_path / "big.nii", "wb") as f:
        f.write(header_bytes(shape, np.diag([-0.703125, -0.703125, 1.25, 1.0])))
        f.truncate(352 + 2 * int(np.prod(shape)))
    (tmp_path / "lie").mkdir()
    header_claims_gigabytes(tmp_path / "lie")
    items = [item(tmp_path / "big.nii", [], []), item(tmp_path / "lie" / "v.nii.gz")]
    datalist = write_datalist(tmp_path / "datalist.json", items)
    warmup = write_datalist(tmp_path / "warmup.json", [item(write_volume(tmp_path / "small.nii.gz"))])
    tests = os.path.dirname(os.path.abspath(__file__))
    paths = {"datalist": str(datalist), "warmup": str(warmup), "folder": str(tmp_path)}
    script = PEAK_MEMORY.format(repo=os.path.dirname(tests), tests=tests, **paths)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["problems"] == ["unreadable"], result  # the big volume is fine, the lying header is not
    # a one-byte stand-in of the volume (the orientation flips it) and slabs of 2^23 voxels: measured 280 MB, where
    # loading it whole through the training loader takes 2.0 GB (int16 read, float32 copy, flipped copy)
    assert result["peak_kib"] < 512 * 1024, result
