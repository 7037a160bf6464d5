"""The LUNA16 download, as users have it, turned into the bundle's prepared images and the ten fold datalists.

Run ID ``prepare_luna16`` (configs/train.json) calls `prepare_luna16`. It reads ``RAW/subset0 .. subset9/<uid>.mhd``
(+ ``.raw``), ``RAW/annotations.csv``, and ``seriesuids.csv`` and ``annotations_excluded.csv`` when present, and
writes into ``DATA``:

- ``<uid>/<uid>.nii.gz``: the scan read with MONAI's ``ITKReader`` (LPS -> RAS), resampled with ``Spacingd``
  (bilinear) to 0.703125 x 0.703125 x 1.25 mm, ``Orientationd("RAS")``, rounded and clipped to int16 HU (half the
  disk of float32; the training loader casts anyway). Written atomically; a scan is done when this file exists, so an
  interrupted run goes on where it stopped and a stale temporary file never counts. Scans are converted in parallel
  (``workers`` processes, spawn-safe), with a progress bar.
- ``dataset_fold{k}.json`` for every subset k present, the model zoo's format: ``validation`` is subset k (scans
  without nodules included with empty lists, as LUNA16 counts them), boxes ``[coordX, coordY, coordZ, d, d, d]``
  (cccwhd, world mm, LPS) of annotations.csv, labels 0. The other subsets' scans are split into ``training`` and
  ``selection`` (the model-selection set), disjoint. **Selection rule**: 5% of those scans (ID
  ``selection_fraction``, rounded up, at least 1 when there are two or more); within each subset the scans are
  ranked by ``sha256("<k>/<uid>")``, and the selection takes the best-ranked scan of each subset in turn (subsets
  k+1, k+2, ... wrapping), then the second-ranked, until it is full: spread over the subsets, and different scans in
  different folds.
- ``luna16_manifest.json``: per scan its subset, native spacing, shape, direction, nodules, status and problems.

Every problem is one line naming the file: a missing subset folder, a header or ``.raw`` that cannot be used (wrong
size, ...), a uid absent from seriesuids.csv or listed there but not found, an annotation whose centre is outside its
scan, an implausible spacing (in-plane outside 0.3-1.5 mm, slices outside 0.3-6 mm; LUNA16 has 0.46-0.98 and
0.6-2.5), an oblique direction. ``policy="skip"`` skips such scans (and says so); ``"strict"`` refuses the run
before any voxel is read. A scan whose conversion fails (e.g. compressed data that does not inflate to the volume,
which ITK would turn into a volume anyway) is skipped too, or under ``"strict"`` ends the run before the folds and
the manifest are written. The checks before conversion read headers only; manifest and folds are rebuilt from them and
the tables on every run, so a resumed run needs nothing but the finished images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import logging
import multiprocessing
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import ITKReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd
from scripts.data.luna16_csv import Finding, read_findings, read_seriesuids, seriesuid_of
from scripts.data.metaimage import (
    MetaImageError,
    MetaImageHeader,
    check_compressed_data,
    is_oblique,
    read_metaimage_header,
)
from scripts.data.selection import SELECTION_FRACTION, selection_count
from scripts.errors import UserError
from scripts.json_io import write_atomically, write_json
from tqdm import tqdm

__all__ = [
    "POLICIES",
    "TARGET_SPACING",
    "Inventory",
    "Luna16PrepareError",
    "PrepareResult",
    "Scan",
    "convert_scan",
    "fold_datalists",
    "inventory",
    "prepare_luna16",
]

logger = logging.getLogger(__name__)

TARGET_SPACING = (0.703125, 0.703125, 1.25)
POLICIES = ("skip", "strict")
NUM_SUBSETS = 10
IN_PLANE_MM = (0.3, 1.5)
SLICE_MM = (0.3, 6.0)
MANIFEST_NAME = "luna16_manifest.json"
FOLD_NAME = "dataset_fold{}.json"
HU_RANGE = (-32768, 32767)
PHANTOM_TRUTH = "phantom_truth.json"  # marks the bundle's own phantom folder, the default dataset_dir


class Luna16PrepareError(UserError):
    """The LUNA16 download cannot be prepared as asked; one line naming the folder or file and what to do."""


@dataclass(frozen=True)
class Scan:
    """
    One scan of the download, as its header and the tables describe it.

    Args:
        uid: the seriesuid.
        subset: its ``subsetK`` folder.
        source: the ``.mhd`` (absolute).
        image: the prepared image, relative to the dataset folder (``<uid>/<uid>.nii.gz``).
        native_spacing: ``ElementSpacing`` (mm), ``None`` when the header cannot be read.
        shape: ``DimSize``, ``None`` when the header cannot be read.
        direction: 3x3 LPS direction (rows), ``None`` when the header cannot be read.
        boxes: one ``[coordX, coordY, coordZ, d, d, d]`` per annotations.csv row (cccwhd, LPS mm).
        excluded_findings: its rows in annotations_excluded.csv.
        problems: one line each; a scan with any is not prepared.
    """

    uid: str
    subset: int
    source: str
    image: str
    native_spacing: tuple[float, ...] | None
    shape: tuple[int, ...] | None
    direction: tuple[tuple[float, ...], ...] | None
    boxes: tuple[tuple[float, ...], ...]
    excluded_findings: int
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Inventory:
    """
    What the download holds: the scans (problems included), and the problems of no single scan.

    Args:
        scans: in (subset, uid) order.
        subsets: the subset numbers whose folder exists.
        problems: lines about the download as a whole (missing folders, uids listed but not found).
    """

    scans: tuple[Scan, ...]
    subsets: tuple[int, ...]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Tables:
    """
    The download's tables.

    Args:
        annotations: the annotations.csv path.
        findings: its rows by seriesuid.
        excluded: annotations_excluded.csv's rows by seriesuid (empty without the file).
        seriesuids: the seriesuids.csv path.
        listed: its uids, ``None`` without the file.
    """

    annotations: str
    findings: dict[str, list[Finding]]
    excluded: dict[str, list[Finding]]
    seriesuids: str
    listed: frozenset[str] | None


@dataclass(frozen=True)
class Conversion:
    """
    The outcome of one scan's conversion.

    Args:
        uid: the seriesuid.
        shape: the prepared image's shape (``None`` on failure).
        reused: it was done already (by an earlier run) and not redone.
        error: one line when the conversion failed, else ``""``.
    """

    uid: str
    shape: tuple[int, ...] | None
    reused: bool
    error: str = ""


@dataclass(frozen=True)
class PrepareResult:
    """
    What a run of `prepare_luna16` did.

    Args:
        manifest: the manifest's path.
        folds: the fold datalists written.
        prepared: scans with a prepared image.
        converted: scans converted by this run.
        reused: scans done by an earlier run, not redone.
        skipped: scans not prepared (problems or failed conversions).
        problems: every problem line.
    """

    manifest: str
    folds: tuple[str, ...]
    prepared: int
    converted: int
    reused: int
    skipped: int
    problems: tuple[str, ...] = field(default_factory=tuple)


def _world_bounds(header: MetaImageHeader) -> tuple[np.ndarray, np.ndarray]:
    """The LPS box (min, max corner) the scan's voxels cover, voxel edges included."""
    edges = [(-0.5, n - 0.5) for n in header.shape]
    corners = np.array([[x, y, z] for x in edges[0] for y in edges[1] for z in edges[2]])
    world = corners * np.asarray(header.spacing) @ header.direction.T + np.asarray(header.offset)
    return world.min(axis=0), world.max(axis=0)


