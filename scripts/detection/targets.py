"""
RetinaNet training targets without host syncs: MONAI's ATSS anchor matching (`atss_match`) and box encoding
(`encode_boxes`) for a whole batch, the boxes padded to the batch's largest count (`pad_targets`).

MONAI's matcher loops over images and boxes and selects with boolean masks and ``int(tensor)`` reads, each a host
sync on a GPU; here every size follows from shapes alone. The matched box index of every anchor equals MONAI's bit
for bit (``box_iou`` as the similarity), and the regression targets equal its ``BoxCoder.encode_single`` at the
matched anchors (tests/test_sync_free_losses.py). MONAI's validity and NaN checks of the boxes are not repeated:
the bundle's data check guarantees valid boxes before training starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BELOW_LOW_THRESHOLD", "atss_match", "encode_boxes", "pad_targets"]

BELOW_LOW_THRESHOLD = -1  # MONAI's Matcher code of a background anchor (ATSS never gives BETWEEN_THRESHOLDS, -2)
_CENTER_IN_GT_EPS = 0.01  # ATSSMatcher.min_dist


def pad_targets(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    device: torch.device,
    min_boxes: int = 1,
    width: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """
    Stack per-image boxes (N_i, 2*D) and labels (N_i,) into (B, N, 2*D), (B, N) and a validity mask (B, N), with
    N = max(N_i, ``min_boxes``, 1) taken from the shapes (no tensor value is read). A padded row holds the unit box
    at the origin (finite in every formula) and label 0; its mask is False. ``width`` is 2D (default: from the
    boxes, else 6). Boxes on another device than ``device`` are copied (a blocking copy from the CPU: give them on
    the device, as the trainer's ``prepare_batch`` does).
    """
    count = max([int(b.shape[0]) for b in boxes] + [min_boxes, 1])  # shapes are host metadata: no sync
    if width is None:
        width = next((int(b.shape[-1]) for b in boxes if b.dim() == 2 and b.shape[-1]), 6)
    dtype = boxes[0].dtype if boxes[0].is_floating_point() else torch.float32
    padded = torch.zeros((len(boxes), count, width), dtype=dtype, device=device)
    padded[..., width // 2 :] = 1.0
    padded_labels = torch.zeros((len(boxes), count), dtype=torch.long, device=device)
    valid = torch.zeros((len(boxes), count), dtype=torch.bool, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        n = int(b.shape[0])
        if n:
            padded[i, :n] = b.reshape(n, width).to(device=device, dtype=dtype)
            padded_labels[i, :n] = lab.reshape(n).to(device=device, dtype=torch.long)
            valid[i, :n] = True
    return padded, padded_labels, valid


def _centers(boxes: Tensor) -> Tensor:
    """Centres (..., D) of ``xyzxyz`` boxes, with MONAI's ``CenterSizeMode`` arithmetic (so distances tie alike)."""
    d = boxes.shape[-1] // 2
    return (boxes[..., :d] + boxes[..., d:]) / 2.0


def _sizes(boxes: Tensor) -> Tensor:
    d = boxes.shape[-1] // 2
    return boxes[..., d:] - boxes[..., :d]


def _volume(boxes: Tensor) -> Tensor:
    """MONAI's ``box_area`` (axis by axis products, in this order) without its validity check (a host sync)."""
    d = boxes.shape[-1] // 2
    volume = boxes[..., d] - boxes[..., 0]
    for axis in range(1, d):
        volume = volume * (boxes[..., d + axis] - boxes[..., axis])
    return volume


def _iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """
    IoU of broadcastable ``boxes`` (..., 2D) and ``anchors`` (..., 2D), elementwise, with the operations of MONAI's
    ``box_iou`` (float32, same order) but without its NaN check, a host sync.
    """
    d = boxes.shape[-1] // 2
    f32 = torch.float32
    lower = torch.maximum(boxes[..., :d], anchors[..., :d]).to(f32)
    upper = torch.minimum(boxes[..., d:], anchors[..., d:]).to(f32)
    inter = (upper - lower).clamp(min=0).prod(dim=-1)
    union = _volume(boxes.to(f32)) + _volume(anchors.to(f32)) - inter
    iou = inter / (union + torch.finfo(f32).eps)
    return iou.to(boxes.dtype if boxes.is_floating_point() else f32)


def _atss_candidates(
    boxes: Tensor,
    anchors: Tensor,
    num_anchor_locs_per_level: Sequence[int],
    num_anchors_per_loc: int,
    num_candidates: int,
    center_in_gt: bool,
    full_iou: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """
    ATSS candidates of boxes (..., N, 2D) among anchors (..., M, 2D): their anchor indices (..., N, K), IoUs and
    whether each is positive (its IoU reaches the box's mean + std). With no leading dimension and ``full_iou``,
    every tensor has the shape of MONAI's and goes through the same operations.
    """
    f32 = torch.float32
    # the same expression as MONAI's boxes_center_distance, so that equal distances stay equal
    distances = (_centers(boxes.to(f32))[..., :, None, :] - _centers(anchors.to(f32))[..., None, :, :]).pow(2)
    distances = distances.sum(-1).sqrt()
    candidates = []
    start = 0
    for locations in num_anchor_locs_per_level:
        end = start + locations * num_anchors_per_loc
        k = min(num_candidates * num_anchors_per_loc, locations)  # MONAI's bound (locations, not anchors)
        _, idx = distances[..., start:end].topk(k, dim=-1, largest=False)
        candidates.append(idx + start)
        start = end
    candidate_idx = torch.cat(candidates, dim=-1)  # (..., N, K)

    candidate_anchors = torch.take_along_dim(anchors[..., None, :, :], candidate_idx[..., None], dim=-2)
    if full_iou:  # MONAI's (N, M) matrix, then the candidates' entries
        candidate_ious = _iou(boxes[..., :, None, :], anchors[..., None, :, :]).gather(-1, candidate_idx)
    else:  # only the candidates' IoUs: K instead of M per box
        candidate_ious = _iou(boxes[..., :, None, :], candidate_anchors)
    if candidate_idx.shape[-1] <= 1:
        return candidate_idx, candidate_ious, torch.ones_like(candidate_idx, dtype=torch.bool)
    threshold = candidate_ious.mean(dim=-1) + candidate_ious.std(dim=-1)
    is_pos = candidate_ious >= threshold[..., None]
    if center_in_gt:
        d = boxes.shape[-1] // 2
        centres = _centers(candidate_anchors.to(f32))
        to_border = torch.cat([centres - boxes[..., :, None, :d], boxes[..., :, None, d:] - centres], dim=-1)
        is_pos = is_pos & (to_border.to(f32).min(dim=-1).values > _CENTER_IN_GT_EPS)
    return candidate_idx, candidate_ious, is_pos


def atss_match(
    boxes: Tensor,
    box_valid: Tensor,
    anchors: Tensor,
    num_anchor_locs_per_level: Sequence[int],
    num_anchors_per_loc: int,
    num_candidates: int = 4,
    center_in_gt: bool = False,
    num_boxes: Sequence[int] | None = None,
) -> Tensor:
    """
    MONAI's ATSS matching (``ATSSMatcher`` through ``RetinaNetDetector.compute_anchor_matched_idxs``) for a batch.

    Per box and pyramid level the ``min(num_candidates * num_anchors_per_loc, locations)`` anchors nearest to the
    box centre are candidates; a candidate is positive when its IoU reaches the mean plus the (unbiased) standard
    deviation of the box's candidate IoUs (and, with ``center_in_gt``, its centre lies 0.01 inside the box). An
    anchor positive for several boxes takes the one of highest IoU (the first on ties); the others are -1.

    Args:
        boxes: (B, N, 2D) ``xyzxyz`` boxes, padded (see `pad_targets`).
        box_valid: (B, N) False at padded rows; an image without a valid box is all background.
        anchors: (B, M, 2D) anchors.
        num_anchor_locs_per_level: locations (HWD) of each level, in the order of the anchors.
        num_anchors_per_loc: anchors per location.
        num_candidates: ATSS candidates per location and level.
        center_in_gt: whether a positive's centre must lie inside its box.
        num_boxes: the boxes of each image (host ints, the first ``num_boxes[i]`` rows of ``boxes[i]``): the
            candidates are then found image by image on tensors of MONAI's shapes, so that the choice among
            equidistant anchors (``topk`` ties) and the rounding of the IoU mean and std are MONAI's on any device.
            None: batched over the padded boxes (fixed shapes, e.g. for graph capture; equal to MONAI on the CPU,
            where it is tested, but a GPU kernel may break distance ties or round differently for other shapes).

    Returns:
        (B, M) int64: the matched box index, or -1 (background).
    """
    batch, num_gt, num_anchors = boxes.shape[0], boxes.shape[1], anchors.shape[1]
    settings = (num_anchor_locs_per_level, num_anchors_per_loc, num_candidates, center_in_gt)
    if num_boxes is None:
        candidate_idx, candidate_ious, is_pos = _atss_candidates(boxes, anchors, *settings, full_iou=False)
    else:
        k = sum(min(num_candidates * num_anchors_per_loc, locations) for locations in num_anchor_locs_per_level)
        candidate_idx = torch.zeros((batch, num_gt, k), dtype=torch.long, device=boxes.device)
        candidate_ious = torch.zeros((batch, num_gt, k), dtype=boxes.dtype, device=boxes.device)
        is_pos = torch.zeros((batch, num_gt, k), dtype=torch.bool, device=boxes.device)
        for i, n in enumerate(num_boxes):  # host ints: a loop over images, no sync
            if n:
                found = _atss_candidates(boxes[i, :n], anchors[i], *settings, full_iou=True)
                for whole, part in zip((candidate_idx, candidate_ious, is_pos), found, strict=True):
                    whole[i, :n] = part
    is_pos = is_pos & box_valid[..., None]

    if candidate_idx.shape[-1] <= 1:
        # MONAI's corner case (the std of one IoU is NaN): every box's candidate is matched to box 0
        hit = torch.zeros((batch, num_anchors), dtype=torch.long, device=anchors.device)
        hit.scatter_add_(1, candidate_idx.flatten(1), is_pos.flatten(1).long())
        return torch.where(hit > 0, 0, BELOW_LOW_THRESHOLD)

    # an anchor positive for several boxes goes to the box of highest IoU: a max over boxes of the positive IoUs
    ious = torch.full((batch, num_gt, num_anchors), -math.inf, dtype=candidate_ious.dtype, device=boxes.device)
    ious.scatter_(2, candidate_idx, torch.where(is_pos, candidate_ious, -math.inf))
    best, matches = ious.to(torch.float32).max(dim=1)  # the first maximal box on ties, as MONAI's max over dim 0
    return torch.where(best == -math.inf, BELOW_LOW_THRESHOLD, matches)


def encode_boxes(gt_boxes: Tensor, anchors: Tensor, weights: Sequence[float]) -> Tensor:
    """
    MONAI's ``BoxCoder.encode_single`` (centre offsets over anchor size, log size ratios, times ``weights``) for
    broadcastable (..., 2D) boxes and anchors, without its validity and NaN checks (host syncs).
    """
    d = gt_boxes.shape[-1] // 2
    # filled on the device: a tensor made from a Python list would be a blocking host-to-device copy
    w = torch.stack([gt_boxes.new_full((), float(v)) for v in weights])
    anchor_size = _sizes(anchors)
    offsets = w[:d] * (_centers(gt_boxes) - _centers(anchors)) / anchor_size
    log_sizes = w[d:] * torch.log(_sizes(gt_boxes) / anchor_size)
    return torch.cat((offsets, log_sizes), dim=-1)
