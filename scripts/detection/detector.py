"""MONAI's RetinaNet detector whose training losses also say whether it is learning.

A network stalled by a learning rate that is too high keeps a finite, unremarkable loss; what gives it away is
that the classifier never raises its scores on the anchors matched to a nodule above the prior it started from.
MONAI's `RetinaNetDetector` computes the anchor matching inside `compute_loss` and keeps it there, so this
subclass returns, beside the two losses, the sums and counts of the scores at positive and at negative anchors (a
device tensor: reading it is left to the trainer's one host read). A detector that learns separates the two; a
stalled one scores both alike. The network, its state-dict keys and inference are MONAI's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector as MonaiRetinaNetDetector

__all__ = ["ANCHOR_SCORES", "ANCHOR_SCORE_NAMES", "RetinaNetDetector", "anchor_scores"]

# the key of the training losses dict under which the detector returns the anchor scores (see `anchor_scores`)
ANCHOR_SCORES = "anchor_scores"
ANCHOR_SCORE_NAMES = ("positive_sum", "positive_count", "negative_sum", "negative_count")


def anchor_scores(
    cls_logits: torch.Tensor, matched_idxs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """
    Sums and counts, as device scalars: ``positive_sum`` and ``positive_count`` of the sigmoid score of the matched
    class at the anchors matched to a box, ``negative_sum`` and ``negative_count`` of the highest class score at the
    anchors matched to none (the background).

    Args:
        cls_logits: classification logits, (B, anchors, classes).
        matched_idxs: per image, the index of the box each anchor is matched to (-1: background, -2: ignored).
        labels: per image, the class of each box.
    """
    totals = dict.fromkeys(ANCHOR_SCORE_NAMES, cls_logits.new_zeros((), dtype=torch.float32))
    for logits, matched, label in zip(cls_logits, matched_idxs, labels, strict=True):
        logits = logits.detach().float()
        positive, negative = (matched >= 0).float(), (matched == -1).float()
        # masked sums rather than boolean indexing, which would be a host sync on a GPU; a crop without boxes
        # has no positive anchor, so the class it gathers there does not count
        classes = label.long()[matched.clamp(min=0)] if label.numel() else torch.zeros_like(matched).long()
        scores = torch.sigmoid(logits.gather(1, classes[:, None])).squeeze(1)
        background = torch.sigmoid(logits.max(dim=1).values)
        totals["positive_sum"] = totals["positive_sum"] + (scores * positive).sum()
        totals["positive_count"] = totals["positive_count"] + positive.sum()
        totals["negative_sum"] = totals["negative_sum"] + (background * negative).sum()
        totals["negative_count"] = totals["negative_count"] + negative.sum()
    return totals


class RetinaNetDetector(MonaiRetinaNetDetector):
    """
    `monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` (same arguments) whose training
    losses dict also holds `ANCHOR_SCORES`: the sums and counts of the classifier's scores at positive and
    negative anchors.
    """

    def compute_loss(
        self,
        head_outputs_reshape: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        anchors: list[torch.Tensor],
        num_anchor_locs_per_level: Sequence[int],
    ) -> dict[str, torch.Tensor]:
        """MONAI's losses (``cls_key``, ``box_reg_key``) and `ANCHOR_SCORES` from the same anchor matching."""
        matched_idxs = self.compute_anchor_matched_idxs(anchors, targets, num_anchor_locs_per_level)
        cls_logits = head_outputs_reshape[self.cls_key]
        box_regression = head_outputs_reshape[self.box_reg_key]
        labels = [t[self.target_label_key] for t in targets]
        return {
            self.cls_key: self.compute_cls_loss(cls_logits, targets, matched_idxs),
            self.box_reg_key: self.compute_box_loss(box_regression, targets, anchors, matched_idxs),
            ANCHOR_SCORES: anchor_scores(cls_logits, matched_idxs, labels),
        }
