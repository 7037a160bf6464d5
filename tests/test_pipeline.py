"""The training data pipeline: the persistent cache of compact volumes, the cheap crop and the cheap augmentations.

Everything runs on tiny phantoms (64 x 64 x 32) through train.json's own transforms.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import parse
from monai.apps.detection.transforms.dictionary import BoxToMaskd, MaskToBoxd, RandCropBoxByPosNegLabeld
from monai.data import CacheDataset
from monai.transforms import Compose, DeleteItemsd, NormalizeIntensityd, RandGaussianSmoothd, RandRotated, SpatialCrop
from scripts.data import cache
from scripts.data.augment import RandRotateBoxd, SeparableRandGaussianSmoothd
from scripts.data.cache import SharedPersistentDataset, detection_dataset
from scripts.data.crop import (
    CompactRandCropBoxByPosNegLabeld,
    NormalizeIntensityFromStatsd,
    VolumeIntensityStatsd,
    frame_of,
)
from scripts.data.phantoms import generate_dataset
from scripts.tools.benchmark_loader import zoo_transforms

PATCH = [32, 32, 16]
AIR_LEVEL = (-500 + 1024) / 1324  # CompactVolumed's body threshold through the HU window


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("pipeline_phantoms")
    generate_dataset(str(out), num_train=3, num_val=1, shape=(64, 64, 32), progress=False)
    return str(out)


def _parser(dataset_dir: str, root: str, **overrides):
    return parse(
        "train.json",
        bundle_root=root,
        dataset_dir=dataset_dir,
        data_check="off",
        write_outputs=False,
        patch_size=PATCH,
        batch_size=4,
        **overrides,
    )


def _deterministic(parser) -> Compose:
    """The cached part of the training pipeline."""
    return Compose(
        [*parser.get_parsed_content("train#preprocessing_transforms"), parser.get_parsed_content("compact_volume")]
    )


def test_cached_run_and_uncached_run_see_the_same_deterministic_tensors(phantoms, tmp_path, monkeypatch):
    parser = _parser(phantoms, str(tmp_path))
    items = parser.get_parsed_content("datalists")["training"]
    persistent = parser.get_parsed_content("train#dataset")
    assert isinstance(persistent, SharedPersistentDataset)
    assert str(persistent.cache_dir).startswith(str(tmp_path / "data"))  # under the bundle's ignored data folder
    ram = detection_dataset(items, persistent.transform, cache_dir="", cache_rate=1.0, num_workers=0)
    built = [persistent._cachecheck(item) for item in items]  # first use: computed and written
    monkeypatch.setattr(persistent, "_pre_transform", lambda item: pytest.fail("cache miss: recomputed"))
    deterministic = _deterministic(parser)
    for index, item in enumerate(items):
        from_disk = persistent._cachecheck(item)
        direct = deterministic(dict(item))
        for got in (from_disk, ram._cache[index], built[index]):
            assert got["image"].dtype == torch.int16
            assert torch.equal(got["image"].as_tensor(), direct["image"].as_tensor())
            assert torch.equal(torch.as_tensor(got["box"]), torch.as_tensor(direct["box"]))
            assert torch.equal(torch.as_tensor(got["label"]), torch.as_tensor(direct["label"]))
            assert frame_of(got, "image") == frame_of(direct, "image")
            assert got["image"].meta["filename_or_obj"] == item["image"]
    assert len(os.listdir(persistent.cache_dir)) == len(items)  # one file per volume, no temporary left


def test_a_cache_that_cannot_be_written_trains_on_uncached(phantoms, tmp_path, monkeypatch, caplog):
    # a full disk (or a read-only cache folder) costs the cache, not the run: the item is built and returned
    parser = _parser(phantoms, str(tmp_path))
    item = parser.get_parsed_content("datalists")["training"][0]
    persistent = parser.get_parsed_content("train#dataset")

    def disk_full(path, write):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(cache, "write_atomically", disk_full)
    with caplog.at_level(logging.WARNING, logger="scripts.data.cache"):
        got = persistent._cachecheck(item)
    direct = _deterministic(parser)(dict(item))
    assert torch.equal(got["image"].as_tensor(), direct["image"].as_tensor())
    assert torch.equal(torch.as_tensor(got["box"]), torch.as_tensor(direct["box"]))
    assert os.listdir(persistent.cache_dir) == []
    (warning,) = [r.getMessage() for r in caplog.records if "could not write cache file" in r.getMessage()]
    assert str(persistent.cache_path(item)) in warning and "No space left on device" in warning


def test_compact_volume_holds_the_body_and_the_boxes_exactly(phantoms, tmp_path):
    parser = _parser(phantoms, str(tmp_path))
    item = parser.get_parsed_content("datalists")["training"][0]
    full = Compose(parser.get_parsed_content("train#preprocessing_transforms"))(dict(item))
    stored = parser.get_parsed_content("compact_volume")(dict(full))
    frame = frame_of(stored, "image")
    region = tuple(slice(s, s + n) for s, n in zip(frame.start, stored["image"].shape[1:]))
    assert frame.shape == tuple(full["image"].shape[1:])
    assert torch.equal(stored["image"].as_tensor().float(), full["image"].as_tensor()[(slice(None), *region)])
    outside = torch.ones(full["image"].shape, dtype=torch.bool)
    outside[(slice(None), *region)] = False
    assert outside.any() and float(full["image"][outside].max()) < -500  # only air was left out
    assert torch.equal(stored["box"], full["box"])  # boxes stay in the frame
    # the stored part's affine is the frame's, moved to its first voxel
    np.testing.assert_allclose(
        stored["image"].affine.numpy(), (full["image"].affine @ _translation(frame.start)).numpy(), atol=1e-9
    )
    assert stored["image"].numel() < 0.9 * full["image"].numel()


def test_compact_volume_keeps_nonfinite_voxels_for_the_guard(phantoms, tmp_path):
    parser = _parser(phantoms, str(tmp_path))
    item = parser.get_parsed_content("datalists")["training"][0]
    full = Compose(parser.get_parsed_content("train#preprocessing_transforms"))(dict(item))
    body = torch.nonzero(full["image"][0] > 0)[0].tolist()
    full["image"][(0, *body)] = float("nan")
    stored = parser.get_parsed_content("compact_volume")(dict(full))
    assert int(torch.isnan(stored["image"]).sum()) == 1  # not rounded into an ordinary HU value
    assert stored["image"].meta["filename_or_obj"] == item["image"]


def _translation(offset) -> torch.Tensor:
    t = torch.eye(4, dtype=torch.float64)
    t[:3, 3] = torch.as_tensor(offset, dtype=torch.float64)
    return t


def test_patches_of_the_compact_volume_are_the_zoo_patches(phantoms, tmp_path):
    """Same centres, same slices, same boxes; the voxels equal the zoo's (intensity on the whole volume, then the
    crop) wherever the stored part reaches, and the pad value where the zoo shows air that was left out."""
    parser = _parser(phantoms, str(tmp_path))
    item = parser.get_parsed_content("datalists")["training"][1]
    intensity = parser.get_parsed_content("intensity_transforms")["hu_window"]
    crop = parser.get_parsed_content("train#random_transforms")[0]
    assert isinstance(crop, CompactRandCropBoxByPosNegLabeld)
    full = Compose(parser.get_parsed_content("train#preprocessing_transforms"))(dict(item))
    stored = parser.get_parsed_content("compact_volume")(dict(full))
    zoo_full = intensity(dict(full))
    ours = [intensity(p) for p in crop.set_random_state(3)(stored)]
    theirs_centres = crop.set_random_state(3)(dict(full))  # a whole volume is its own frame: same draws
    frame = frame_of(stored, "image")
    for mine, whole in zip(ours, theirs_centres):
        assert torch.equal(mine["box"], whole["box"]) and torch.equal(mine["label"], whole["label"])
        start = (torch.linalg.inv(full["image"].affine) @ mine["image"].affine)[:3, 3].round().long().tolist()
        zoo_patch = SpatialCrop(roi_start=start, roi_end=[s + p for s, p in zip(start, PATCH)])(zoo_full["image"])
        inside = torch.zeros((1, *PATCH), dtype=torch.bool)
        lo = [max(f - s, 0) for f, s in zip(frame.start, start)]
        hi = [min(f + n - s, p) for f, n, s, p in zip(frame.start, stored["image"].shape[1:], start, PATCH)]
        inside[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))] = True
        assert torch.equal(mine["image"].as_tensor()[inside], zoo_patch.as_tensor()[inside])
        assert torch.all(mine["image"][~inside] == 0.0)  # -1024 HU through the window
        assert torch.all(zoo_patch[~inside] < AIR_LEVEL)
        assert mine["image"].meta["filename_or_obj"] == item["image"]


def test_crop_centres_have_the_zoo_distribution():
    """Our rejection sampler against MONAI's index arrays, on a small frame with two overlapping boxes."""
    shape, patch = (40, 36, 20), (16, 16, 8)
    boxes = torch.tensor([[5.0, 6.0, 3.0, 12.0, 11.0, 7.0], [9.0, 8.0, 4.0, 15.0, 14.0, 9.0]])
    data = {"image": torch.zeros((1, *shape)), "box": boxes, "label": torch.tensor([0, 0])}
    kwargs = {"image_keys": "image", "box_keys": "box", "label_keys": "label", "spatial_size": patch}
    ours = CompactRandCropBoxByPosNegLabeld(**kwargs, pos=1, neg=2, num_samples=1).set_random_state(0)
    zoo = RandCropBoxByPosNegLabeld(**kwargs, pos=1, neg=2, num_samples=1).set_random_state(1)
    draws = 3000
    centres = {}
    for name, sampler in (("ours", ours), ("zoo", zoo)):
        sampler.spatial_size = patch
        found = []
        for _ in range(draws):
            sampler.randomize(boxes, shape)
            found.append(sampler.centers[0])
        centres[name] = np.asarray(found)
    for axis, size in enumerate(shape):
        a = np.bincount(centres["ours"][:, axis], minlength=size) / draws
        b = np.bincount(centres["zoo"][:, axis], minlength=size) / draws
        assert 0.5 * np.abs(a - b).sum() < 0.06, (axis, a, b)  # total variation, sampling noise about 0.03
    # positive crops hold a whole box: their share is pos / (pos + neg), plus the odd negative moved onto a box
    for name in ("ours", "zoo"):
        share = np.mean([_holds_a_whole_box(c, patch, boxes) for c in centres[name]])
        assert 0.3 < share < 0.45, (name, share)
    assert len(ours(data)) == 1 and data["image"].shape == (1, *shape)  # the input is left as it was


