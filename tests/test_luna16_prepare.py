"""The LUNA16 download -> prepared NIfTI + fold datalists step, on tiny LUNA16-layout phantom sets read with ITK."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import zlib

import nibabel as nib
import numpy as np
import pytest
from monai.apps.detection.transforms.dictionary import AffineBoxToImageCoordinated, ConvertBoxToStandardModed
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged
from scripts.data.luna16_phantoms import generate_luna16
from scripts.data.luna16_prepare import TARGET_SPACING, Luna16PrepareError, prepare_luna16
from scripts.data.metaimage import MetaImageError, is_oblique, open_metaimage, ras_affine, read_metaimage_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Ten subsets of two scans: both spacings, both LUNA16 directions, one scan without nodules (subset0)."""
    out = str(tmp_path_factory.mktemp("luna16_raw"))
    generate_luna16(out, subsets=10, scans_per_subset=2, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def truth(raw: str) -> dict:
    with open(os.path.join(raw, "luna16_truth.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def prepared(raw: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("luna16_data"))
    result = prepare_luna16(raw, out, workers=1, progress=False)
    assert (result.prepared, result.converted, result.reused, result.skipped) == (20, 20, 0, 0)
    assert result.problems == ()
    return out


def _mhd(raw: str, truth: dict, uid: str) -> str:
    return os.path.join(raw, f"subset{truth[uid]['subset']}", f"{uid}.mhd")


def _uid(truth: dict, direction: str, spacing: tuple[float, ...]) -> str:
    return next(u for u, t in truth.items() if t["direction"] == direction and tuple(t["spacing"]) == spacing)


@pytest.mark.parametrize("direction", ["identity", "flipped"])
def test_metaimage_header_agrees_with_itk(raw: str, truth: dict, direction: str) -> None:
    path = _mhd(raw, truth, _uid(truth, direction, (0.6, 0.6, 2.5)))
    itk_image = LoadImage(reader="ITKReader", affine_lps_to_ras=True, image_only=True)(path)
    header = read_metaimage_header(path)
    assert header.shape == tuple(itk_image.shape)
    np.testing.assert_allclose(ras_affine(header), itk_image.affine.numpy(), atol=1e-5)
    mapped = open_metaimage(path)
    assert isinstance(mapped.dataobj, np.memmap)  # read on demand, never whole
    np.testing.assert_array_equal(mapped.get_fdata(), itk_image.numpy())
    flip = -1.0 if direction == "flipped" else 1.0
    np.testing.assert_array_equal(np.diag(header.direction), [flip, flip, 1.0])


def _write_header(folder: str, lines: dict[str, str], raw_bytes: int | None = 2 * 4 * 3 * 2) -> str:
    path = os.path.join(folder, "scan.mhd")
    fields = {
        "ObjectType": "Image",
        "NDims": "3",
        "TransformMatrix": "1 0 0 0 1 0 0 0 1",
        "Offset": "0 0 0",
        "ElementSpacing": "0.7 0.7 1.0",
        "DimSize": "2 4 3",
        "ElementType": "MET_SHORT",
        **lines,
    }
    fields["ElementDataFile"] = fields.pop("ElementDataFile", "scan.raw")  # the last line of a MetaImage header
    with open(path, "w") as f:
        f.write("".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None))
    if raw_bytes is not None:
        with open(os.path.join(folder, "scan.raw"), "wb") as f:
            f.write(b"\0" * raw_bytes)
    return path


@pytest.mark.parametrize(
    "lines, raw_bytes, words",
    [
        ({"ObjectType": "Mesh"}, 48, "ObjectType is Mesh"),
        ({"NDims": "2"}, 48, "NDims = 2"),
        ({"DimSize": None}, 48, "lacks DimSize"),
        ({"ElementType": "MET_FANCY"}, 48, "ElementType MET_FANCY"),
        ({"ElementDataFile": "LOCAL"}, 48, "unsupported"),
        ({}, None, "does not exist"),
        ({}, 47, "has 47 bytes"),
        ({"ElementSpacing": "0.7 0 1.0"}, 48, "must be > 0"),
        ({"ElementSpacing": "0.7 nan 1.0"}, 48, "must be > 0"),
        ({"TransformMatrix": "1 0 0 1 0 0 0 0 1"}, 48, "singular"),
    ],
)
def test_metaimage_header_problems(tmp_path, lines: dict, raw_bytes: int | None, words: str) -> None:
    path = _write_header(str(tmp_path), lines, raw_bytes)
    with pytest.raises(MetaImageError) as caught:
        read_metaimage_header(path)
    message = str(caught.value)
    assert words in message and path in message and "\n" not in message


def test_metaimage_byte_order_and_not_a_header(tmp_path) -> None:
    path = _write_header(str(tmp_path), {"ElementByteOrderMSB": "True"})
    assert read_metaimage_header(path).dtype == np.dtype(">i2")
    binary = tmp_path / "noise.mhd"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    with pytest.raises(MetaImageError, match="not a MetaImage"):
        read_metaimage_header(str(binary))


def test_is_oblique() -> None:
    assert not is_oblique(np.eye(3)) and not is_oblique(np.diag([-1.0, -1.0, 1.0]))
    assert not is_oblique(np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1.0]]))
    c, s = np.cos(0.01), np.sin(0.01)  # 0.57 degrees: a real tilt
    assert is_oblique(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))