def _judge(mhd: str, subset: int, tables: Tables) -> Scan:
    """A `Scan` for ``mhd``, every problem its header and the tables show named in one line each."""
    uid = seriesuid_of(mhd)
    findings = tables.findings.get(uid, [])
    problems: list[str] = []
    if tables.listed is not None and uid not in tables.listed:
        problems.append(f"{mhd}: {uid} is not listed in {tables.seriesuids}; add it there or remove the scan")
    spacing = shape = direction = None
    try:
        header = read_metaimage_header(mhd)
    except MetaImageError as e:
        problems.append(str(e))
    else:
        spacing, shape = header.spacing, header.shape
        direction = tuple(tuple(float(v) for v in row) for row in header.direction)
        if not (IN_PLANE_MM[0] <= min(spacing[:2]) and max(spacing[:2]) <= IN_PLANE_MM[1]) or not (
            SLICE_MM[0] <= spacing[2] <= SLICE_MM[1]
        ):
            problems.append(
                f"{mhd}: implausible spacing {list(spacing)} mm for a chest CT (in-plane {IN_PLANE_MM[0]}-"
                f"{IN_PLANE_MM[1]}, slices {SLICE_MM[0]}-{SLICE_MM[1]}); check ElementSpacing"
            )
        if is_oblique(header.direction):
            problems.append(
                f"{mhd}: oblique direction {np.round(header.direction, 4).tolist()}; only axis-aligned scans "
                "(as in LUNA16) are supported"
            )
        low, high = _world_bounds(header)
        for f in findings:
            if np.any(np.asarray(f.center) < low) or np.any(np.asarray(f.center) > high):
                problems.append(
                    f"{tables.annotations} line {f.line}: the nodule of {uid} at {list(f.center)} (LPS mm) lies "
                    f"outside its scan ({np.round(low, 2).tolist()} .. {np.round(high, 2).tolist()}); fix the row "
                    "or the scan"
                )
    return Scan(
        uid=uid,
        subset=subset,
        source=mhd,
        image=f"{uid}/{uid}.nii.gz",
        native_spacing=spacing,
        shape=shape,
        direction=direction,
        boxes=tuple((*f.center, f.diameter_mm, f.diameter_mm, f.diameter_mm) for f in findings),
        excluded_findings=len(tables.excluded.get(uid, [])),
        problems=tuple(problems),
    )


