"""Raw CT at inference: MetaImage (.mhd) through ITK, resampled to the model's grid, boxes in the scan's own world
(LPS mm), the LUNA16 submission file, and the model zoo's inference IDs.

The geometry tests run inference.json's real path (data check, ITK read, orientation, resampling, padding,
intensity, inferer, postprocessing, writer) with a stub detector that boxes the bright blobs of the image it is
given, in that image's coordinates: a nodule planted at a known LPS position in a flipped (direction diag(-1, -1, 1)),
anisotropic (0.6 x 0.6 x 2.5 mm) scan must come back at that position.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import run
from monai.handlers import CheckpointLoader
from scripts.data.luna16_csv import seriesuid_of
from scripts.data.luna16_phantoms import MetaImageGeometry, write_metaimage
from scripts.data.probe import voxel_free
from scripts.inference.io import InferenceFailed, list_inputs
from scripts.inference.run import VolumeInferer
from tests.bundle_helpers import TINY, bundle_paths, config, parse, save_tiny_model

MODEL_SPACING = (0.703125, 0.703125, 1.25)
NODULE_RADIUS_MM = 5.0
# centroids of the planted spheres come back within 0.11 mm; half a voxel's shift (0.3 mm or more) or a flip fails
TOLERANCE_MM = 0.25
# file: spacing, LPS direction (diagonal), shape, LPS offset, planted nodule centres (LPS mm)
SCANS: dict[str, dict[str, Any]] = {
    "flipped.mhd": {
        "spacing": (0.6, 0.6, 2.5),
        "direction": (-1.0, -1.0, 1.0),
        "shape": (80, 80, 16),
        "offset": (30.0, 20.0, -100.0),
        "nodules": [(10.3, -5.2, -85.0), (-8.1, 9.7, -72.6)],
    },
    "identity.nii.gz": {
        "spacing": (0.8, 0.8, 1.0),
        "direction": (1.0, 1.0, 1.0),
        "shape": (60, 60, 40),
        "offset": (-24.0, -30.0, 50.0),
        "nodules": [(-5.5, -12.25, 71.3)],
    },
}


def write_scan(path: Path, scan: dict[str, Any]) -> None:
    """Air (-1000 HU) with spheres of 100 HU at the planted LPS centres (world = O + D S index), as a MetaImage, or
    as a NIfTI (its RAS affine) when ``path`` ends with ``.nii.gz``."""
    spacing, direction = np.asarray(scan["spacing"]), np.asarray(scan["direction"])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in scan["shape"]], indexing="ij"), axis=-1)
    world = np.asarray(scan["offset"]) + direction * spacing * index
    volume = np.full(scan["shape"], -1000, dtype=np.int16)
    for centre in scan["nodules"]:
        volume[np.linalg.norm(world - np.asarray(centre), axis=-1) <= NODULE_RADIUS_MM] = 100
    if str(path).endswith(".nii.gz"):
        lps = np.eye(4)
        lps[:3, :3], lps[:3, 3] = np.diag(direction * spacing), scan["offset"]
        nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), str(path))
        return
    write_metaimage(str(path), volume, MetaImageGeometry(scan["spacing"], scan["offset"], np.diag(direction)))


class BlobDetector(torch.nn.Module):
    """
    A stand-in detector: one box per bright blob (intensity above 0.5 after the HU window) of each image, centred on
    the blob's centroid in that image's coordinates (``xyzxyz``); it records the spacing and shape it was given.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def forward(self, images: list[torch.Tensor], use_inferer: bool = False) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            affine = image.affine.double()
            self.seen.append(
                {
                    "spacing": affine[:3, :3].norm(dim=0).tolist(),
                    "shape": list(image.shape[1:]),
                    "use_inferer": use_inferer,
                }
            )
            boxes = [torch.cat([c - r, c + r]) for c, r in (_centroid_and_half_size(b) for b in _blobs(image[0] > 0.5))]
            n = len(boxes)
            out.append(
                {
                    "box": torch.stack(boxes) if boxes else torch.zeros(0, 6),
                    "label": torch.zeros(n, dtype=torch.long),
                    "label_scores": torch.linspace(0.9, 0.5, n),
                }
            )
        return out


def _blobs(mask: torch.Tensor) -> list[torch.Tensor]:
    """The 26-connected components of a 3D mask, each as the (N, 3) indices of its voxels."""
    left, found = mask.clone(), []
    while left.any():
        region = torch.zeros_like(left)
        region.view(-1)[left.view(-1).nonzero()[0]] = True
        while True:
            grown = F.max_pool3d(region[None, None].float(), 3, 1, 1)[0, 0].bool() & left
            if torch.equal(grown, region):
                break
            region = grown
        found.append(region.nonzero().float())
        left &= ~region
    return found