def _image_boxes(prepared: str, item: dict) -> tuple[np.ndarray, np.ndarray]:
    """The prepared image and its datalist boxes in image coordinates (xyzxyz), the training loader's way."""
    data = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            ConvertBoxToStandardModed("box", mode="cccwhd"),
            AffineBoxToImageCoordinated("box", box_ref_image_keys="image", affine_lps_to_ras=True),
        ]
    )({"image": os.path.join(prepared, item["image"]), "box": np.asarray(item["box"], dtype=np.float64).reshape(-1, 6)})
    return data["image"][0].numpy(), np.asarray(data["box"])


def test_nodules_at_their_world_position(prepared: str, truth: dict) -> None:
    with open(os.path.join(prepared, "dataset_fold0.json")) as f:
        fold = json.load(f)
    items = {os.path.basename(os.path.dirname(i["image"])): i for k in fold for i in fold[k]}
    nodules = bright = mirrored_bright = 0
    geometries = set()
    for uid, t in truth.items():
        item = items[uid]
        assert item["box"] == [[*n["center_lps"], *[n["diameter_mm"]] * 3] for n in t["nodules"]]
        assert item["label"] == [0] * len(t["nodules"])
        image, boxes = _image_boxes(prepared, item)
        header = nib.load(os.path.join(prepared, item["image"])).header
        assert header.get_data_dtype() == np.int16
        np.testing.assert_allclose(header.get_zooms(), TARGET_SPACING)
        for box in boxes:
            centre = np.round((box[:3] + box[3:]) / 2).astype(int)
            lo, hi = np.maximum(centre - 1, 0), centre + 2
            bright += int(image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].mean() > -300)  # lung: -850 HU
            mirror = (image.shape[0] - 1 - centre[0], image.shape[1] - 1 - centre[1], centre[2])
            mirrored_bright += int(image[mirror] > -300)  # where a reader ignoring the direction would look
            nodules += 1
            geometries.add((t["direction"], tuple(t["spacing"])))
    assert nodules == 40 and bright == nodules
    assert mirrored_bright < nodules // 2
    assert geometries == {(d, s) for d in ("identity", "flipped") for s in ((0.6, 0.6, 2.5), (0.8, 0.8, 1.0))}


def _uids(items: list[dict]) -> list[str]:
    return [os.path.basename(os.path.dirname(i["image"])) for i in items]


def test_folds(prepared: str, truth: dict) -> None:
    everything = set(truth)
    selections = []
    for k in range(10):
        with open(os.path.join(prepared, f"dataset_fold{k}.json")) as f:
            fold = json.load(f)
        assert list(fold) == ["training", "selection", "validation"]
        validation, training, selection = (_uids(fold[key]) for key in ("validation", "training", "selection"))
        assert validation == sorted(u for u, t in truth.items() if t["subset"] == k)
        assert len(selection) == 1 and len(training) == 17  # ceil(5% of 18)
        assert not set(training) & set(selection)
        assert set(training) | set(selection) | set(validation) == everything
        assert all(i["image"] == f"{u}/{u}.nii.gz" for i, u in zip(fold["training"], training))
        selections.append(selection[0])
    empty = next(u for u, t in truth.items() if not t["nodules"])
    with open(os.path.join(prepared, "dataset_fold0.json")) as f:
        assert {"image": f"{empty}/{empty}.nii.gz", "box": [], "label": []} in json.load(f)["validation"]
    assert len(set(selections)) >= 5  # not the same scan in every fold
    assert len({truth[u]["subset"] for u in selections}) >= 5


def test_manifest(prepared: str, truth: dict) -> None:
    with open(os.path.join(prepared, "luna16_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["counts"] == {"scans": 20, "prepared": 20, "skipped": 0} and manifest["problems"] == []
    entries = {e["seriesuid"]: e for e in manifest["scans"]}
    assert set(entries) == set(truth)
    for uid, t in truth.items():
        e = entries[uid]
        assert (e["subset"], e["status"], e["native_spacing"], e["shape"]) == (
            t["subset"],
            "prepared",
            t["spacing"],
            t["shape"],
        )
        flip = -1.0 if t["direction"] == "flipped" else 1.0
        assert e["direction"] == [[flip, 0.0, 0.0], [0.0, flip, 0.0], [0.0, 0.0, 1.0]]
        assert e["nodules"] == len(t["nodules"]) and e["problems"] == []
        assert e["prepared_shape"] == list(nib.load(os.path.join(prepared, e["image"])).shape)


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), folder)] = f.read()
    return out