def inventory(luna16_dir: str) -> Inventory:
    """
    Find and judge every scan of a LUNA16 download from headers and tables alone (no voxels are read).

    Args:
        luna16_dir: the folder holding ``subset0 .. subset9`` and ``annotations.csv``.

    Raises:
        Luna16PrepareError: the folder, ``annotations.csv`` or every subset folder is missing.
        Luna16TableError: a table has a bad line.
    """
    root = os.path.abspath(luna16_dir)
    if not os.path.isdir(root):
        raise Luna16PrepareError(f"LUNA16 folder {root} does not exist; give the download's folder with --luna16_dir")
    annotations = os.path.join(root, "annotations.csv")
    excluded = os.path.join(root, "annotations_excluded.csv")
    seriesuids = os.path.join(root, "seriesuids.csv")
    listed = read_seriesuids(seriesuids) if os.path.isfile(seriesuids) else None
    tables = Tables(
        annotations=annotations,
        findings=read_findings(annotations),
        excluded=read_findings(excluded, "annotations_excluded") if os.path.isfile(excluded) else {},
        seriesuids=seriesuids,
        listed=None if listed is None else frozenset(listed),
    )
    subsets = [k for k in range(NUM_SUBSETS) if os.path.isdir(os.path.join(root, f"subset{k}"))]
    if not subsets:
        raise Luna16PrepareError(f"LUNA16 folder {root} holds no subset0 .. subset9 folder; give the download's folder")
    problems = [
        f"{os.path.join(root, f'subset{k}')}: subset folder missing; fold {k} is not written"
        for k in range(NUM_SUBSETS)
        if k not in subsets
    ]
    scans: list[Scan] = []
    seen: dict[str, str] = {}
    for k in subsets:
        for mhd in sorted(glob.glob(os.path.join(root, f"subset{k}", "*.mhd"))):
            uid = seriesuid_of(mhd)
            scan = _judge(mhd, k, tables)
            if uid in seen:
                line = f"{mhd}: {uid} is already at {seen[uid]}; keep one copy"
                scan = dataclasses.replace(scan, problems=(*scan.problems, line))
            seen.setdefault(uid, mhd)
            scans.append(scan)
    for uid in listed or []:
        if uid not in seen:
            problems.append(f"{seriesuids}: {uid} is listed but no subset folder holds {uid}.mhd")
    return Inventory(tuple(scans), tuple(subsets), tuple(problems))


def convert_scan(source: str, output: str) -> tuple[int, ...]:
    """
    Resample one MetaImage to the model grid and write it as int16 NIfTI, atomically.

    Args:
        source: the ``.mhd`` (read with MONAI's ``ITKReader``, LPS -> RAS).
        output: the ``.nii.gz`` to write.

    Returns:
        The prepared image's shape.

    Raises:
        MetaImageError: compressed data that does not inflate to the volume (ITK would return a volume anyway).
    """
    header = read_metaimage_header(source)
    if header.compressed:
        check_compressed_data(header)
    pipeline = Compose(
        [
            LoadImaged("image", reader=ITKReader(affine_lps_to_ras=True), dtype=np.int16, image_only=True),
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            # float32 resampling: float64 would double the peak memory of a 512 x 512 x 500 scan for nothing
            Spacingd("image", pixdim=TARGET_SPACING, mode="bilinear", padding_mode="border", dtype=torch.float32),
            Orientationd("image", axcodes="RAS", labels=None),
        ]
    )
    image = pipeline({"image": source})["image"]
    voxels = image.as_tensor()[0]
    if voxels.is_floating_point():
        torch.round(voxels, out=voxels)  # in place: no second copy of the volume
    hu = voxels.clamp_(*HU_RANGE).to(torch.int16).numpy()
    affine = image.affine.numpy().astype(np.float64)
    nifti = nib.Nifti1Image(hu, affine)
    nifti.header.set_xyzt_units("mm")
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    write_atomically(output, lambda tmp: nib.save(nifti, tmp), suffix=".nii.gz")
    return tuple(int(s) for s in hu.shape)


