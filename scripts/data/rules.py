"""The data check's judgements on one item: values in, findings out through the item's `ItemRecorder`.

Nothing here reads a file: `scripts.data.probe` reads headers and voxels within a memory bound, and
`scripts.data.check` walks the datalist and calls these checks in order. Each check records what it finds and, where
later checks depend on it, returns whether the item is still usable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scripts.data.report import ItemRecorder

__all__ = [
    "Annotations",
    "CheckSettings",
    "ImageHeader",
    "VoxelStats",
    "affine_problem",
    "check_annotations",
    "check_boxes",
    "check_geometry",
    "check_header",
    "check_path",
    "check_voxels",
    "resolve_image",
]

# slack, in voxels, before a box edge counts as outside the image (centre vs corner voxel conventions)
EXTENT_SLACK = 0.5
# the HU a CT volume must be able to hold, air to dense bone: a voxel type whose range (after the header's scaling)
# misses part of it cannot be in HU, and the HU window of training would clip it
HU_SPAN = (-1000.0, 1000.0)
# deflate, gzip's method, compresses at most about 1032:1, so a gzip file of n bytes never holds more than this
GZIP_MAX_RATIO = 1032
# default largest volume, in voxels: 2 GiB as float32, what training loads per image (1024 x 1024 x 512)
MAX_VOXELS = 2**29


@dataclass(frozen=True)
class CheckSettings:
    """
    What the data check accepts.

    Args:
        patch_size: training patch size; smaller volumes get a ``small_volume`` warning (``None``: no check).
        num_classes: labels must lie in ``[0, num_classes)``.
        intensity_range: plausible HU range; voxels outside give a warning (``None``: no check).
        expected_spacing: expected voxel spacing in mm (``None``: no check).
        spacing_tolerance: relative difference from ``expected_spacing`` on any axis that gives a warning.
        max_voxels: largest volume accepted, in voxels (``too_large`` above).
    """

    patch_size: Sequence[int] | None = (192, 192, 80)
    num_classes: int = 1
    intensity_range: Sequence[float] | None = (-1100, 3100)
    expected_spacing: Sequence[float] | None = (0.703125, 0.703125, 1.25)
    spacing_tolerance: float = 0.5
    max_voxels: int = MAX_VOXELS


@dataclass(frozen=True)
class Annotations:
    """
    The well-formed boxes of an item.

    Args:
        boxes: the boxes that passed the value checks (``cccwhd``, world mm).
        positions: their positions in the item's box list (what the findings call ``box``).
        present: whether the item has any box or label at all (an item without is a valid negative).
    """

    boxes: list[list[float]]
    positions: list[int]
    present: bool


@dataclass(frozen=True)
class ImageHeader:
    """
    What an image header claims, and the file that holds the voxels (read by `scripts.data.probe.read_header`).

    Args:
        shape: the array shape (NIfTI: x, y, z, then time or channels).
        dtype: the voxel type on disk.
        slope, inter: the intensity scaling applied on reading (1 and 0: none).
        affine: voxel to world (RAS) matrix.
        data_file: the file holding the voxels (the ``.img`` of a NIfTI pair, otherwise the image file).
        data_offset: where the voxels start in the (uncompressed) data file.
        file_size: size in bytes of ``data_file`` on disk.
        compression: ``"gzip"``, ``"bz2"``, ``"zstd"`` or ``""`` (none).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    slope: float
    inter: float
    affine: np.ndarray
    data_file: str
    data_offset: int
    file_size: int
    compression: str