def _holds_a_whole_box(centre, patch, boxes) -> bool:
    start = [c - p // 2 for c, p in zip(centre, patch)]
    return any(all(s <= b[i] and b[i + 3] <= s + p for i, (s, p) in enumerate(zip(start, patch))) for b in boxes)


def _nodule_phantoms(phantoms: str, out: str) -> str:
    """The phantoms with every voxel replaced by nodule (300 HU) or air (-1000 HU), same affines and datalist."""
    truth = json.load(open(os.path.join(phantoms, "phantom_truth.json")))
    datalist = json.load(open(os.path.join(phantoms, "datalist.json")))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for name, case in truth.items():
        img = nib.load(os.path.join(phantoms, name))
        hu = np.asarray(img.dataobj)
        nodules = np.zeros(hu.shape, dtype=bool)
        for n in case["nodules"]:
            box = tuple(slice(a, b) for a, b in zip(n["voxel_index_box"][:3], n["voxel_index_box"][3:]))
            nodules[box] = hu[box] > -400  # vessels keep clear of nodule boxes
        volume = np.where(nodules, 300, -1000).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, img.affine), os.path.join(out, name))
    with open(os.path.join(out, "datalist.json"), "w") as f:
        json.dump(datalist, f)
    return out


@pytest.mark.parametrize("spatial_prob", [0.0, 1.0])
def test_boxes_enclose_the_nodules_after_the_random_chain(phantoms, tmp_path, spatial_prob):
    """Every box holds a nodule, and fits it when the nodule is whole; nodule voxels lie in boxes, but for slivers
    at a patch border whose boxes MONAI's crop drops (narrower than a voxel). Zoom and rotation never (0) or always
    (1) fire."""
    data = _nodule_phantoms(phantoms, str(tmp_path / "nodules"))
    overrides = {f"train#random_transforms#{i}#prob": 0.0 for i in (9, 10, 11, 12, 13)}  # intensity changes off
    overrides.update({"train#random_transforms#2#prob": spatial_prob, "train#random_transforms#8#prob": spatial_prob})
    parser = _parser(data, str(tmp_path), **overrides)
    names = [type(t).__name__ for t in parser.get_parsed_content("train#random_transforms")]
    assert names[2] == "RandZoomBoxd" and names[8] == "RandRotateBoxd" and names[9] == "RandGaussianNoised"
    dataset = parser.get_parsed_content("train#dataset")
    dataset.transform.set_random_state(int(spatial_prob))
    # a box [lo, hi) holds voxel centres lo..hi-1; zoom and rotation resample both, by up to two voxels apart
    slack = 1.0 if spatial_prob == 0 else 3.0
    boxes_seen, nodule_voxels, outside_voxels = 0, 0, 0
    for _ in range(3):
        for index in range(len(dataset)):
            for crop in dataset[index]:
                voxels = torch.nonzero(crop["image"][0] > 0.5).float()  # nodule voxel centres
                boxes = crop["box"].float()
                near = (voxels[:, None, :] >= boxes[None, :, :3] - 1.0) & (
                    voxels[:, None, :] <= boxes[None, :, 3:] + 1.0
                )
                nodule_voxels += len(voxels)
                outside_voxels += int((~near.all(-1).any(-1)).sum())
                size = torch.tensor(crop["image"].shape[1:], dtype=torch.float32)
                for box in boxes:
                    held = voxels[((voxels >= box[:3] - 1.0) & (voxels <= box[3:] + 1.0)).all(-1)]
                    assert len(held), "a box without its nodule"
                    if torch.all(box[:3] >= 1) and torch.all(box[3:] <= size - 1):  # a whole nodule: a tight box
                        assert torch.all(held.min(0).values - box[:3] <= slack), "a box much larger than its nodule"
                        assert torch.all(box[3:] - held.max(0).values <= slack), "a box much larger than its nodule"
                boxes_seen += len(boxes)
    assert boxes_seen >= 12  # pos = neg = 1, 4 crops per draw, 36 crops
    assert outside_voxels <= 0.02 * nodule_voxels