def test_resume_after_an_interruption(raw: str, prepared: str, truth: dict, tmp_path) -> None:
    data = str(tmp_path / "data")
    shutil.copytree(prepared, data)  # copy2: the finished scans keep their mtimes
    uids = sorted(truth)
    lost = uids[:2]  # interrupted before these two were finished
    for uid in lost:
        os.unlink(os.path.join(data, uid, f"{uid}.nii.gz"))
    partial = os.path.join(data, lost[0], ".tmp_killed.nii.gz")
    with open(partial, "wb") as f:
        f.write(b"\x1f\x8b half a file")
    before = {u: os.stat(os.path.join(data, u, f"{u}.nii.gz")).st_mtime_ns for u in uids[2:]}
    result = prepare_luna16(raw, data, workers=1, progress=False)
    assert (result.converted, result.reused, result.prepared) == (2, 18, 20)
    assert before == {u: os.stat(os.path.join(data, u, f"{u}.nii.gz")).st_mtime_ns for u in uids[2:]}
    assert not os.path.exists(partial)
    assert _files(data) == _files(prepared)


@pytest.mark.slow  # worker processes
def test_parallel_output_identical_to_serial(tmp_path) -> None:
    raw = str(tmp_path / "raw")
    generate_luna16(raw, subsets=2, scans_per_subset=2, seed=3, progress=False)
    serial, parallel = str(tmp_path / "serial"), str(tmp_path / "parallel")
    assert prepare_luna16(raw, serial, workers=1, progress=False).converted == 4
    assert prepare_luna16(raw, parallel, workers=2, progress=False).converted == 4
    files = _files(serial)
    assert len([n for n in files if n.endswith(".nii.gz")]) == 4 and "dataset_fold1.json" in files
    assert _files(parallel) == files


def _edit(path: str, key: str, value: str) -> None:
    with open(path) as f:
        lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in f.read().splitlines()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """Three subsets of three scans (subset3..9 missing), five scans broken in five ways, one uid listed only."""
    raw = str(tmp_path_factory.mktemp("luna16_broken"))
    generate_luna16(raw, subsets=3, scans_per_subset=3, seed=1, fov_mm=(40.0, 40.0, 40.0), progress=False)
    with open(os.path.join(raw, "luna16_truth.json")) as f:
        truth = json.load(f)
    uids = [u for u, t in truth.items() if t["nodules"]]
    broken = dict(zip(("raw_size", "unlisted", "outside", "spacing", "oblique"), uids))
    mhd = {why: _mhd(raw, truth, uid) for why, uid in broken.items()}
    with open(mhd["raw_size"][:-4] + ".raw", "ab") as f:
        f.write(b"\0\0")
    with open(os.path.join(raw, "seriesuids.csv")) as f:
        listed = [line.strip() for line in f if line.strip() and line.strip() != broken["unlisted"]]
    with open(os.path.join(raw, "seriesuids.csv"), "w") as f:
        f.write("\n".join([*listed, "9.9.9.listed.only"]) + "\n")
    with open(os.path.join(raw, "annotations.csv"), "a", newline="") as f:
        csv.writer(f).writerow([broken["outside"], 500.0, 0.0, 0.0, 6.0])
    _edit(mhd["spacing"], "ElementSpacing", "0.6 0.6 12.0")
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    _edit(mhd["oblique"], "TransformMatrix", f"{c} {s} 0 {-s} {c} 0 0 0 1")
    return raw, mhd


def test_every_problem_is_one_line_and_its_scan_skipped(broken: tuple[str, dict[str, str]], tmp_path) -> None:
    raw, mhd = broken
    data = str(tmp_path / "data")
    result = prepare_luna16(raw, data, workers=1, progress=False)
    assert (result.prepared, result.skipped, result.converted) == (4, 5, 4)
    lines = list(result.problems)
    assert all("\n" not in line for line in lines)
    missing = [line for line in lines if "subset folder missing" in line]
    assert sorted(missing) == sorted(
        f"{os.path.join(raw, f'subset{k}')}: subset folder missing; fold {k} is not written" for k in range(3, 10)
    )
    expected = {
        "raw_size": "bytes, DimSize",
        "unlisted": "is not listed in",
        "outside": "lies outside its scan",
        "spacing": "implausible spacing",
        "oblique": "oblique direction",
    }
    for why, words in expected.items():
        assert len([line for line in lines if words in line]) == 1, why
        line = next(line for line in lines if words in line)
        assert (os.path.basename(mhd[why]) in line) or (
            "annotations.csv line" in line and os.path.basename(mhd[why])[:-4] in line
        )
        assert not os.path.exists(os.path.join(data, os.path.basename(mhd[why])[:-4]))
    assert [line for line in lines if "9.9.9.listed.only" in line] == [
        f"{os.path.join(raw, 'seriesuids.csv')}: 9.9.9.listed.only is listed but no subset folder holds "
        "9.9.9.listed.only.mhd"
    ]
    assert len(lines) == 7 + 5 + 1
    with open(result.manifest) as f:
        manifest = json.load(f)
    statuses = {e["seriesuid"]: e["status"] for e in manifest["scans"]}
    assert sorted(statuses.values()).count("skipped") == 5 and manifest["problems"] == lines
    assert [os.path.basename(p) for p in result.folds] == [f"dataset_fold{k}.json" for k in range(3)]


