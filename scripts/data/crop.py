"""A compact stored form of a CT volume, and the training crop that samples from it as if it were whole.

Most of a chest CT is air around the body, and HU fit int16, so the deterministic part of the training pipeline
stores each volume cropped to the body (plus every box) in int16: `CompactVolumed`. The crop is only a storage
format: boxes stay in the image coordinates of the full (padded) volume, the *frame*, and
`CompactRandCropBoxByPosNegLabeld` samples training patches in that frame exactly as MONAI's
`RandCropBoxByPosNegLabeld` does (same centre distribution, same patch slices, same box cropping), reading the
voxels from the stored part and filling the rest, which was air, with the bundle's pad value (-1024 HU).

The sampler also avoids the two costs that dominate MONAI's version at LUNA16 size: a full-volume mask per box
with its index arrays (about 0.5 GB of int64 for a 512 x 512 x 256 volume), and a deep copy of the whole volume
for every patch.

The ``zscore`` intensity normalisation needs whole-volume statistics, which a patch does not have:
`VolumeIntensityStatsd` records them before the volume is cropped and `NormalizeIntensityFromStatsd` applies them
to each patch, giving the same values as `NormalizeIntensityd` on the whole volume.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.apps.detection.transforms.array import SpatialCropBox
from monai.apps.detection.transforms.dictionary import RandCropBoxByPosNegLabeld
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, NormalizeIntensity
from monai.transforms.utils import correct_crop_centers, generate_spatial_bounding_box
from monai.utils import fall_back_tuple

__all__ = [
    "VolumeFrame",
    "frame_of",
    "CompactVolumed",
    "CompactRandCropBoxByPosNegLabeld",
    "VolumeIntensityStatsd",
    "NormalizeIntensityFromStatsd",
]

FRAME_START = "_frame_start"
FRAME_SHAPE = "_frame_shape"
# tries before falling back to an explicit mask; only a frame almost all foreground (about the patch size) needs it
MAX_REJECTIONS = 1000


class VolumeFrame(NamedTuple):
    """Where a stored (cropped) volume sits in its full frame: the stored part's first voxel and the frame's size."""

    start: tuple[int, ...]
    shape: tuple[int, ...]


def frame_of(data: Mapping[Hashable, Any], key: Hashable) -> VolumeFrame:
    """The frame of ``data[key]``: the one `CompactVolumed` recorded, or the image itself when it was not cropped."""
    if f"{key}{FRAME_START}" in data:
        start = torch.as_tensor(data[f"{key}{FRAME_START}"]).tolist()
        shape = torch.as_tensor(data[f"{key}{FRAME_SHAPE}"]).tolist()
        return VolumeFrame(tuple(int(s) for s in start), tuple(int(s) for s in shape))
    spatial = tuple(int(s) for s in data[key].shape[1:])
    return VolumeFrame((0,) * len(spatial), spatial)


def _shifted_affine(affine: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """The affine of a sub-array whose first voxel is ``offset`` in the array of ``affine``."""
    shift = torch.eye(affine.shape[0], dtype=affine.dtype)
    shift[: len(offset), -1] = torch.as_tensor(offset, dtype=affine.dtype)
    return affine @ shift


class CompactVolumed(MapTransform):
    """
    Store an image compactly: crop it to the bounding box of its body voxels and of every box, round to int16, and
    record the crop in the full frame (keys ``<key>_frame_start`` and ``<key>_frame_shape``).

    The output is a `MetaTensor` whose metadata is only the file name and the affine of the stored part (the
    applied-operations trace is dropped, and other tensors in the dictionary are made plain tensors), so that it can
    be saved and read back with ``torch.load(weights_only=True)``, as `monai.data.PersistentDataset` does.

    Args:
        keys: image keys to store compactly.
        box_keys: boxes (``StandardMode``, image coordinates of the frame) the stored part must contain.
        threshold: voxels above this value are body (HU: air is about -1000, fat -100, lung -850 but inside the
            body's outline).
        margin: voxels kept around the body on each side.
        dtype: storage dtype; values are rounded and clipped to its range (int16 holds HU exactly). A volume with
            non-finite voxels is stored as float32 instead, so that they reach the network and the guard.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        box_keys: KeysCollection = (),
        threshold: float = -500.0,
        margin: int = 2,
        dtype: torch.dtype = torch.int16,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_keys = tuple(box_keys) if isinstance(box_keys, (list, tuple)) else (box_keys,)
        self.threshold = float(threshold)
        self.margin = int(margin)
        self.dtype = dtype

    def _stored_region(self, image: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        spatial = list(image.shape[1:])
        start, end = generate_spatial_bounding_box(image, lambda x: x > self.threshold, margin=self.margin)
        if not any(e > s for s, e in zip(start, end)):  # no body found: keep the whole frame
            start, end = [0] * len(spatial), spatial
        for box in boxes:
            if box.numel():
                lo = torch.floor(box[:, : len(spatial)].min(0).values).long().tolist()
                hi = torch.ceil(box[:, len(spatial) :].max(0).values).long().tolist()
                start = [min(s, b) for s, b in zip(start, lo)]
                end = [max(e, b) for e, b in zip(end, hi)]
        start = [max(int(s), 0) for s in start]
        end = [min(int(e), n) for e, n in zip(end, spatial)]
        return start, end

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        boxes = [torch.as_tensor(d[k]) for k in self.box_keys if k in d]
        for key in self.key_iterator(d):
            image = d[key]
            start, end = self._stored_region(image, boxes)
            part = torch.as_tensor(image)[(slice(None), *(slice(s, e) for s, e in zip(start, end)))]
            info = torch.iinfo(self.dtype) if not self.dtype.is_floating_point else torch.finfo(self.dtype)
            if bool(torch.isfinite(part).all()):
                stored = torch.round(part).clamp(info.min, info.max).to(self.dtype).contiguous()
            else:  # int16 would turn NaN/Inf into ordinary HU; kept as they are, the guard can name the file
                stored = part.float().contiguous()
            meta = getattr(image, "meta", {})
            affine = torch.as_tensor(meta.get("affine", torch.eye(len(start) + 1, dtype=torch.float64)))
            d[key] = MetaTensor(
                stored,
                affine=_shifted_affine(affine, start),
                meta={"filename_or_obj": str(meta.get("filename_or_obj", ""))},
            )
            d[f"{key}{FRAME_START}"] = torch.tensor(start, dtype=torch.int64)
            d[f"{key}{FRAME_SHAPE}"] = torch.tensor(list(image.shape[1:]), dtype=torch.int64)
        for k, v in d.items():
            if isinstance(v, MetaTensor) and k not in self.keys:
                d[k] = v.as_tensor()  # traced operations hold objects torch.load(weights_only=True) refuses
        return d


class CompactRandCropBoxByPosNegLabeld(RandCropBoxByPosNegLabeld):
    """
    MONAI's `RandCropBoxByPosNegLabeld` on a volume stored by `CompactVolumed` (or any whole volume), cheaply.

    A positive crop centre is uniform over the union of the boxes' extended regions (the centres whose patch holds a
    whole box, ``whole_box``), a negative one uniform over the rest of the frame, both moved into the valid range
    like MONAI's; they are drawn by rejection sampling instead of from index arrays of the whole volume, so the
    distribution is the same and the cost does not grow with the volume. Each patch is read from the stored part
    (no copy of the volume); frame voxels outside it are ``fill_value``. Keys ``<key>_frame_*`` are not passed on.

    Args:
        image_keys, box_keys, label_keys, spatial_size, pos, neg, num_samples, whole_box, allow_smaller,
            allow_missing_keys: as `RandCropBoxByPosNegLabeld`.
        fill_value: value of frame voxels outside the stored part (the value the pipeline pads with).
    """

    def __init__(
        self,
        image_keys: KeysCollection,
        box_keys: str,
        label_keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        pos: float = 1.0,
        neg: float = 1.0,
        num_samples: int = 1,
        whole_box: bool = True,
        fill_value: float = -1024.0,
        allow_smaller: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            image_keys=image_keys,
            box_keys=box_keys,
            label_keys=label_keys,
            spatial_size=spatial_size,
            pos=pos,
            neg=neg,
            num_samples=num_samples,
            whole_box=whole_box,
            allow_smaller=allow_smaller,
            allow_missing_keys=allow_missing_keys,
        )
        self.fill_value = fill_value

    @staticmethod
    def _holding(voxel: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """Which of ``regions`` (int boxes, [start, stop)) hold ``voxel``."""
        dims = len(voxel)
        return np.all((voxel >= regions[:, :dims]) & (voxel < regions[:, dims:]), axis=1)

    def _uniform_in_union(self, regions: np.ndarray) -> list[int]:
        """A voxel uniform over the union of ``regions`` (int boxes, [start, stop)): pick a region by its volume,
        a voxel in it, and keep it with probability 1 / (regions holding it)."""
        dims = regions.shape[1] // 2
        sizes = regions[:, dims:] - regions[:, :dims]
        weights = np.prod(sizes, axis=1).astype(np.float64)
        while True:
            k = int(np.searchsorted(np.cumsum(weights), self.R.rand() * weights.sum(), side="right"))
            k = min(k, len(regions) - 1)
            voxel = regions[k, :dims] + np.array([self.R.randint(s) for s in sizes[k]])
            if self.R.rand() * self._holding(voxel, regions).sum() < 1.0:
                return voxel.tolist()

    def _uniform_outside(self, regions: np.ndarray, shape: Sequence[int]) -> list[int] | None:
        """A voxel uniform over the frame outside ``regions``; ``None`` when every voxel is inside one."""
        dims = len(shape)
        for _ in range(MAX_REJECTIONS):
            voxel = np.array([self.R.randint(s) for s in shape])
            if not self._holding(voxel, regions).any():
                return voxel.tolist()
        mask = np.ones(shape, dtype=bool)
        for r in regions:
            mask[tuple(slice(a, b) for a, b in zip(r[:dims], r[dims:]))] = False
        outside = np.flatnonzero(mask)
        if outside.size == 0:
            return None
        return list(np.unravel_index(outside[self.R.randint(outside.size)], shape))

    def randomize(  # type: ignore[override]
        self, boxes: torch.Tensor | np.ndarray, image_size: Sequence[int], *args: Any, **kwargs: Any
    ) -> None:
        regions = self.generate_fg_center_boxes_np(boxes, image_size).astype(np.int64)
        dims = len(image_size)
        centers = []
        for _ in range(self.num_samples):
            positive = len(regions) > 0 and self.R.rand() < self.pos_ratio
            center = self._uniform_in_union(regions) if positive else None
            if center is None:
                center = self._uniform_outside(regions.reshape(-1, 2 * dims), image_size)
            if center is None:  # the boxes' regions fill the frame: every centre is positive
                center = self._uniform_in_union(regions)
            centers.append(correct_crop_centers(center, self.spatial_size, image_size, self.allow_smaller))
        self.centers = tuple(centers)

    def _patch(self, image: torch.Tensor, frame: VolumeFrame, slices: list[slice]) -> torch.Tensor:
        stored = torch.as_tensor(image)
        patch = torch.full((stored.shape[0], *(s.stop - s.start for s in slices)), self.fill_value, dtype=stored.dtype)
        src, dst = [slice(None)], [slice(None)]
        for s, offset, n in zip(slices, frame.start, stored.shape[1:]):
            lo, hi = max(s.start - offset, 0), min(s.stop - offset, n)
            if hi <= lo:
                break  # the patch lies wholly outside the stored part: all fill
            src.append(slice(lo, hi))
            dst.append(slice(lo + offset - s.start, hi + offset - s.start))
        else:
            patch[tuple(dst)] = stored[tuple(src)]
        meta = dict(getattr(image, "meta", {}))
        affine = torch.as_tensor(meta.pop("affine", torch.eye(len(slices) + 1, dtype=torch.float64)))
        offset = [s.start - o for s, o in zip(slices, frame.start)]
        return MetaTensor(patch, affine=_shifted_affine(affine, offset), meta=meta)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:  # type: ignore[override]
        d = dict(data)
        frame = frame_of(d, self.image_keys[0])
        self.spatial_size = fall_back_tuple(self.spatial_size_, frame.shape)
        boxes = d[self.box_keys]
        labels = [d[k] for k in self.label_keys]
        self.randomize(boxes, frame.shape)
        frame_keys = {f"{k}{suffix}" for k in self.image_keys for suffix in (FRAME_START, FRAME_SHAPE)}
        rest = {k: v for k, v in d.items() if k not in frame_keys}
        results = []
        for center in self.centers:
            start = [max(int(c) - s // 2, 0) for c, s in zip(center, self.spatial_size)]
            slices = [slice(a, min(a + s, n)) for a, s, n in zip(start, self.spatial_size, frame.shape)]
            out = dict(rest)
            for key in self.image_keys:
                out[key] = self._patch(d[key], frame_of(d, key), slices)
            out[self.box_keys], cropped = SpatialCropBox(roi_slices=slices)(boxes, labels)
            for key, value in zip(self.label_keys, cropped):
                out[key] = value
            results.append(out)
        return results


class VolumeIntensityStatsd(MapTransform):
    """
    Record the mean and standard deviation of each channel of the whole image (key ``<key>_stats``, shape C x 2),
    computed as `NormalizeIntensity` (``nonzero=False``) computes them, for `NormalizeIntensityFromStatsd`.

    Args:
        keys: image keys.
        allow_missing_keys: don't raise for missing keys.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float()
            stats = [(NormalizeIntensity._mean(c), NormalizeIntensity._std(c)) for c in image]
            d[f"{key}_stats"] = torch.tensor(stats, dtype=torch.float64)
        return d


class NormalizeIntensityFromStatsd(MapTransform):
    """
    ``(x - mean) / std`` per channel with the whole-volume statistics `VolumeIntensityStatsd` recorded: on a patch,
    the values `NormalizeIntensityd(nonzero=False, channel_wise=True)` gives on the whole volume (a standard
    deviation of 0 divides by 1, as there).

    Args:
        keys: image keys (each needs its ``<key>_stats``).
        allow_missing_keys: don't raise for missing keys.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            stats = torch.as_tensor(d[f"{key}_stats"]).tolist()
            normalize = NormalizeIntensity(
                subtrahend=[s[0] for s in stats], divisor=[s[1] for s in stats], nonzero=False, channel_wise=True
            )
            d[key] = normalize(d[key].float())  # in place per channel: an integer patch would truncate
        return d
