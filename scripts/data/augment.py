"""CPU-cheap versions of two of the training augmentations, with MONAI's outputs from MONAI's random draws.

`RandRotateBoxd` rotates a patch with its boxes. The model zoo does that by drawing each box as an ellipsoid mask
(`BoxToMaskd`), rotating image and masks (`RandRotated`, nearest neighbour) and taking the masks' bounding boxes
(`MaskToBoxd`). Those run on every patch although the rotation fires on one in five: full-size masks, a float copy
of them, a bounding box found by Python's ``min``/``max`` over every mask voxel, and, when it fires, a resampling
grid computed twice (image, masks; the grid is most of a rotation's cost on a CPU). `RandRotateBoxd` builds
full-size masks only when it rotates, and rotates image and masks on one grid. Without a rotation the recipe still
changes the boxes (the masks are drawn at truncated integer coordinates, and an elongated box's ellipsoid does not
reach every face); that is reproduced from a mask the size of each box.

`SeparableRandGaussianSmoothd` is `RandGaussianSmoothd` with the same kernels applied by shifted sums instead of
single-channel 3D convolutions, which are slow on a CPU.

Both are tested against the MONAI transforms they replace, on the same seeds.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.apps.detection.transforms.box_ops import convert_box_to_mask
from monai.config import KeysCollection
from monai.data import get_track_meta
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import RandGaussianSmoothd, RandRotated
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = ["RandRotateBoxd", "SeparableRandGaussianSmoothd", "mask_to_box", "separable_gaussian"]

BG_LABEL = -1  # BoxToMaskd's background with min_fg_label 0


def mask_to_box(masks: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """
    Bounding boxes (``StandardMode``, [start, stop)) of the non-zero voxels of each channel, and the indices of
    the channels that have any; what `monai.apps.detection.transforms.box_ops.convert_mask_to_box` finds, from the
    per-axis projections instead of every voxel's index.
    """
    masks_np = np.asarray(masks) != 0
    dims = masks_np.ndim - 1
    boxes, kept = [], []
    for channel, mask in enumerate(masks_np):
        spans = []
        for axis in range(dims):
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(dims) if a != axis)))
            if hit.size == 0:
                break
            spans.append((hit[0], hit[-1] + 1))
        else:
            boxes.append([s[0] for s in spans] + [s[1] for s in spans])
            kept.append(channel)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 2 * dims), np.asarray(kept, dtype=np.int64)


def _unrotated_boxes(boxes: torch.Tensor, labels: torch.Tensor, ellipse_mask: bool) -> tuple[np.ndarray, np.ndarray]:
    """What BoxToMask -> MaskToBox gives without a rotation (boxes, and the indices of those kept), each box's mask
    drawn in an array of the box's size."""
    dims = boxes.shape[1] // 2
    int_boxes = np.asarray(torch.as_tensor(boxes).cpu()).astype(np.int32)  # truncated, as convert_box_to_mask does
    found_boxes, kept = [], []
    for index, (box, label) in enumerate(zip(int_boxes, torch.as_tensor(labels).cpu())):
        size = box[dims:] - box[:dims]
        local = np.concatenate([np.zeros(dims, dtype=np.int32), size])[None]
        mask = convert_box_to_mask(local, label.reshape(1), size.tolist(), bg_label=BG_LABEL, ellipse_mask=ellipse_mask)
        found, _ = mask_to_box(np.asarray(mask) - BG_LABEL)
        if len(found):
            found_boxes.append(found[0] + np.concatenate([box[:dims], box[:dims]]))
            kept.append(index)
    return np.asarray(found_boxes, dtype=np.float32).reshape(-1, 2 * dims), np.asarray(kept, dtype=np.int64)


