"""Deterministic synthetic chest-CT phantoms with lung nodules, written as a LUNA16-style detection dataset.

Each case is an int16 NIfTI volume in Hounsfield units with a real RAS affine (0.703125 x 0.703125 x 1.25 mm, the
resampled LUNA16 spacing, and a slightly different origin per case): air outside an elliptic body with a thin fat
layer and a spine, two ellipsoidal lungs, curved vessel-like tubes inside the lungs as distractors, 1-3 soft-tissue
nodules of 3-30 mm (mostly 5-15 mm) with smooth edges, and Gaussian noise.

The datalist (``{"training": [...], "selection": [...], "validation": [...]}``: training, model selection, held-out
test) holds per image the nodule boxes in ``cccwhd`` world
millimetres, LPS (the LUNA16 annotation convention), so the real world -> image coordinate path is exercised. A
nodule's box is the footprint of the voxels its nominal ellipsoid covers (where its intensity contribution is above
half): with voxel index ``i`` centred at world ``affine @ i`` (NIfTI), covered indices ``i0..i1`` span world
``affine @ (i0 - 0.5) .. affine @ (i1 + 0.5)``. MONAI's ``AffineBoxToImageCoordinated(affine_lps_to_ras=True)``
applies the inverse affine, so that box arrives in image coordinates as ``[i0 - 0.5, i1 + 0.5]`` per axis.
``phantom_truth.json`` records exactly these image-coordinate boxes (``voxel_box``), the integer index ranges
(``voxel_index_box``, end exclusive, for array slicing), and the nodules' nominal centres and diameters.

CLI: ``python -m scripts.data.phantoms --out DIR --num-train 24 --num-val 8 --seed 0 [--shape 128 128 64]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scripts.data.phantom_geometry import (
    DIRECTIONS,
    blend,
    block,
    block_offsets,
    box_distance,
    ellipsoid_rho_and_distance,
    inside_ellipsoid,
    polyline_distance,
    sigmoid,
)
from scripts.errors import UserError
from scripts.json_io import write_json
from tqdm import tqdm

__all__ = ["DEFAULT_SHAPE", "DEFAULT_SPACING", "generate_case", "generate_dataset", "ensure_dataset"]

logger = logging.getLogger(__name__)

DEFAULT_SHAPE: tuple[int, int, int] = (128, 128, 64)
DEFAULT_SPACING: tuple[float, float, float] = (0.703125, 0.703125, 1.25)
TRUTH_NAME = "phantom_truth.json"

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 400.0
LUNG_HU = -850.0
VESSEL_HU = 40.0
NOISE_SIGMA_HU = 20.0
EDGE_MM = 0.5  # width of the sigmoid edge of every structure
FAT_MM = 2.5
NODULE_MARGIN_MM = 1.5  # minimum gap between a nodule and the lung wall
VESSEL_GAP_MM = 2.0  # minimum gap between a vessel surface and a nodule box
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 30.0

_SPLITS = {"training": ("train", 0), "selection": ("select", 2), "validation": ("val", 1)}


def _place_nodule(
    rng: np.random.Generator,
    lungs: list[tuple[np.ndarray, np.ndarray]],
    placed: list[dict[str, Any]],
    spacing: np.ndarray,
    shape: Sequence[int],
) -> dict[str, Any] | None:
    """Sample one nodule fully inside a lung, away from the lung wall and from the nodules already placed."""
    diameter = float(np.clip(np.exp(rng.normal(np.log(10.0), 0.5)), MIN_DIAMETER_MM, MAX_DIAMETER_MM))
    diameters = np.clip(diameter * rng.uniform(0.8, 1.2, size=3), MIN_DIAMETER_MM, MAX_DIAMETER_MM)
    hu = float(rng.uniform(20.0, 60.0))
    for _ in range(12):
        semi = diameters / 2.0
        for _ in range(40):
            lung_c, lung_s = lungs[int(rng.integers(len(lungs)))]
            u = rng.normal(size=3)
            center = lung_c + lung_s * u / np.linalg.norm(u) * rng.uniform() ** (1.0 / 3.0)
            if not inside_ellipsoid(center + DIRECTIONS * (semi + NODULE_MARGIN_MM), lung_c, lung_s):
                continue
            lo, hi = block(center, semi, spacing, shape)
            rho, _ = ellipsoid_rho_and_distance(block_offsets(lo, hi, center, spacing), semi)
            covered = np.nonzero(rho <= 1.0)
            first = lo + np.array([c.min() for c in covered])
            last = lo + np.array([c.max() for c in covered])
            if np.any(first < 1) or np.any(last > np.asarray(shape) - 2):
                continue
            if any(np.all(first <= p["_last"] + 2) and np.all(p["_first"] <= last + 2) for p in placed):
                continue  # boxes (with a 2-voxel gap) overlap
            return {"_center_mm": center, "_semi_mm": semi, "_first": first, "_last": last, "hu": hu}
        diameters = np.maximum(diameters * 0.8, MIN_DIAMETER_MM)
    return None


def _vessel_curve(
    rng: np.random.Generator, lung_c: np.ndarray, lung_s: np.ndarray, radius: float, nodules: list[dict[str, Any]]
) -> np.ndarray | None:
    """A quadratic Bezier centre line (33 points, mm) starting inside the lung and avoiding every nodule box."""
    t = np.linspace(0.0, 1.0, 33)[:, None]
    for _ in range(20):
        u = rng.normal(size=3)
        p0 = lung_c + lung_s * u / np.linalg.norm(u) * 0.8 * rng.uniform() ** (1.0 / 3.0)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(10.0, 35.0) * min(1.0, float(lung_s.mean()) / 20.0)  # shorter in small lungs
        p2 = p0 + direction * length
        bend = rng.normal(size=3)
        bend -= direction * (bend @ direction)
        p1 = (p0 + p2) / 2.0 + bend / max(np.linalg.norm(bend), 1e-6) * rng.uniform(0.0, 0.3) * length
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        clear = all(
            np.all(box_distance(curve, n["_box_lo_mm"], n["_box_hi_mm"]) > radius + VESSEL_GAP_MM) for n in nodules
        )
        if clear:
            return curve
    return None


def _make_affine(rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray) -> np.ndarray:
    """RAS affine with positive diagonal spacing and an origin that centres the volume near 0, jittered per case.

    The origin is a multiple of 1/128 mm so that it survives nibabel's float32 sform exactly.
    """
    affine = np.diag([*spacing, 1.0])
    centre = -(np.asarray(shape) - 1) / 2.0 * spacing + rng.integers(-320, 321, size=3) / 64.0
    affine[:3, 3] = np.round(centre * 128.0) / 128.0
    return affine


def generate_case(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    num_nodules: tuple[int, int] = (1, 3),
    empty: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Generate one phantom.

    Args:
        rng: the random generator; the same generator state gives the same case.
        shape: volume shape in voxels (x, y, z, as stored in NIfTI).
        spacing: voxel size in mm (x, y, z).
        num_nodules: inclusive range of the number of nodules.
        empty: make a case without nodules.

    Returns:
        the int16 HU volume, its 4x4 RAS affine, and one dict per nodule with ``voxel_box`` (xyzxyz in MONAI image
        coordinates, see the module docstring), ``voxel_index_box`` (integer, end exclusive), ``center_voxel``,
        ``diameter_mm``, ``hu``, ``box_lps`` (cccwhd world mm, LPS) and ``center_lps`` (nominal centre, world mm).
    """
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing, dtype=np.float64)
    fov = np.asarray(shape) * sp
    affine = _make_affine(rng, shape, sp)

    # body (elliptic cylinder along z) with a fat layer and a posterior spine; +y is anterior in RAS
    body_c = fov / 2.0 + np.array([*rng.uniform(-0.02, 0.02, size=2) * fov[:2], 0.0])
    body_s = np.array([0.46 * fov[0], 0.40 * fov[1], np.inf]) * np.array([*rng.uniform(0.95, 1.0, 2), 1.0])
    plane_lo, plane_hi = np.zeros(3, dtype=int), np.array([shape[0], shape[1], 1])
    plane = block_offsets(plane_lo, plane_hi, np.array([body_c[0], body_c[1], 0.0]), sp)[:2] + [np.float32(0.0)]
    _, d_body = ellipsoid_rho_and_distance(plane, body_s)
    inner_s = body_s - np.array([FAT_MM, FAT_MM, 0.0])
    _, d_inner = ellipsoid_rho_and_distance(plane, inner_s)
    spine_c = np.array([body_c[0], body_c[1] - 0.72 * body_s[1]])
    spine = [plane[0] - np.float32(spine_c[0] - body_c[0]), plane[1] - np.float32(spine_c[1] - body_c[1]), plane[2]]
    _, d_spine = ellipsoid_rho_and_distance(spine, np.array([0.14 * body_s[0], 0.14 * body_s[1], np.inf]))
    slab = np.full(d_body.shape, AIR_HU, dtype=np.float32)
    slab += sigmoid(-d_body / EDGE_MM) * (FAT_HU - slab)
    slab += sigmoid(-d_inner / EDGE_MM) * (SOFT_TISSUE_HU - slab)
    slab += sigmoid(-d_spine / EDGE_MM) * (BONE_HU - slab)
    vol = np.repeat(slab[:, :, :1], shape[2], axis=2).astype(np.float32)

    # lungs: one ellipsoid on each side of the mediastinum
    lung_w = np.zeros(shape, dtype=np.float32)
    lung_hu = LUNG_HU + float(rng.uniform(-20.0, 20.0))
    lungs = []
    for side in (-1.0, 1.0):
        c = np.array([body_c[0] + side * 0.45 * body_s[0], body_c[1] + 0.05 * body_s[1], fov[2] / 2.0])
        s = np.array([0.33 * body_s[0], 0.60 * body_s[1], 0.42 * fov[2]]) * rng.uniform(0.92, 1.0, size=3)
        lungs.append((c, s))
        lo, hi = block(c, s + 4 * EDGE_MM, sp, shape)
        _, d = ellipsoid_rho_and_distance(block_offsets(lo, hi, c, sp), s)
        lung_w[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = sigmoid(-d / EDGE_MM)
    vol += lung_w * (np.float32(lung_hu) - vol)

    # nodules are placed first so that the vessels can keep clear of them, and drawn last
    count = 0 if empty else int(rng.integers(num_nodules[0], num_nodules[1] + 1))
    nodules: list[dict[str, Any]] = []
    for _ in range(count):
        nodule = _place_nodule(rng, lungs, nodules, sp, shape)
        if nodule is None:
            break
        nodule["_box_lo_mm"] = (nodule["_first"] - 0.5) * sp
        nodule["_box_hi_mm"] = (nodule["_last"] + 0.5) * sp
        nodules.append(nodule)

    # vessels: curved tubes, confined to the lungs
    for lung_c, lung_s in lungs:
        for _ in range(int(rng.integers(3, 7))):
            radius = float(rng.uniform(1.0, 3.0))
            curve = _vessel_curve(rng, lung_c, lung_s, radius, nodules)
            if curve is None:
                continue
            half = 4 * EDGE_MM + radius
            lo = np.maximum(np.floor((curve.min(axis=0) - half) / sp).astype(int), 0)
            hi = np.minimum(np.ceil((curve.max(axis=0) + half) / sp).astype(int) + 1, np.asarray(shape))
            if np.any(hi <= lo):
                continue
            coords = block_offsets(lo, hi, np.zeros(3), sp)
            weight = sigmoid(-(polyline_distance(coords, curve) - radius) / EDGE_MM)
            weight *= lung_w[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            blend(vol, lo, hi, weight, VESSEL_HU)

    out = []
    for n in nodules:
        lo, hi = block(n["_center_mm"], n["_semi_mm"] + 4 * EDGE_MM, sp, shape)
        _, d = ellipsoid_rho_and_distance(block_offsets(lo, hi, n["_center_mm"], sp), n["_semi_mm"])
        blend(vol, lo, hi, sigmoid(-d / EDGE_MM), n["hu"])
        first, last = n["_first"], n["_last"]
        centre_vox = (first + last) / 2.0
        centre_ras = affine[:3, :3] @ centre_vox + affine[:3, 3]
        nominal_ras = affine[:3, :3] @ (n["_center_mm"] / sp) + affine[:3, 3]
        lps = np.array([-1.0, -1.0, 1.0])
        size_mm = (last - first + 1) * sp
        out.append(
            {
                "voxel_box": [*(first - 0.5).tolist(), *(last + 0.5).tolist()],
                "voxel_index_box": [*first.tolist(), *(last + 1).tolist()],
                "center_voxel": (n["_center_mm"] / sp).round(4).tolist(),
                "diameter_mm": (2.0 * n["_semi_mm"]).round(4).tolist(),
                "hu": round(n["hu"], 2),
                "box_lps": [*np.round(centre_ras * lps, 4).tolist(), *np.round(size_mm, 4).tolist()],
                "center_lps": np.round(nominal_ras * lps, 4).tolist(),
            }
        )

    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(NOISE_SIGMA_HU)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16), affine, out


def _save_nifti(path: str, volume: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(volume, affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = f"{path[: -len('.nii.gz')]}.tmp{os.getpid()}.nii.gz"
    nib.save(img, tmp)  # nibabel writes gzip with mtime 0: same array, same bytes
    os.replace(tmp, path)


def _check_args(
    num_train: int, num_val: int, shape: Sequence[int], empty_fraction: float = 0.0, num_select: int = 1
) -> None:
    if int(num_train) < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if int(num_select) < 1:
        raise ValueError(f"num_select must be >= 1, got {num_select}")
    if int(num_val) < 0:
        raise ValueError(f"num_val must be >= 0, got {num_val}")
    if len(shape) != 3 or any(int(s) < 32 for s in shape):
        raise ValueError(f"shape must be 3 sizes of at least 32 voxels each, got {list(shape)}")
    if not 0.0 <= float(empty_fraction) <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")


def generate_dataset(
    out_dir: str,
    num_train: int = 24,
    num_val: int = 8,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    datalist_name: str = "datalist.json",
    empty_fraction: float = 0.0,
    progress: bool = True,
    num_select: int | None = None,
) -> str:
    """Write ``out_dir/images/{train,select,val}_NNN.nii.gz``, ``out_dir/phantom_truth.json`` and the datalist.

    The datalist's ``selection`` list (``num_select`` cases, as many as ``validation`` by default, at least one) is
    what training selects its model on (`scripts.data.selection`); ``validation`` is the held-out test set. Image
    paths in the datalist are relative to ``out_dir``; ``datalist_name`` is joined to ``out_dir`` (an absolute path is
    used as is). Each case draws from its own generator seeded by ``(seed, split, index)``, so a case does not depend
    on how many others are made. The datalist is written last and atomically. Returns its path.
    """
    num_select = max(int(num_val), 1) if num_select is None else int(num_select)
    _check_args(num_train, num_val, shape, empty_fraction, num_select)
    shape = tuple(int(s) for s in shape)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    counts = {"training": num_train, "selection": num_select, "validation": num_val}
    jobs = [(split, i) for split, n in counts.items() for i in range(int(n))]
    datalist: dict[str, list[dict[str, Any]]] = {split: [] for split in counts}
    truth: dict[str, Any] = {}
    for split, i in tqdm(jobs, desc="phantoms", unit="case", disable=not progress):
        prefix, split_code = _SPLITS[split]
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(split_code, i)))
        empty = bool(rng.random() < empty_fraction)
        volume, affine, nodules = generate_case(rng, shape, DEFAULT_SPACING, empty=empty)
        rel = f"images/{prefix}_{i:03d}.nii.gz"
        _save_nifti(os.path.join(out_dir, rel), volume, affine)
        datalist[split].append({"image": rel, "box": [n["box_lps"] for n in nodules], "label": [0] * len(nodules)})
        truth[rel] = {
            "shape": list(shape),
            "affine": affine.tolist(),
            "nodules": [
                {k: n[k] for k in ("voxel_box", "voxel_index_box", "center_voxel", "center_lps", "diameter_mm", "hu")}
                for n in nodules
            ],
        }
    write_json(os.path.join(out_dir, TRUTH_NAME), truth, indent=2)
    datalist_path = os.path.join(out_dir, datalist_name)
    write_json(datalist_path, datalist, indent=2)
    return datalist_path


def _may_generate_into(dataset_dir: str, default_dir: str | None) -> bool:
    """Whether phantoms may be written into ``dataset_dir``: the bundle's default data folder, or a folder that does
    not exist yet or is empty (never a folder that holds someone's data)."""
    if default_dir is not None and os.path.realpath(dataset_dir) == os.path.realpath(default_dir):
        return True
    return not os.path.exists(dataset_dir) or (os.path.isdir(dataset_dir) and not os.listdir(dataset_dir))


def ensure_dataset(
    data_list_file_path: str,
    dataset_dir: str,
    num_train: int = 24,
    num_val: int = 8,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    default_dir: str | None = None,
    num_select: int | None = None,
) -> str:
    """Return ``data_list_file_path`` if it exists, else generate the phantom set into ``dataset_dir`` first.

    Phantoms are generated only into the bundle's default data folder (``default_dir``) or into a folder that does
    not exist yet or is empty: a datalist missing beside a user's data is a mistyped path, and raises a `UserError`
    naming it, instead of filling the user's folder with phantoms. The datalist may live inside ``dataset_dir`` (the
    usual case) or anywhere else; image paths in it are relative to ``dataset_dir``. Since the datalist is written
    last, an interrupted generation is redone on the next call.
    """
    if os.path.exists(data_list_file_path):
        logger.info("using the existing datalist %s", data_list_file_path)
        return data_list_file_path
    if not _may_generate_into(dataset_dir, default_dir):
        raise UserError(
            f"datalist {os.path.abspath(data_list_file_path)} does not exist; dataset_dir "
            f"{os.path.abspath(dataset_dir)} already holds files, so no phantoms are generated into it: "
            "check data_list_file_path"
        )
    logger.info("no datalist at %s: generating phantoms into %s", data_list_file_path, dataset_dir)
    return generate_dataset(
        dataset_dir,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        shape=shape,
        datalist_name=os.path.abspath(data_list_file_path),
        num_select=num_select,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.data.phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (images/, datalist.json, phantom_truth.json)")
    parser.add_argument("--num-train", type=int, default=24)
    parser.add_argument("--num-select", type=int, default=None, help="model-selection cases (default: --num-val)")
    parser.add_argument("--num-val", type=int, default=8, help="held-out test cases (the datalist's validation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument("--empty-fraction", type=float, default=0.0, help="share of cases without nodules")
    parser.add_argument("--datalist-name", default="datalist.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = generate_dataset(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
            shape=args.shape,
            datalist_name=args.datalist_name,
            empty_fraction=args.empty_fraction,
            progress=not args.no_progress,
            num_select=args.num_select,
        )
    except ValueError as e:
        parser.error(str(e))
    with open(path) as f:
        datalist = json.load(f)
    items = [item for section in datalist.values() for item in section]
    counts = " + ".join(f"{len(v)} {k}" for k, v in datalist.items())
    print(
        f"wrote {counts} phantoms "
        f"({sum(len(it['box']) for it in items)} nodules, shape {tuple(args.shape)}) to {path} "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
