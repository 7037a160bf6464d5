"""
RetinaNet training losses without host syncs: MONAI's ATSS matching and box encoding (`scripts.detection.targets`),
hard negative sampling and the two losses, computed for the whole batch with fixed-size tensors.

MONAI's `RetinaNetDetector.compute_loss` loops over images and boxes, selects anchors with boolean masks, ``nonzero``
and ``torch.where(cond)``, sizes its samples with ``int(tensor)`` and checks values with ``.any()``: on a GPU each of
these waits for the device (about 100 to 200 host syncs a step). Here every quantity whose size depends on the data
is kept at a size known from shapes alone (boxes padded to the batch's largest count, samples drawn with ``topk`` of
random keys under masks) and every count stays a device tensor, so the step can run ahead of the GPU or be captured.

What is equal to MONAI (see tests/test_sync_free_losses.py):

- the matched box index of every anchor (`atss_match`), bit for bit, for ``box_iou`` as the similarity;
- the box regression targets at the matched anchors (`encode_boxes`);
- the numbers of sampled positives and negatives and the rule that draws them (`sample_counts`, `sample_anchors`);
- the two losses for the same sampled anchors (masked sums with MONAI's normalisation), up to float rounding;
- a batch without any box has MONAI's box loss, a 0 outside the graph (told from the targets' shapes: no sync): the
  regression head gets no gradient and its backward is skipped (a step 28% shorter, full recipe at 64x64x32, CPU).

Where it differs:

- the random draws are not MONAI's ``randperm`` stream; and among negatives of equal score at the edge of the hard
  pool, which ones enter it may differ (both follow the rule);
- a non-finite logit or box regression gives NaN losses, where MONAI's heads raise ``ValueError``;
- a batch with boxes but no matched anchor (rare) has a box loss of 0 in the graph (zero gradients), where MONAI
  returns a CPU ``tensor(0.0)`` outside it; a batch without a sampled anchor (not possible with ``min_neg >= 1`` and
  background anchors) would have a classification loss of 0, where MONAI's mean of nothing is NaN;
- MONAI's warning when no anchor matches a box, and its debug prints, are gone (both read device values).

The box validity checks that MONAI runs on the targets inside the step (``is_valid_box_values`` in ``box_area`` and
``encode_boxes``, NaN checks of the IoU and of the targets) are not repeated: the bundle's data check guarantees
valid boxes before training starts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler
from monai.data.box_utils import box_iou
from scripts.detection.targets import BELOW_LOW_THRESHOLD, atss_match, encode_boxes, pad_targets
from torch import Tensor, nn

__all__ = ["SUPPORTED_LOSSES", "SyncFreeLosses", "SyncFreeRetinaNetLoss", "sample_anchors", "sample_counts"]

# losses whose ``reduction="mean"`` is the mean of their ``reduction="none"`` output, the one reduction reproduced
# here with masks; MONAI's FocalLoss is not among them (its "sum" sums per class first)
SUPPORTED_LOSSES: tuple[type[nn.Module], ...] = (
    nn.BCEWithLogitsLoss,
    nn.SmoothL1Loss,
    nn.L1Loss,
    nn.MSELoss,
    nn.HuberLoss,
)
# what each "not reproduced here" error ends with: the setting that trains the same detector without this module
OTHER_PATH = "; train with MONAI's own path instead: --detector#sync_free False"


def _draw(keys: Tensor, eligible: Tensor, count: Tensor, k_max: int) -> Tensor:
    """
    A (B, M) bool mask of ``count`` (B,) elements per row among the ``eligible`` ones, those of largest ``keys``
    (uniform random keys give a uniform random subset), with a ``topk`` of the static size ``k_max`` >= count.
    """
    k_max = min(k_max, keys.shape[-1])
    keyed = torch.where(eligible, keys, -1.0)  # keys lie in [0, 1): the ineligible come last
    _, order = keyed.topk(k_max, dim=-1)
    take = torch.arange(k_max, device=keys.device) < count[:, None]
    return torch.zeros_like(eligible).scatter_(1, order, take)


def _count_bounds(
    batch_size_per_image: int, positive_fraction: float, min_neg: int, pool_size: float
) -> tuple[int, int, int]:
    """The largest num_pos, num_neg and pool `sample_counts` can give (Python ints: the static sizes of topk)."""
    max_pos = int(batch_size_per_image * positive_fraction)
    # MONAI's formulas grow with num_pos and num_neg: their bounds are their values at the largest ones
    max_neg = max(int(max(1, max_pos) * abs(1 - 1.0 / float(positive_fraction))), min_neg)
    return max_pos, max_neg, int(max_neg * pool_size)


def sample_counts(
    num_positive: Tensor,
    num_negative: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    min_neg: int = 1,
    pool_size: float = 10,
) -> tuple[Tensor, Tensor, Tensor]:
    """
    MONAI's ``HardNegativeSampler`` counts per image, as device tensors, from the numbers of positive and negative
    anchors (B,): ``num_pos = min(P, int(batch_size_per_image * positive_fraction))``,
    ``num_neg = min(N, max(int(max(1, num_pos) * |1 - 1/positive_fraction|), min_neg))`` and the hard pool
    ``min(N, int(num_neg * pool_size))``. The products are float64 on the device, the same IEEE operations as
    MONAI's Python floats, and ``int()`` of a non-negative number is its floor: the counts are MONAI's exactly.
    """
    max_pos = int(batch_size_per_image * positive_fraction)
    ratio = abs(1 - 1.0 / float(positive_fraction))
    num_pos = num_positive.clamp(max=max_pos)
    wanted = (num_pos.clamp(min=1).to(torch.float64) * ratio).floor().long().clamp(min=min_neg)
    num_neg = torch.minimum(num_negative, wanted)
    pool = torch.minimum(num_negative, (num_neg.to(torch.float64) * float(pool_size)).floor().long())
    return num_pos, num_neg, pool


def sample_anchors(
    matched_idxs: Tensor,
    scores: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    min_neg: int = 1,
    pool_size: float = 10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """
    MONAI's ``HardNegativeSampler`` rule for a batch, as (B, M) bool masks of the sampled positives and negatives.

    Per image: ``num_pos = min(#positives, int(batch_size_per_image * positive_fraction))`` positives drawn
    uniformly; ``num_neg = min(#negatives, max(int(max(1, num_pos) * |1 - 1/positive_fraction|), min_neg))``
    negatives drawn uniformly from the ``min(#negatives, int(num_neg * pool_size))`` negatives of highest
    ``scores``. Positives are anchors with ``matched_idxs >= 0``, negatives those at -1 (-2 is neither). The counts
    are device tensors (`sample_counts`).

    Args:
        matched_idxs: (B, M) matched box index per anchor.
        scores: (B, M) the hardness of a negative: MONAI uses the largest class logit.
        batch_size_per_image, positive_fraction, min_neg, pool_size: ``HardNegativeSampler``'s settings.
        generator: random generator of the draws (on the device of ``scores``).
    """
    device = matched_idxs.device
    positive = matched_idxs >= 0
    negative = matched_idxs == BELOW_LOW_THRESHOLD
    num_pos, num_neg, pool = sample_counts(
        positive.sum(dim=1), negative.sum(dim=1), batch_size_per_image, positive_fraction, min_neg, pool_size
    )
    max_pos, max_neg, max_pool = _count_bounds(batch_size_per_image, positive_fraction, min_neg, pool_size)

    pos_mask = _draw(torch.rand(positive.shape, generator=generator, device=device), positive, num_pos, max_pos)
    # the pool: the `pool` hardest negatives; then `num_neg` of them at random
    hardness = torch.where(negative, scores.detach().to(torch.float32), -math.inf)
    k_pool = min(max_pool, hardness.shape[-1])
    _, pool_idx = hardness.topk(k_pool, dim=-1)
    in_pool = torch.arange(k_pool, device=device) < pool[:, None]
    pool_keys = torch.rand(pool_idx.shape, generator=generator, device=device)
    # MONAI takes randperm(pool)[:num_neg]: min(num_neg, pool) negatives (fewer only when pool_size < 1)
    chosen = _draw(pool_keys, in_pool, torch.minimum(num_neg, pool), max_neg)  # (B, k_pool) over pool slots
    neg_mask = torch.zeros_like(negative).scatter_(1, pool_idx, chosen)
    return pos_mask, neg_mask


def _elementwise(loss: nn.Module) -> tuple[nn.Module, str]:
    """A copy of ``loss`` with ``reduction="none"``, and the reduction it had."""
    if not isinstance(loss, SUPPORTED_LOSSES) or loss.reduction not in ("mean", "sum"):
        raise NotImplementedError(
            f"sync-free losses reproduce {[c.__name__ for c in SUPPORTED_LOSSES]} with reduction 'mean' or 'sum', "
            f"got {loss!r}{OTHER_PATH}"
        )
    elementwise = copy.copy(loss)
    elementwise.reduction = "none"
    return elementwise, loss.reduction


def _masked_reduce(values: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """``values`` (B, M, K) reduced over the anchors in ``mask`` (B, M) as MONAI's loss over the selected rows."""
    # where, not a product: a non-finite value at an anchor left out must not reach the loss (0 * inf is NaN)
    total = torch.where(mask[..., None], values.to(torch.float32), 0.0).sum()
    if reduction == "sum":
        return total
    return total / (mask.sum() * values.shape[-1]).clamp(min=1)


@dataclass
class SyncFreeLosses:
    """The two losses and what they were computed from, all device tensors of fixed shapes."""

    cls_loss: Tensor
    box_loss: Tensor
    matched_idxs: Tensor  # (B, M) matched box index, -1: background
    positives: Tensor  # (B, M) bool: the sampled positives of the classification loss
    negatives: Tensor  # (B, M) bool: the sampled negatives
    box_targets: Tensor  # (B, M, 2D) encoded matched boxes (meaningful where matched_idxs >= 0)
    finite: Tensor  # () bool: every classification logit and box regression is finite


class SyncFreeRetinaNetLoss:
    """
    MONAI's ``RetinaNetDetector.compute_loss`` with an ATSS matcher and a ``HardNegativeSampler``, without host
    syncs. Build it with `from_detector` (it reads the detector's settings at that moment) or from the settings.

    Normalisation as MONAI's: the classification loss is the mean over the sampled anchors' classes in the batch,
    the box loss the mean over all matched anchors' coordinates in the batch. Both are NaN when any logit or box
    regression is non-finite (``propagate_nonfinite``): MONAI's heads raise there instead, and without their check a
    NaN at an anchor left out of the sample would otherwise not show.
    """

    def __init__(
        self,
        *,
        num_anchors_per_loc: int,
        cls_loss: nn.Module,
        box_loss: nn.Module,
        box_coder_weights: Sequence[float],
        num_candidates: int = 4,
        center_in_gt: bool = False,
        batch_size_per_image: int = 64,
        positive_fraction: float = 0.3,
        min_neg: int = 1,
        pool_size: float = 10,
        min_boxes: int = 1,
        batched_matching: bool = False,
        propagate_nonfinite: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.num_anchors_per_loc = num_anchors_per_loc
        self.cls_loss, self.cls_reduction = _elementwise(cls_loss)
        self.box_loss, self.box_reduction = _elementwise(box_loss)
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)
        self.num_candidates = num_candidates
        self.center_in_gt = center_in_gt
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.min_neg = min_neg
        self.pool_size = pool_size
        self.min_boxes = min_boxes  # pad every batch to at least this many boxes (a fixed shape for graph capture)
        self.batched_matching = batched_matching  # see atss_match's num_boxes
        self.propagate_nonfinite = propagate_nonfinite
        self.generator = generator

    @classmethod
    def from_detector(cls, detector: nn.Module, **kwargs) -> SyncFreeRetinaNetLoss:
        """The loss of a MONAI ``RetinaNetDetector`` with ``set_atss_matcher`` and ``set_hard_negative_sampler``."""
        matcher, sampler = getattr(detector, "proposal_matcher", None), detector.fg_bg_sampler
        if not isinstance(matcher, ATSSMatcher) or matcher.similarity_fn is not box_iou:
            raise NotImplementedError(
                f"sync-free losses need MONAI's ATSS matcher with box_iou, got {matcher!r}{OTHER_PATH}"
            )
        if not isinstance(sampler, HardNegativeSampler):
            raise NotImplementedError(f"sync-free losses need MONAI's HardNegativeSampler, got {sampler!r}{OTHER_PATH}")
        if not detector.encode_gt or detector.decode_pred:
            raise NotImplementedError(f"sync-free losses need encode_gt=True and decode_pred=False{OTHER_PATH}")
        return cls(
            num_anchors_per_loc=detector.num_anchors_per_loc,
            cls_loss=detector.cls_loss_func,
            box_loss=detector.box_loss_func,
            box_coder_weights=detector.box_coder.weights,
            num_candidates=matcher.num_candidates,
            center_in_gt=matcher.center_in_gt,
            batch_size_per_image=sampler.batch_size_per_image,
            positive_fraction=sampler.positive_fraction,
            min_neg=sampler.min_neg,
            pool_size=sampler.pool_size,
            **kwargs,
        )

    def __call__(
        self,
        cls_logits: Tensor,
        box_regression: Tensor,
        boxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        anchors: Sequence[Tensor] | Tensor,
        num_anchor_locs_per_level: Sequence[int],
    ) -> SyncFreeLosses:
        """
        Args:
            cls_logits: (B, M, C) classification logits (MONAI's reshaped head output).
            box_regression: (B, M, 2D) box regression.
            boxes: per image, (N_i, 2D) ``xyzxyz`` boxes in image coordinates (N_i may be 0).
            labels: per image, (N_i,) class indices.
            anchors: per image (M, 2D) anchors, or a (B, M, 2D) tensor.
            num_anchor_locs_per_level: locations per pyramid level.
        """
        device = cls_logits.device
        anchors_t = anchors if isinstance(anchors, Tensor) else torch.stack(list(anchors))
        anchors_t = anchors_t.to(device)
        gt, gt_labels, valid = pad_targets(boxes, labels, device, self.min_boxes, anchors_t.shape[-1])
        matched = atss_match(
            gt,
            valid,
            anchors_t,
            num_anchor_locs_per_level,
            self.num_anchors_per_loc,
            self.num_candidates,
            self.center_in_gt,
            num_boxes=None if self.batched_matching else [int(b.shape[0]) for b in boxes],
        )
        foreground = matched >= 0
        box_of_anchor = matched.clamp(min=0)

        # classification: one-hot of the matched box's class at the foreground anchors (MONAI's gt_classes_target)
        classes = gt_labels.gather(1, box_of_anchor)
        target = torch.zeros_like(cls_logits).scatter_(
            2, classes[..., None], foreground[..., None].to(cls_logits.dtype)
        )
        positives, negatives = sample_anchors(
            matched,
            cls_logits.detach().to(torch.float32).max(dim=-1).values,
            self.batch_size_per_image,
            self.positive_fraction,
            self.min_neg,
            self.pool_size,
            self.generator,
        )
        cls_values = self.cls_loss(cls_logits, target)
        cls_loss = _masked_reduce(cls_values, positives | negatives, self.cls_reduction).to(cls_logits.dtype)

        # box regression: every matched anchor (not only the sampled ones), as MONAI's compute_box_loss
        matched_boxes = gt.gather(1, box_of_anchor[..., None].expand(-1, -1, gt.shape[-1]))
        box_targets = encode_boxes(matched_boxes, anchors_t.to(matched_boxes.dtype), self.box_coder_weights)
        # the unmatched anchors' targets are never used; keep them finite so that no NaN can leak through autograd
        safe_targets = torch.where(foreground[..., None], box_targets, 0.0)
        if any(b.shape[0] for b in boxes):
            box_values = self.box_loss(box_regression, safe_targets)
            box_loss = _masked_reduce(box_values, foreground, self.box_reduction).to(box_regression.dtype)
        else:
            box_loss = box_regression.new_zeros(())  # out of the graph: no backward through the regression head

        finite = torch.isfinite(cls_logits.detach()).all() & torch.isfinite(box_regression.detach()).all()
        if self.propagate_nonfinite:
            cls_loss = torch.where(finite, cls_loss, math.nan)
            box_loss = torch.where(finite, box_loss, math.nan)
        return SyncFreeLosses(cls_loss, box_loss, matched, positives, negatives, box_targets, finite)