@dataclass
class VoxelStats:
    """
    Statistics of an image's voxels, accumulated slab by slab (see `add`).

    Args:
        nan, inf: counts of NaN and of +-Inf voxels.
        outside: finite voxels outside the intensity range.
        min, max: extremes of the finite voxels.
    """

    nan: int = 0
    inf: int = 0
    outside: int = 0
    min: float = math.inf
    max: float = -math.inf

    def add(self, slab: np.ndarray, intensity_range: Sequence[float] | None) -> None:
        """Add the voxels of one slab (any shape); ``intensity_range`` as in `CheckSettings`."""
        finite = np.isfinite(slab)
        if not finite.all():
            self.nan += int(np.isnan(slab).sum())
            self.inf += int(np.isinf(slab).sum())
            slab = slab[finite]
        if slab.size == 0:
            return
        self.min = min(self.min, float(slab.min()))
        self.max = max(self.max, float(slab.max()))
        if intensity_range is not None:
            lo, hi = float(intensity_range[0]), float(intensity_range[1])
            self.outside += int(np.count_nonzero((slab < lo) | (slab > hi)))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _bytes_text(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def resolve_image(image: str, dataset_dir: str) -> str:
    """``image`` as an absolute path: joined to ``dataset_dir`` when relative (the path form the quarantine keeps)."""
    return os.path.abspath(os.path.join(str(dataset_dir), os.path.expanduser(image)))


def check_path(image: str, dataset_dir: str, rec: ItemRecorder) -> None:
    """Warn when a relative ``image`` climbs out of ``dataset_dir`` (``../../etc/x``); absolute paths are the user's
    choice. The test is on the path as written, so links inside ``dataset_dir`` that point elsewhere are fine."""
    if os.path.isabs(os.path.expanduser(image)):
        return
    root = os.path.abspath(str(dataset_dir))
    path = resolve_image(image, dataset_dir)
    if os.path.commonpath([root, path]) != root:
        rec.warning("outside_dataset_dir", f"relative path {image!r} climbs out of dataset_dir {root}", path=image)


def no_boxes(boxes: Any) -> bool:
    """Whether a datalist ``box`` value holds no box: ``[]``, or empty lists only (``[[]]``, as some tools write)."""
    return isinstance(boxes, (list, tuple)) and all(isinstance(b, (list, tuple)) and not b for b in boxes)


def check_annotations(item: dict, rec: ItemRecorder, num_classes: int) -> Annotations:
    """Check keys and types of an item's boxes and labels on the raw datalist values."""
    for key in ("box", "label"):
        if key not in item:
            rec.error("missing_key", f'missing key "{key}"', key=key)
    boxes, labels = item.get("box", []), item.get("label", [])
    if no_boxes(boxes):
        boxes = []
    good: list[list[float]] = []
    positions: list[int] = []
    box_list_ok = isinstance(boxes, (list, tuple)) and all(isinstance(b, (list, tuple)) for b in boxes)
    if not box_list_ok:
        rec.error("bad_box_type", f"box must be a list of [cx, cy, cz, w, h, d] lists, got {str(boxes)[:80]}")
        boxes = []
    for j, b in enumerate(boxes):
        if not all(_is_number(v) for v in b):
            rec.error("bad_box_type", f"box {j} has non-numeric values {list(b)}")
        elif len(b) != 6:
            rec.error("box_values", f"box {j} has {len(b)} values, not 6: {list(b)}", box=j)
        elif not all(math.isfinite(float(v)) for v in b):
            rec.error("box_values", f"box {j} has non-finite values {list(b)}", box=j)
        elif min(float(v) for v in b[3:]) <= 0:
            size = tuple(float(v) for v in b[3:])
            rec.error("box_size", f"box {j} has non-positive size (w, h, d) = {size}", box=j)
        else:
            good.append([float(v) for v in b])
            positions.append(j)
    if not (isinstance(labels, (list, tuple)) and all(_is_int(v) for v in labels)):
        rec.error("bad_label_type", f"label must be a list of ints, got {labels}")
    else:
        if box_list_ok and len(labels) != len(boxes):
            counts = {"labels": len(labels), "boxes": len(boxes)}
            rec.error("label_count", f"{len(labels)} labels for {len(boxes)} boxes", **counts)
        bad = sorted({int(v) for v in labels if not 0 <= int(v) < num_classes})
        if bad:
            rec.error("label_range", f"labels {bad} outside [0, {num_classes}) (num_classes={num_classes})", labels=bad)
    return Annotations(good, positions, bool(boxes) or bool(labels))


def _check_layout(shape: tuple[int, ...], rec: ItemRecorder) -> bool:
    """A 3D volume, or a 4D one whose 4th dimension has size 1 (MONAI reads it as the one channel)."""
    text = _shape_text(shape)
    if len(shape) < 3:
        rec.error("wrong_dimensions", f"{len(shape)}D image ({text}): the detector needs a 3D volume", shape=shape)
    elif len(shape) == 4 and shape[3] > 1:
        rec.error(
            "multi_channel",
            f"4D image with {shape[3]} volumes ({text}): the detector takes one channel; "
            "write one volume (time point or channel) per file",
            shape=shape,
        )
    elif len(shape) > 4:
        rec.error("wrong_dimensions", f"{len(shape)}D image ({text}): the detector needs a 3D volume", shape=shape)
    elif min(shape) < 1:
        rec.error("wrong_dimensions", f"image shape {text} has an empty dimension", shape=shape)
    else:
        return True
    return False


def _check_dtype(header: ImageHeader, rec: ItemRecorder) -> bool:
    """A voxel type that reads as one number per voxel; a warning when its range cannot hold HU."""
    dtype = header.dtype
    if dtype.fields is not None or dtype.kind not in "biuf":
        rec.error("unsupported_dtype", f"voxel type {dtype} is not one number per voxel (RGB, complex, ...)")
        return False
    if dtype.kind == "f":
        return True
    info = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    slope = header.slope if math.isfinite(header.slope) and header.slope != 0 else 1.0  # NIfTI: 0 means none
    inter = header.inter if math.isfinite(header.inter) else 0.0
    lo, hi = sorted((info[0] * slope + inter, info[1] * slope + inter))
    if lo > HU_SPAN[0] or hi < HU_SPAN[1]:
        rec.warning(
            "dtype_range",
            f"voxel type {dtype} holds {lo:g}..{hi:g} (after the header's scaling), not the HU of a CT "
            f"({HU_SPAN[0]:g} air to {HU_SPAN[1]:g} bone): the intensities are not HU",
            dtype=str(dtype),
            range=[lo, hi],
        )
    return True


def _check_size(header: ImageHeader, rec: ItemRecorder, max_voxels: int) -> bool:
    """The voxels the header claims fit in the file and in the memory training would give them."""
    voxels = math.prod(header.shape)
    claimed = voxels * header.dtype.itemsize
    what = f"the header claims {_shape_text(header.shape)} {header.dtype} voxels ({_bytes_text(claimed)})"
    if not header.compression and header.file_size < header.data_offset + claimed:
        rec.error(
            "unreadable",
            f"truncated NIfTI: {what} from byte {header.data_offset}, the file has {_bytes_text(header.file_size)}",
            reason="truncated_nifti",
        )
        return False
    if header.compression == "gzip" and claimed > GZIP_MAX_RATIO * header.file_size:
        rec.error(
            "unreadable",
            f"{what}, more than a gzip file of {_bytes_text(header.file_size)} can hold "
            f"(at most {_bytes_text(GZIP_MAX_RATIO * header.file_size)}): truncated file or corrupt header",
            reason="size_mismatch",
        )
        return False
    if voxels > max_voxels:
        rec.error(
            "too_large",
            f"{_shape_text(header.shape)} = {voxels} voxels, more than the {max_voxels} the data check accepts "
            f"({_bytes_text(4 * max_voxels)} as float32, as training loads it): crop or resample the image",
            voxels=voxels,
        )
        return False
    return True


def affine_problem(affine: Any) -> str:
    """Why an affine is degenerate (``""`` if it is not)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape[0] < 4 or not np.all(np.isfinite(a)):
        return "has non-finite values" if a.shape[0] >= 4 else f"has shape {a.shape}"
    rzs = a[:3, :3]
    det = float(np.linalg.det(rzs))
    if abs(det) < 1e-6 * max(float(np.abs(rzs).max()), 1e-12) ** 3:
        return f"is singular (det {det:.3g})"
    return ""


def check_header(header: ImageHeader, rec: ItemRecorder, max_voxels: int) -> bool:
    """
    Judge an `ImageHeader` before any voxel is read: layout (3D, one channel),
    voxel type, claimed size against the file size and ``max_voxels``, and the affine. Returns whether the voxels
    may be read.
    """
    if not (_check_layout(header.shape, rec) and _check_dtype(header, rec) and _check_size(header, rec, max_voxels)):
        return False
    why = affine_problem(header.affine)
    if why:
        # the reader would substitute an affine of its own, so boxes cannot be placed
        rec.error("degenerate_affine", f"affine in the NIfTI header {why}: {header.affine[:3].tolist()}")
        return False
    return True


def check_voxels(stats: VoxelStats, rec: ItemRecorder, intensity_range: Sequence[float] | None) -> None:
    """NaN and Inf voxels are errors; finite voxels outside ``intensity_range`` a warning."""
    if stats.nan:
        rec.error("nan_voxels", f"{stats.nan} NaN voxels", count=stats.nan)
    if stats.inf:
        rec.error("inf_voxels", f"{stats.inf} Inf voxels", count=stats.inf)
    if intensity_range is not None and stats.outside:
        lo, hi = float(intensity_range[0]), float(intensity_range[1])
        rec.warning(
            "intensity_range",
            f"{stats.outside} voxels outside [{lo:g}, {hi:g}] (min {stats.min:g}, max {stats.max:g})",
            count=stats.outside,
            min=stats.min,
            max=stats.max,
        )


def check_geometry(spatial: Sequence[int], affine: Any, rec: ItemRecorder, settings: CheckSettings) -> bool:
    """
    The loaded image's affine (not degenerate; spacing near ``expected_spacing``) and size (not smaller than
    ``patch_size``). Returns whether boxes can be placed in it.
    """
    if affine is not None:
        why = affine_problem(affine)
        if why:
            rec.error("degenerate_affine", f"affine {why}")
            return False
        a = np.asarray(affine, dtype=np.float64)
        spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
        if settings.expected_spacing is not None:
            expected = np.asarray(settings.expected_spacing, dtype=np.float64)
            if np.any(np.abs(spacing - expected) / expected > settings.spacing_tolerance):
                rec.warning(
                    "unexpected_spacing",
                    f"spacing {tuple(round(float(s), 4) for s in spacing)} mm is far from the expected "
                    f"{tuple(float(s) for s in expected)} mm",
                    spacing=spacing.tolist(),
                )
    patch = settings.patch_size
    if patch is not None and any(p is not None and 0 < int(p) and s < p for s, p in zip(spatial, patch, strict=False)):
        rec.warning(
            "small_volume",
            f"volume {tuple(spatial)} is smaller than patch_size {tuple(patch)}: will be padded",
            shape=list(spatial),
        )
    return True


def check_boxes(mapped: np.ndarray, positions: Sequence[int], spatial: Sequence[int], rec: ItemRecorder) -> None:
    """Boxes mapped to image coordinates (``xyzxyz``, one row per entry of ``positions``) against the image size."""
    size = np.asarray(spatial[:3], dtype=np.float64)
    for j, b in zip(positions, mapped, strict=True):
        lo, hi = np.minimum(b[:3], b[3:]), np.maximum(b[:3], b[3:])
        where = f"box {j} maps to image coordinates {np.round(b, 2).tolist()}, image size {tuple(spatial)}"
        if np.any(hi <= 0) or np.any(lo >= size):
            rec.error("box_outside", f"{where}: entirely outside", box=j)
        elif np.any(lo < -EXTENT_SLACK) or np.any(hi > size + EXTENT_SLACK):
            rec.warning("box_partly_outside", f"{where}: partly outside", box=j)