def _convert_or_reuse(source: str, output: str, threads: int) -> Conversion:
    """The worker's job: reuse a finished image, else clear stale temporaries and convert; a failure is a line."""
    uid = seriesuid_of(source)
    if os.path.isfile(output):
        return Conversion(uid, tuple(int(s) for s in nib.load(output).shape), reused=True)
    folder = os.path.dirname(output)
    for stale in glob.glob(os.path.join(folder, ".tmp_*")):  # left by an interrupted run: never a finished scan
        os.unlink(stale)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return Conversion(uid, convert_scan(source, output), reused=False)
    except MetaImageError as e:
        return Conversion(uid, None, reused=False, error=str(e))
    except Exception as e:  # ITK or MONAI could not read or resample it: the scan is skipped, named
        message = re.sub(r"\s+", " ", str(e)).strip()[:300]
        return Conversion(uid, None, reused=False, error=f"{source}: conversion failed ({type(e).__name__}: {message})")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _convert_all(jobs: Sequence[tuple[str, str]], workers: int, progress: bool) -> list[Conversion]:
    """Convert ``(source, output)`` jobs, in this process when ``workers`` is 1, else in a spawned process pool."""
    bar = tqdm(total=len(jobs), desc="prepare LUNA16", unit="scan", disable=not progress)
    results: list[Conversion] = []
    if workers <= 1 or len(jobs) <= 1:
        for source, output in jobs:
            results.append(_convert_or_reuse(source, output, 0))
            bar.update()
    else:
        threads = max(1, _cores() // workers)
        context = multiprocessing.get_context("spawn")  # fork after torch's threads start can deadlock
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_convert_or_reuse, source, output, threads) for source, output in jobs]
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                bar.update()
    bar.close()
    return results


def _rank(fold: int, uid: str) -> str:
    return hashlib.sha256(f"{fold}/{uid}".encode()).hexdigest()


def _item(scan: Scan) -> dict[str, Any]:
    return {"image": scan.image, "box": [list(b) for b in scan.boxes], "label": [0] * len(scan.boxes)}