def test_rotate_boxd_equals_the_zoo_mask_recipe():
    g = torch.Generator().manual_seed(0)
    shape = (40, 36, 20)
    for trial in range(12):
        image = torch.rand(1, *shape, generator=g)
        n = trial % 4
        lo = torch.rand(n, 3, generator=g) * torch.tensor([30.0, 26.0, 14.0])
        hi = torch.minimum(lo + 1 + torch.rand(n, 3, generator=g) * torch.tensor([9.0, 9.0, 5.0]), torch.tensor(shape))
        boxes, labels = torch.cat([lo, hi], 1), torch.zeros(n, dtype=torch.long)
        prob = (0.0, 1.0, 0.5)[trial % 3]
        rotate = {"range_x": 0.5236, "range_y": 0.5236, "range_z": 0.5236, "prob": prob, "padding_mode": "zeros"}
        zoo = Compose(
            [
                BoxToMaskd(
                    box_keys="box",
                    label_keys="label",
                    box_mask_keys="box_mask",
                    box_ref_image_keys="image",
                    min_fg_label=0,
                    ellipse_mask=True,
                ),
                RandRotated(keys=["image", "box_mask"], mode=["nearest", "nearest"], **rotate),
                MaskToBoxd(box_keys="box", box_mask_keys="box_mask", label_keys="label", min_fg_label=0),
                DeleteItemsd(keys="box_mask"),
            ]
        )
        zoo.transforms[1].set_random_state(trial)  # after Compose, which seeds its transforms itself
        ours = RandRotateBoxd("image", "box", "label", mode="nearest", **rotate).set_random_state(trial)
        a = zoo({"image": image.clone(), "box": boxes.clone(), "label": labels.clone()})
        b = ours({"image": image.clone(), "box": boxes.clone(), "label": labels.clone()})
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"])), trial
        assert torch.equal(torch.as_tensor(a["box"]).float(), b["box"]), trial
        assert torch.equal(torch.as_tensor(a["label"]).long(), b["label"]), trial