def _centroid_and_half_size(voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return voxels.mean(dim=0), (voxels.max(dim=0).values - voxels.min(dim=0).values + 1) / 2


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("raw")
    for name, scan in SCANS.items():
        write_scan(folder / name, scan)
    return folder


def stub_runner(folder: Path, out: Path, **overrides: Any) -> tuple[Any, BlobDetector]:
    """inference.json's runner on every scan of ``folder``, with the stub detector and no trained weights."""
    parser = parse(
        "inference.json",
        **{**TINY, "dataset_dir": str(folder), "data_list_file_path": "", "output_dir": str(out)},
        load_pretrain=False,
        **overrides,
    )
    runner = parser.get_parsed_content("evaluator")
    runner.detector, runner.progress = BlobDetector(), False
    return runner, runner.detector


def read_submission_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_found_where_planted(result: dict[str, Any]) -> None:
    """Each scan's reported box centres are its planted LPS centres, within `TOLERANCE_MM` on each axis."""
    entries = {e["image"]: e for e in result["validation"]}
    assert sorted(entries) == sorted(SCANS) and result["failed"] == []
    for name, scan in SCANS.items():
        centres = np.asarray(entries[name]["box"])[:, :3]
        planted = np.asarray(scan["nodules"])
        assert len(centres) == len(planted), name
        nearest = np.abs(centres[:, None, :] - planted[None, :, :]).sum(-1).argmin(axis=0)
        assert sorted(nearest.tolist()) == list(range(len(planted))), name
        error = np.abs(centres[nearest] - planted)
        assert np.all(error <= TOLERANCE_MM), (name, error)


def test_a_nodule_in_a_flipped_anisotropic_scan_is_reported_where_it_is(scans: Path, tmp_path: Path) -> None:
    runner, stub = stub_runner(scans, tmp_path)
    runner.run()
    result = json.loads((tmp_path / "result.json").read_text())
    assert_found_where_planted(result)
    # the detector saw each scan on the model's grid: same extent, model spacing
    for seen, name in zip(stub.seen, SCANS, strict=True):
        scan = SCANS[name]
        np.testing.assert_allclose(seen["spacing"], MODEL_SPACING, rtol=1e-6)
        expected = [round(n * s / m) for n, s, m in zip(scan["shape"], scan["spacing"], MODEL_SPACING)]
        assert [min(a, b) for a, b in zip(seen["shape"], expected)] == expected  # padded at the end to patch_size
    # the submission: one row per box, its centre and score, under the file name without .mhd
    rows = read_submission_rows(tmp_path / "submission.csv")
    assert list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    expected_rows = [
        (seriesuid_of(e["image"]), *e["box"][i][:3], e["label_scores"][i])
        for e in result["validation"]
        for i in range(len(e["box"]))
    ]
    got = [(r["seriesuid"], *(float(r[k]) for k in ("coordX", "coordY", "coordZ", "probability"))) for r in rows]
    assert got == expected_rows
    report = json.loads((tmp_path / "data_check.json").read_text())
    assert "unexpected_spacing" not in json.dumps(report)  # resampled: the native spacing is no concern


def test_without_resampling_the_detector_sees_the_native_grid_and_boxes_stay_in_place(
    scans: Path, tmp_path: Path
) -> None:
    runner, stub = stub_runner(scans, tmp_path, resample_input=False)
    runner.run()
    assert_found_where_planted(json.loads((tmp_path / "result.json").read_text()))
    for seen, name in zip(stub.seen, SCANS, strict=True):
        np.testing.assert_allclose(seen["spacing"], SCANS[name]["spacing"], rtol=1e-6)
    # off the model's grid, the data check warns about the 2.5 mm slices
    report = json.loads((tmp_path / "data_check.json").read_text())
    assert "unexpected_spacing" in json.dumps(report)


def test_whether_raw_luna16_resamples_as_in_the_zoo(scans: Path, tmp_path: Path) -> None:
    runner, stub = stub_runner(scans, tmp_path, resample_input=False, whether_raw_luna16=True)
    runner.run()
    assert_found_where_planted(json.loads((tmp_path / "result.json").read_text()))
    for seen in stub.seen:
        np.testing.assert_allclose(seen["spacing"], MODEL_SPACING, rtol=1e-6)


def test_bad_metaimage_inputs_are_listed_and_the_others_run(scans: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("flipped", "noraw", "short"):
        write_scan(folder / f"{name}.mhd", SCANS["flipped.mhd"])
    (folder / "noraw.raw").unlink()
    raw = folder / "short.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    runner, _ = stub_runner(folder, tmp_path / "out")
    with pytest.raises(InferenceFailed, match=r"inference failed on 2 of 3 images"):
        runner.run()
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [e["image"] for e in result["validation"]] == ["flipped.mhd"] and len(result["validation"][0]["box"]) == 2
    failed = {f["image"]: f for f in result["failed"]}
    assert (
        failed["noraw.mhd"]["problem"] == "missing_file"
        and "noraw.raw does not exist" in failed["noraw.mhd"]["message"]
    )
    assert (
        failed["short.mhd"]["problem"] == "unreadable" and "short.raw has 1000 bytes" in failed["short.mhd"]["message"]
    )
    report = json.loads((tmp_path / "out" / "data_check.json").read_text())
    reasons = sorted(f["details"]["reason"] for f in report["findings"])
    assert reasons == ["missing_data_file", "size_mismatch"]


def test_the_data_check_places_a_metaimage_as_itk_loads_it_without_reading_its_voxels(tmp_path: Path) -> None:
    """The check's voxel-free loading of a .mhd gives the shape and RAS affine of the real (ITK) loading, for both
    of LUNA16's directions, and holds no voxels."""
    loader = parse("inference.json").get_parsed_content("loader")
    for direction in ((-1.0, -1.0, 1.0), (1.0, 1.0, 1.0)):
        path = tmp_path / f"scan{direction[0]:+.0f}.mhd"
        write_scan(path, {**SCANS["flipped.mhd"], "direction": direction})
        real = loader({"image": str(path)})["image"]
        free = voxel_free(loader)({"image": str(path)})["image"]
        assert free.shape == real.shape == (1, 80, 80, 16)
        np.testing.assert_allclose(free.affine.numpy(), real.affine.numpy(), atol=1e-6)
        assert free.dtype == torch.uint8 and free.untyped_storage().nbytes() <= free.numel()
        assert real.dtype == torch.float32 and real.untyped_storage().nbytes() == 4 * real.numel()


def test_a_folder_of_metaimages_is_an_input_list(scans: Path) -> None:
    assert [i["image_name"] for i in list_inputs("", str(scans))] == ["flipped.mhd", "identity.nii.gz"]


@pytest.mark.slow
def test_the_zoo_cli_runs_a_raw_scan_with_a_trained_model(scans: Path, tmp_path: Path) -> None:
    """``--whether_raw_luna16 True`` through MONAI's bundle runner: ``initialize`` loads model.pt with the
    ``checkpointloader``, the detector runs, and submission.csv holds each scan's 100 best boxes."""
    save_tiny_model(str(tmp_path / "models" / "model.pt"))
    folder = tmp_path / "scans"
    folder.mkdir()
    write_scan(folder / "flipped.mhd", SCANS["flipped.mhd"])
    overrides = {**TINY, "bundle_root": str(tmp_path), "dataset_dir": str(folder), "data_list_file_path": ""}
    run("inference", config_file=config("inference.json"), whether_raw_luna16=True, **overrides, **bundle_paths())
    (entry,) = json.loads((tmp_path / "eval" / "result.json").read_text())["validation"]
    assert len(entry["box"]) > 100  # the untrained tiny network boxes many anchors
    rows = read_submission_rows(tmp_path / "eval" / "submission.csv")
    assert len(rows) == 100 and {r["seriesuid"] for r in rows} == {"flipped"}
    best = sorted(range(len(entry["box"])), key=lambda i: -entry["label_scores"][i])[:100]
    assert [float(r["probability"]) for r in rows] == [entry["label_scores"][i] for i in best]
    assert [[float(r[k]) for k in ("coordX", "coordY", "coordZ")] for r in rows] == [entry["box"][i][:3] for i in best]


def test_load_pretrain_and_checkpointloader_do_what_they_do_in_the_zoo(tmp_path: Path) -> None:
    saved = save_tiny_model(str(tmp_path / "model.pt"), seed=1).state_dict()
    parser = parse("inference.json", **TINY, model_path=str(tmp_path / "model.pt"))
    loader = parser.get_parsed_content("checkpointloader")
    assert isinstance(loader, CheckpointLoader) and loader.load_path == str(tmp_path / "model.pt")
    network = parser.get_parsed_content("network_def")
    assert not torch.equal(
        network.state_dict()["classification_head.cls_logits.bias"], saved["classification_head.cls_logits.bias"]
    )
    loader(None)  # what initialize runs
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items())
    assert parser.get_parsed_content("network") is network
    # load_pretrain false: no weights read, no model file needed
    parser = parse("inference.json", **TINY, model_path=str(tmp_path / "missing.pt"), load_pretrain=False)
    assert parser.get_parsed_content("network") is parser.get_parsed_content("network_def")
    assert parser.get_parsed_content("checkpointloader").loaded is None
    # load_pretrain true with a missing file: one line naming it
    parser = parse("inference.json", **TINY, model_path=str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match=r"missing\.pt does not exist"):
        parser.get_parsed_content("network")


def test_infer_patch_size_and_force_sliding_window(tmp_path: Path) -> None:
    parser = parse("inference.json", **TINY, load_pretrain=False, infer_patch_size=[32, 32, 16])
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    assert list(detector.inferer.roi_size) == [32, 32, 16]
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, VolumeInferer) and not inferer.force_sliding_window
    small, large = torch.zeros(1, 32, 32, 8), torch.zeros(1, 32, 32, 16)
    assert not inferer.slides([small], detector) and inferer.slides([large], detector)
    forced = parse("inference.json", **TINY, force_sliding_window=True).get_parsed_content("inferer")
    assert forced.slides([small], detector)
    # the stand-in has no window of its own: it is never asked to slide
    assert not forced.slides([large], BlobDetector())
