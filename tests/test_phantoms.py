"""Tests for the synthetic chest-CT phantom generator (scripts/data/phantoms.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.data.phantoms import DEFAULT_SPACING, ensure_dataset, generate_case, generate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (64, 64, 32)


def _load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_dataset(str(out), num_train=2, num_val=1, seed=7, shape=SHAPE, progress=False)
    return out


def _items(root: Path) -> list[dict]:
    datalist = _load(root / "datalist.json")
    return datalist["training"] + datalist["validation"]


def _world_lps_to_voxel_box(box: list[float], affine: np.ndarray) -> np.ndarray:
    """cccwhd LPS world box -> xyzxyz box in image coordinates (voxel centre i at coordinate i)."""
    centre, size = np.asarray(box[:3]), np.asarray(box[3:])
    corners_lps = np.stack([centre - size / 2, centre + size / 2])
    corners_ras = corners_lps * np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(affine)
    vox = corners_ras @ inv[:3, :3].T + inv[:3, 3]
    return np.concatenate([vox.min(axis=0), vox.max(axis=0)])


def _component(mask: np.ndarray, seed: tuple[int, int, int]) -> np.ndarray:
    """6-connected component of ``mask`` containing ``seed`` (plain numpy flood fill)."""
    region = np.zeros_like(mask)
    region[seed] = mask[seed]
    while True:
        grown = region.copy()
        for axis in range(3):
            grown[(slice(None),) * axis + (slice(1, None),)] |= region[(slice(None),) * axis + (slice(None, -1),)]
            grown[(slice(None),) * axis + (slice(None, -1),)] |= region[(slice(None),) * axis + (slice(1, None),)]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def test_generate_case_is_deterministic() -> None:
    a = generate_case(np.random.default_rng(3), SHAPE)
    b = generate_case(np.random.default_rng(3), SHAPE)
    c = generate_case(np.random.default_rng(4), SHAPE)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_dataset_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    same, other = tmp_path / "same", tmp_path / "other"
    generate_dataset(str(same), num_train=2, num_val=1, seed=7, shape=SHAPE, progress=False)
    generate_dataset(str(other), num_train=2, num_val=1, seed=8, shape=SHAPE, progress=False)
    for name in ("datalist.json", "phantom_truth.json"):
        assert (dataset / name).read_bytes() == (same / name).read_bytes()
    assert _load(dataset / "datalist.json") != _load(other / "datalist.json")
    for item in _items(dataset):
        assert (dataset / item["image"]).read_bytes() == (same / item["image"]).read_bytes()
        assert not np.array_equal(
            np.asarray(nib.load(dataset / item["image"]).dataobj), np.asarray(nib.load(other / item["image"]).dataobj)
        )


def test_datalist_format_and_volumes(dataset: Path) -> None:
    datalist = _load(dataset / "datalist.json")
    assert [it["image"] for it in datalist["training"]] == ["images/train_000.nii.gz", "images/train_001.nii.gz"]
    assert [it["image"] for it in datalist["validation"]] == ["images/val_000.nii.gz"]
    for item in _items(dataset):
        assert 1 <= len(item["box"]) <= 3
        assert item["label"] == [0] * len(item["box"])
        assert all(len(b) == 6 and min(b[3:]) > 0 for b in item["box"])
        img = nib.load(dataset / item["image"])
        assert img.get_data_dtype() == np.int16
        assert img.shape == SHAPE
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        np.testing.assert_allclose(np.diag(img.affine)[:3], DEFAULT_SPACING)
        np.testing.assert_allclose(img.affine[:3, :3], np.diag(DEFAULT_SPACING))
        assert np.linalg.norm(img.affine[:3, 3]) > 1.0  # a real origin, not the voxel grid
        vol = np.asarray(img.dataobj)
        assert vol.dtype == np.int16
        assert vol.min() >= -1100 and vol.max() < 1000
        assert abs(np.median(vol[:3, :3, :]) - (-1000)) < 30  # air in the corners
        counts, edges = np.histogram(vol, bins=np.arange(-920, -499, 10))
        assert -900 <= edges[np.argmax(counts)] <= -800  # the lung peak, around -850 HU


def test_empty_fraction_makes_cases_without_nodules(tmp_path: Path) -> None:
    path = generate_dataset(
        str(tmp_path), num_train=2, num_val=1, seed=1, shape=SHAPE, empty_fraction=1.0, progress=False
    )
    items = _items(Path(path).parent)
    assert all(it["box"] == [] and it["label"] == [] for it in items)


def test_world_boxes_enclose_nodules(dataset: Path) -> None:
    truth = _load(dataset / "phantom_truth.json")
    for item in _items(dataset):
        img = nib.load(dataset / item["image"])
        vol = np.asarray(img.dataobj)
        nodules = truth[item["image"]]["nodules"]
        assert len(nodules) == len(item["box"])
        for box, nodule in zip(item["box"], nodules, strict=True):
            vbox = _world_lps_to_voxel_box(box, img.affine)
            np.testing.assert_allclose(vbox, nodule["voxel_box"], atol=1e-3)
            centre = np.asarray(nodule["center_voxel"])
            assert np.all(vbox[:3] <= centre) and np.all(centre <= vbox[3:])
            # index range of the covered voxels and the slicing box agree with the image-coordinate box
            np.testing.assert_allclose(np.asarray(nodule["voxel_index_box"]) - 0.5, vbox, atol=1e-3)
            seed = tuple(int(round(c)) for c in centre)
            assert vol[seed] > -300
            # the bright blob connected to the centre lies inside the box grown by one voxel
            lo = np.maximum(np.floor(vbox[:3]).astype(int) - 4, 0)
            hi = np.minimum(np.ceil(vbox[3:]).astype(int) + 5, SHAPE)
            block = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > -400
            blob = np.argwhere(_component(block, tuple(np.asarray(seed) - lo))) + lo
            assert np.all(blob >= vbox[:3] - 1) and np.all(blob <= vbox[3:] + 1)
            # just outside the box along each axis through the centre, the density is back to lung
            for axis in range(3):
                for side, edge in ((-1, vbox[axis]), (1, vbox[3 + axis])):
                    probe = list(seed)
                    probe[axis] = int(round(edge + side * 1.5))
                    assert vol[tuple(probe)] < -500


def test_boxes_round_trip_through_monai(dataset: Path) -> None:
    from monai.apps.detection.transforms.dictionary import AffineBoxToImageCoordinated, ConvertBoxToStandardModed
    from monai.data import load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd

    transform = Compose(
        [
            LoadImaged(keys="image", image_only=False),
            EnsureChannelFirstd(keys="image"),
            EnsureTyped(keys=["image", "box"]),
            EnsureTyped(keys="label", dtype="long"),
            Orientationd(keys="image", axcodes="RAS"),
            ConvertBoxToStandardModed(box_keys="box", mode="cccwhd"),
            AffineBoxToImageCoordinated(
                box_keys="box", box_ref_image_keys="image", image_meta_key_postfix="meta_dict", affine_lps_to_ras=True
            ),
        ]
    )
    truth = _load(dataset / "phantom_truth.json")
    datalist = str(dataset / "datalist.json")
    for split in ("training", "validation"):
        for item in load_decathlon_datalist(datalist, True, split, base_dir=str(dataset)):
            rel = os.path.relpath(item["image"], dataset)
            out = transform(item)
            expected = np.array([n["voxel_box"] for n in truth[rel]["nodules"]])
            np.testing.assert_allclose(np.asarray(out["box"]), expected, atol=1e-3)


def test_ensure_dataset_generates_once(tmp_path: Path) -> None:
    dataset_dir = tmp_path / "data"
    datalist = dataset_dir / "datalist.json"
    path = ensure_dataset(str(datalist), str(dataset_dir), num_train=1, num_val=1, seed=2, shape=SHAPE)
    assert Path(path).resolve() == datalist.resolve()
    assert len(_load(datalist)["training"]) == 1
    image = dataset_dir / "images" / "train_000.nii.gz"
    stamp = image.stat().st_mtime_ns
    os.utime(image, ns=(stamp - 10**9, stamp - 10**9))
    assert ensure_dataset(str(datalist), str(dataset_dir), num_train=5, num_val=5, shape=SHAPE) == str(datalist)
    assert image.stat().st_mtime_ns == stamp - 10**9
    assert len(_load(datalist)["training"]) == 1
    # a datalist outside the dataset folder keeps image paths relative to the dataset folder
    outside = tmp_path / "lists" / "mine.json"
    ensure_dataset(str(outside), str(tmp_path / "other"), num_train=1, num_val=0, seed=2, shape=SHAPE)
    assert (tmp_path / "other" / _load(outside)["training"][0]["image"]).is_file()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_train": 0}, "num_train"), ({"num_val": -1}, "num_val"), ({"shape": (64, 64, 16)}, "shape")],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dataset(str(tmp_path), **{"num_train": 1, "num_val": 0, "shape": SHAPE, **kwargs})


@pytest.mark.slow
def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "scripts.data.phantoms", "--out", str(out)]
    cmd += ["--num-train", "2", "--num-val", "1", "--seed", "3", "--shape", "64", "64", "32"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 training + 1 selection + 1 validation" in result.stdout
    datalist = _load(out / "datalist.json")
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1
    assert nib.load(out / datalist["validation"][0]["image"]).shape == (64, 64, 32)