def test_separable_smoothing_equals_monai_smoothing():
    image = torch.rand(1, 30, 28, 16, generator=torch.Generator().manual_seed(0))
    sigma = {"sigma_x": (0.5, 1.0), "sigma_y": (0.5, 1.0), "sigma_z": (0.5, 1.0), "prob": 0.5}
    for seed in range(6):
        a = RandGaussianSmoothd("image", **sigma).set_random_state(seed)({"image": image})["image"]
        b = SeparableRandGaussianSmoothd("image", **sigma).set_random_state(seed)({"image": image})["image"]
        torch.testing.assert_close(torch.as_tensor(b), torch.as_tensor(a), atol=1e-6, rtol=0)


def test_zscore_on_a_patch_equals_zscore_on_the_whole_volume(phantoms, tmp_path):
    parser = _parser(phantoms, str(tmp_path), intensity_norm="zscore")
    item = parser.get_parsed_content("datalists")["training"][0]
    full = Compose(parser.get_parsed_content("train#preprocessing_transforms"))(dict(item))
    assert isinstance(parser.get_parsed_content("intensity_stats")["zscore"][0], VolumeIntensityStatsd)
    zscore = NormalizeIntensityd("image", nonzero=False, channel_wise=True)
    whole = zscore({"image": full["image"].clone()})["image"]  # it works in place
    stored = parser.get_parsed_content("compact_volume")(dict(full))
    patch = parser.get_parsed_content("train#random_transforms")[0].set_random_state(0)(stored)[0]
    normalised = NormalizeIntensityFromStatsd("image")(patch)["image"]
    start = (torch.linalg.inv(full["image"].affine) @ patch["image"].affine)[:3, 3].round().long().tolist()
    expected = SpatialCrop(roi_start=start, roi_end=[s + p for s, p in zip(start, PATCH)])(whole)
    frame = frame_of(stored, "image")
    inside = tuple(
        slice(max(f - s, 0), min(f + n - s, p))
        for f, n, s, p in zip(frame.start, stored["image"].shape[1:], start, PATCH)
    )
    assert torch.equal(normalised[(slice(None), *inside)], expected.as_tensor()[(slice(None), *inside)])
    # the validation pipeline normalises the whole volume with the same statistics
    validation = parser.get_parsed_content("validate#preprocessing")(dict(item))["image"]
    assert torch.equal(torch.as_tensor(validation), whole.as_tensor())