def test_strict_refuses_before_writing(broken: tuple[str, dict[str, str]], tmp_path) -> None:
    raw, _ = broken
    data = tmp_path / "data"
    with pytest.raises(Luna16PrepareError, match=r"13 problem\(s\), nothing written \(prepare_policy strict\)"):
        prepare_luna16(raw, str(data), policy="strict", workers=1, progress=False)
    assert not data.exists()
    phantoms = tmp_path / "phantoms"
    phantoms.mkdir()
    (phantoms / "phantom_truth.json").write_text("{}")
    with pytest.raises(Luna16PrepareError, match="is the bundle's phantom data"):
        prepare_luna16(raw, str(phantoms), workers=1, progress=False)
    assert os.listdir(phantoms) == ["phantom_truth.json"]


def test_compressed_data_checked_before_itk(tmp_path) -> None:
    raw = str(tmp_path / "raw")
    generate_luna16(raw, subsets=10, scans_per_subset=1, seed=4, fov_mm=(40.0, 40.0, 40.0), progress=False)
    plain = str(tmp_path / "plain")
    assert prepare_luna16(raw, plain, workers=1, progress=False).converted == 10
    good, bad = (glob.glob(os.path.join(raw, f"subset{k}", "*.mhd"))[0] for k in (0, 1))
    with open(good[:-4] + ".raw", "rb") as f:
        data = f.read()
    with open(good[:-4] + ".raw", "wb") as f:
        f.write(zlib.compress(data))
    for path in (good, bad):  # the bad one keeps its uncompressed bytes: ITK only prints "Uncompress failed"
        _edit(path, "CompressedData", "True")
    data = str(tmp_path / "data")
    result = prepare_luna16(raw, data, workers=1, progress=False)
    assert (result.prepared, result.skipped) == (9, 1)
    uid = os.path.basename(good)[:-4]
    assert _files(os.path.join(data, uid)) == _files(os.path.join(plain, uid))
    corrupt = "its compressed data is corrupt (Error -3 while decompressing data: incorrect header check)"
    assert list(result.problems) == [f"MetaImage {bad}: {corrupt}; download it again"]
    assert not os.path.exists(os.path.join(data, os.path.basename(bad)[:-4]))
    with open(result.manifest) as f:
        assert [e["status"] for e in json.load(f)["scans"]] == ["prepared", "failed", *["prepared"] * 8]
    with pytest.raises(Luna16PrepareError, match="1 scan\\(s\\) failed to convert; first: MetaImage"):
        prepare_luna16(raw, str(tmp_path / "strict"), policy="strict", workers=1, progress=False)


@pytest.mark.slow
def test_bundle_run_id(tmp_path) -> None:
    raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
    generate_luna16(raw, subsets=2, scans_per_subset=1, seed=2, fov_mm=(40.0, 40.0, 40.0), progress=False)
    command = [sys.executable, "-m", "monai.bundle", "run", "prepare_luna16", "--config_file", "configs/train.json"]
    command += ["--bundle_root", str(tmp_path), "--luna16_dir", raw, "--dataset_dir", data, "--prepare_workers", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["data", "raw"]  # no phantoms, no data check output
    assert sorted(n for n in os.listdir(data) if n.endswith(".json")) == [
        "dataset_fold0.json",
        "dataset_fold1.json",
        "luna16_manifest.json",
    ]
    strict = subprocess.run(
        [*command, "--prepare_policy", "strict"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert strict.returncode == 1
    assert strict.stderr.strip().splitlines()[-1].startswith(f"{raw}: 8 problem(s), nothing written")
    # a forgotten --dataset_dir: train.json's default, the bundle's phantom folder, is never an output
    forgotten = [a for a in command if a not in ("--dataset_dir", data)]
    refused = subprocess.run(forgotten, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert "is the bundle's phantom data; give the output folder with --dataset_dir DATA" in last
    assert not os.path.exists(tmp_path / "data" / "phantoms")