def _kept_labels(labels: torch.Tensor, kept: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(labels).cpu().long()[torch.as_tensor(kept, dtype=torch.long)]


class RandRotateBoxd(RandRotated):
    """
    Rotate an image and its boxes together by a random angle about the patch centre (keeping the size):
    ``BoxToMaskd(min_fg_label=0) -> RandRotated(keys=[image, box_mask], mode=[mode, "nearest"]) -> MaskToBoxd ->
    DeleteItemsd(box_mask)`` as one transform with the same output and the same random draws. Boxes whose mask
    leaves the patch are dropped with their labels.

    Args:
        image_keys: image key (one).
        box_keys: boxes (``StandardMode``, image coordinates).
        label_keys: their labels.
        range_x, range_y, range_z, prob, padding_mode, align_corners: as `RandRotated`.
        mode: interpolation of the image (masks are always rotated with ``"nearest"``).
        ellipse_mask: draw boxes as ellipsoids (as `BoxToMaskd`; the zoo's choice for rotations).
    """

    def __init__(
        self,
        image_keys: KeysCollection,
        box_keys: str,
        label_keys: str,
        range_x: float = 0.0,
        range_y: float = 0.0,
        range_z: float = 0.0,
        prob: float = 0.1,
        mode: str = "nearest",
        padding_mode: str = "zeros",
        align_corners: bool = False,
        ellipse_mask: bool = True,
    ) -> None:
        super().__init__(
            keys=image_keys,
            range_x=range_x,
            range_y=range_y,
            range_z=range_z,
            prob=prob,
            keep_size=True,
            mode=mode,
            padding_mode=padding_mode,
            align_corners=align_corners,
            dtype=np.float32,
        )
        self.box_key = box_keys
        self.label_key = label_keys
        self.ellipse_mask = ellipse_mask

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        self.rand_rotate.randomize()  # drawn even when not rotating, as RandRotated does
        boxes, labels = d[self.box_key], d[self.label_key]
        if not self._do_transform:
            found, kept = _unrotated_boxes(boxes, labels, self.ellipse_mask)
            d[self.box_key], d[self.label_key] = torch.as_tensor(found), _kept_labels(labels, kept)
            for key in self.key_iterator(d):
                d[key] = d[key].float()  # RandRotated's output type either way
            return d
        image_key = self.keys[0]
        image = d[image_key]
        masks = convert_box_to_mask(
            boxes, labels, list(image.shape[1:]), bg_label=BG_LABEL, ellipse_mask=self.ellipse_mask
        )
        masks = torch.as_tensor(np.asarray(masks) - BG_LABEL, dtype=torch.float32)  # background 0, as padded
        kwargs = {"padding_mode": self.padding_mode[0], "align_corners": self.align_corners[0], "randomize": False}
        if self.mode[0] == "nearest":
            # one grid for both: it depends on the size and the angles only, and each channel is sampled on its own
            both = torch.cat([image.float(), masks.to(image.device)])
            both = self.rand_rotate(both, mode="nearest", dtype=self.dtype[0], **kwargs)
            d[image_key], rotated = both[: image.shape[0]], both[image.shape[0] :]
        else:
            d[image_key] = self.rand_rotate(image, mode=self.mode[0], dtype=self.dtype[0], **kwargs)
            rotated = self.rand_rotate(masks, mode="nearest", dtype=np.float32, **kwargs)
        found, kept = mask_to_box(rotated.cpu())
        d[self.box_key], d[self.label_key] = torch.as_tensor(found), _kept_labels(labels, kept)
        return d


def separable_gaussian(image: torch.Tensor, sigma: tuple[float, ...], approx: str = "erf") -> torch.Tensor:
    """
    `monai.transforms.GaussianSmooth` (kernels spread 4 sigma, zero padding, axis by axis) on a channel-first float
    image, each axis's 1D kernel applied as a sum of shifted copies.
    """
    out = torch.as_tensor(image, dtype=torch.float32)
    for axis, s in enumerate(sigma, start=1):
        kernel = gaussian_1d(torch.as_tensor(s, dtype=torch.float), truncated=4.0, approx=approx).tolist()
        radius, n = (len(kernel) - 1) // 2, out.shape[axis]
        pad = [0, 0] * (out.ndim - 1 - axis) + [radius, radius]
        padded = torch.nn.functional.pad(out, pad)
        acc = padded.narrow(axis, 0, n) * kernel[0]
        for tap in range(1, len(kernel)):
            acc.add_(padded.narrow(axis, tap, n), alpha=kernel[tap])
        out = acc
    return out


class SeparableRandGaussianSmoothd(RandGaussianSmoothd):
    """`RandGaussianSmoothd` (same arguments, same random draws, same values) computed by `separable_gaussian`."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        smooth = self.rand_smooth
        smooth.randomize(None)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=get_track_meta())
            sigma = (smooth.x, smooth.y, smooth.z)[: image.ndim - 1]
            smoothed = separable_gaussian(image, sigma, smooth.approx)
            d[key] = convert_to_dst_type(smoothed, dst=image, dtype=smoothed.dtype)[0]
        return d