def test_ram_cache_is_not_changed_by_the_random_chain(phantoms, tmp_path):
    parser = _parser(phantoms, str(tmp_path), cache_dir="", cache_rate=1.0, num_workers=0)
    dataset = parser.get_parsed_content("train#dataset")
    assert isinstance(dataset, CacheDataset) and not dataset.copy_cache
    before = [c["image"].clone() for c in dataset._cache]
    for index in range(len(dataset)):
        dataset[index]
    assert all(torch.equal(b, c["image"]) for b, c in zip(before, dataset._cache))


def _read_all(cache_dir: str, dataset_dir: str, root: str, queue) -> None:
    parser = _parser(dataset_dir, root, cache_dir=cache_dir)
    dataset = parser.get_parsed_content("train#dataset")
    queue.put([int(dataset._cachecheck(item)["image"].long().sum()) for item in dataset.data])


@pytest.mark.slow  # worker processes
def test_shared_cache_is_safe_for_concurrent_writers_and_changed_files(phantoms, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(phantoms, data)  # one image is rewritten below
    cache = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")  # fork after torch threads start can hang
    queue = context.Queue()
    workers = [context.Process(target=_read_all, args=(cache, data, str(tmp_path), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    sums = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert all(s == sums[0] for s in sums)  # two processes building the same files at once read whole ones
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and not any(f.endswith(".tmp") for f in files)
    dataset = _parser(data, str(tmp_path), cache_dir=cache).get_parsed_content("train#dataset")
    item = dataset.data[0]
    # a truncated file is rebuilt
    path = dataset.cache_path(item)
    path.write_bytes(path.read_bytes()[:100])
    assert int(dataset._cachecheck(item)["image"].long().sum()) == sums[0][0]
    # a volume rewritten at the same path gets a new entry, not the stale one
    img = nib.load(item["image"])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine), item["image"])
    assert dataset.cache_path(item) != path
    assert int(dataset._cachecheck(item)["image"].long().sum()) != sums[0][0]


def test_benchmark_zoo_arm_is_the_zoo_chain(phantoms, tmp_path):
    parser = _parser(phantoms, str(tmp_path))
    chain = zoo_transforms(parser)
    names = [type(t).__name__ for t in chain]
    assert names.index("ScaleIntensityRanged") < names.index("RandCropBoxByPosNegLabeld")  # window on the volume
    assert {"BoxToMaskd", "RandRotated", "MaskToBoxd", "DeleteItemsd", "RandGaussianSmoothd"} <= set(names)
    assert not {"CompactVolumed", "CompactRandCropBoxByPosNegLabeld", "RandRotateBoxd"} & set(names)
    crops = Compose(chain)(dict(parser.get_parsed_content("datalists")["training"][0]))
    assert len(crops) == 4 and all(list(c["image"].shape[1:]) == PATCH for c in crops)