def fold_datalists(
    scans: Sequence[Scan], subsets: Sequence[int], selection_fraction: float = SELECTION_FRACTION
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """
    The fold datalists (``training``, ``selection``, ``validation``) of the prepared scans, by fold.

    Args:
        scans: the prepared scans, in (subset, uid) order.
        subsets: the subsets present; one fold each.
        selection_fraction: the selection's share of the other subsets' scans (rounded up, at least one).
    """
    by_subset = {k: [s for s in scans if s.subset == k] for k in subsets}
    folds: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for k in subsets:
        others = [*subsets[subsets.index(k) + 1 :], *subsets[: subsets.index(k)]]
        pool = [s for j in others for s in by_subset[j]]
        wanted = selection_count(len(pool), selection_fraction)
        ranked = [sorted(by_subset[j], key=lambda s: _rank(k, s.uid)) for j in others]
        chosen: set[str] = set()
        for depth in range(max((len(r) for r in ranked), default=0)):
            for r in ranked:
                if len(chosen) < wanted and depth < len(r):
                    chosen.add(r[depth].uid)
        folds[k] = {
            "training": [_item(s) for s in pool if s.uid not in chosen],
            "selection": [_item(s) for s in pool if s.uid in chosen],
            "validation": [_item(s) for s in by_subset[k]],
        }
    return folds


def _manifest_entry(scan: Scan, root: str, status: str, shape: tuple[int, ...] | None, problems: Sequence[str]) -> dict:
    return {
        "seriesuid": scan.uid,
        "subset": scan.subset,
        "source": os.path.relpath(scan.source, root),
        "image": scan.image if status == "prepared" else None,
        "status": status,
        "native_spacing": None if scan.native_spacing is None else list(scan.native_spacing),
        "shape": None if scan.shape is None else list(scan.shape),
        "direction": None if scan.direction is None else [list(r) for r in scan.direction],
        "prepared_shape": None if shape is None else list(shape),
        "nodules": len(scan.boxes),
        "excluded_findings": scan.excluded_findings,
        "problems": list(problems),
    }


def prepare_luna16(
    luna16_dir: str | None,
    dataset_dir: str,
    policy: str = "skip",
    workers: int | None = None,
    selection_fraction: float = SELECTION_FRACTION,
    progress: bool = True,
    default_dir: str | None = None,
) -> PrepareResult:
    """
    Prepare a LUNA16 download: resampled int16 NIfTI images, ``dataset_fold{k}.json`` and the manifest.

    Args:
        luna16_dir: the download (``subset0 .. subset9``, ``annotations.csv``, ...).
        dataset_dir: the output folder (the training's ``dataset_dir``).
        policy: ``"skip"`` scans with a problem (each named), or ``"strict"``: refuse the run on any problem.
        workers: conversion processes; ``None`` or 0 for the machine's cores.
        selection_fraction: the share of the training subsets' scans set aside as ``selection``.
        progress: show a progress bar.
        default_dir: the bundle's phantom folder (train.json's default ``dataset_dir``): never an output, so that a
            forgotten ``--dataset_dir`` does not mix LUNA16 into the default data.

    Raises:
        Luna16PrepareError: no download folder, an unknown policy, or any problem under ``"strict"``.
    """
    if not luna16_dir:
        raise Luna16PrepareError("prepare_luna16: give the LUNA16 download folder with --luna16_dir RAW")
    if policy not in POLICIES:
        raise Luna16PrepareError(f"prepare_policy {policy!r} is not one of {', '.join(POLICIES)}")
    root, out = os.path.abspath(luna16_dir), os.path.abspath(dataset_dir)
    is_default = default_dir is not None and os.path.realpath(out) == os.path.realpath(default_dir)
    if is_default or os.path.isfile(os.path.join(out, PHANTOM_TRUTH)):
        raise Luna16PrepareError(
            f"dataset_dir {out} is the bundle's phantom data; give the output folder with --dataset_dir DATA"
        )
    found = inventory(root)
    problems = [*found.problems, *(line for s in found.scans for line in s.problems)]
    for line in found.problems:
        logger.warning(line)
    for line in (line for s in found.scans for line in s.problems):
        logger.warning(f"{line} (the scan is skipped)" if policy == "skip" else line)
    if problems and policy == "strict":
        raise Luna16PrepareError(
            f"{root}: {len(problems)} problem(s), nothing written (prepare_policy strict); first: {problems[0]}"
        )
    usable = [s for s in found.scans if not s.problems]
    jobs = [(s.source, os.path.join(out, s.image)) for s in usable]
    conversions = {c.uid: c for c in _convert_all(jobs, int(workers or _cores()), progress)}
    failures = [c.error for c in conversions.values() if c.error]
    for line in failures:
        logger.warning(line)
    if failures and policy == "strict":
        raise Luna16PrepareError(f"{root}: {len(failures)} scan(s) failed to convert; first: {failures[0]}")
    entries, prepared = [], []
    for scan in found.scans:
        conversion = conversions.get(scan.uid) if not scan.problems else None
        if conversion is not None and not conversion.error:
            entries.append(_manifest_entry(scan, root, "prepared", conversion.shape, []))
            prepared.append(scan)
        else:
            lines = [*scan.problems, *([conversion.error] if conversion else [])]
            entries.append(_manifest_entry(scan, root, "failed" if conversion else "skipped", None, lines))
    folds = fold_datalists(prepared, found.subsets, selection_fraction)
    fold_paths = []
    for k, datalist in folds.items():
        fold_paths.append(os.path.join(out, FOLD_NAME.format(k)))
        write_json(fold_paths[-1], datalist, indent=2)
    manifest = os.path.join(out, MANIFEST_NAME)
    all_problems = [*problems, *failures]
    write_json(
        manifest,
        {
            "luna16_dir": root,
            "target_spacing": list(TARGET_SPACING),
            "policy": policy,
            "counts": {
                "scans": len(found.scans),
                "prepared": len(prepared),
                "skipped": len(found.scans) - len(prepared),
            },
            "folds": [os.path.basename(p) for p in fold_paths],
            "problems": all_problems,
            "scans": entries,
        },
    )
    result = PrepareResult(
        manifest=manifest,
        folds=tuple(fold_paths),
        prepared=len(prepared),
        converted=sum(1 for c in conversions.values() if not c.reused and not c.error),
        reused=sum(1 for c in conversions.values() if c.reused),
        skipped=len(found.scans) - len(prepared),
        problems=tuple(all_problems),
    )
    print(
        f"prepare_luna16: {result.prepared} scans prepared ({result.converted} converted, {result.reused} already "
        f"done), {result.skipped} skipped, {len(all_problems)} problem line(s); {len(fold_paths)} fold datalists "
        f"and {manifest}"
    )
    return result
