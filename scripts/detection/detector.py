"""MONAI's RetinaNet detector whose training losses also say whether it is learning.

A network stalled by a learning rate that is too high keeps a finite, unremarkable loss; what gives it away is
that the classifier never raises its scores on the anchors matched to a nodule above the prior it started from.
MONAI's `RetinaNetDetector` computes the anchor matching inside `compute_loss` and keeps it there, so this
subclass returns, beside the two losses, the sums and counts of the scores at positive and at negative anchors (a
device tensor: reading it is left to the trainer's one host read). A detector that learns separates the two; a
stalled one scores both alike. The network, its state-dict keys and inference are MONAI's.

With ``sync_free=True`` the training forward makes no host sync (on a GPU): the heads skip their NaN check, the
anchor matching, sampling and losses are `scripts.detection.sync_free_losses` (same matches, sample counts and
losses as MONAI's, see there), and a non-finite head output makes both losses NaN instead of raising ``ValueError``.

``compile_network`` (or `set_compiled`) runs the network of that sync-free training forward through
`torch.compile` (its kernels fused: on a GPU the heads' GroupNorm, which autocast keeps in fp32, with the casts and
ReLUs around it); the compiled forward shares the network's parameters and is kept out of the module tree, so the
state-dict keys stay MONAI's, and validation and inference run the network as it is.

``set_sliding_window_inferer(..., device="auto")`` stitches the windows' outputs on the device the windows run on
(a GPU: the outputs, anchors, box decoding and NMS stay there) and falls back to the host for a volume whose stitched
outputs do not fit in the device's memory. The model zoo stitches every volume on the host (``device="cpu"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector as MonaiRetinaNetDetector
from monai.apps.detection.utils.detector_utils import check_training_targets, pad_images
from monai.apps.detection.utils.predict_utils import ensure_dict_value_to_list_
from scripts.detection.sync_free_heads import make_heads_sync_free
from scripts.detection.sync_free_losses import SyncFreeRetinaNetLoss

__all__ = ["ANCHOR_SCORES", "ANCHOR_SCORE_NAMES", "HEADS_FINITE", "STITCH_AUTO", "RetinaNetDetector", "anchor_scores"]

logger = logging.getLogger(__name__)

# the key of the training losses dict under which the detector returns the anchor scores (see `anchor_scores`)
ANCHOR_SCORES = "anchor_scores"
ANCHOR_SCORE_NAMES = ("positive_sum", "positive_count", "negative_sum", "negative_count")
# the key of the sync-free training losses under which the detector returns whether every head output was finite
# (a device bool: MONAI's heads raise instead, which reads the device per pyramid level)
HEADS_FINITE = "heads_finite"
# the sliding-window ``device`` that stitches on the windows' device when it has the memory, else on the host
STITCH_AUTO = "auto"


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


def _pad_image_list(images: list[torch.Tensor], spatial_dims: int, size_divisible: Sequence[int]) -> torch.Tensor:
    """MONAI's ``pad_images`` of a list (zeros at the end up to a divisible size) from Python ints only."""
    sizes = [tuple(int(s) for s in img.shape[-spatial_dims:]) for img in images]
    # MONAI goes through a CPU tensor of the sizes and int(tensor) reads: the same numbers without them
    target = [-(-max(dim) // k) * k if k > 0 else max(dim) for dim, k in zip(zip(*sizes), size_divisible)]
    first = images[0]
    padded = torch.zeros((len(images), first.shape[0], *target), dtype=first.dtype, device=first.device)
    for i, (img, size) in enumerate(zip(images, sizes, strict=True)):
        plain = img.as_tensor() if hasattr(img, "as_tensor") else img  # a MetaTensor's data, without its metadata
        padded[(i, slice(None), *(slice(0, s) for s in size))] = plain
    return padded


class RetinaNetDetector(MonaiRetinaNetDetector):
    """
    `monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` (same arguments, and ``sync_free``)
    whose training losses dict also holds `ANCHOR_SCORES`: the sums and counts of the classifier's scores at
    positive and negative anchors. ``sync_free=True`` (or `set_sync_free`) runs training without host syncs;
    ``compile_network`` (`set_compiled`) compiles the network of that forward. `set_sliding_window_inferer` also
    takes ``device="auto"`` (`STITCH_AUTO`).
    """

    def __init__(
        self, *args: Any, sync_free: bool = False, compile_network: bool | dict[str, Any] = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sync_free = False
        self.stitch_auto = False
        self.compile_options: dict[str, Any] | None = None
        self._compiled: tuple[int, Callable] | None = None  # (id of the network, its compiled forward)
        self.set_sync_free(sync_free)
        self.set_compiled(compile_network)

    def set_compiled(self, options: bool | dict[str, Any] = True) -> None:
        """
        Run the network of the sync-free training forward compiled: ``True`` or `torch.compile`'s keyword arguments
        (``{"mode": "max-autotune"}``, ``{"backend": "aot_eager"}``); ``False``: as it is. The first step compiles
        (a minute or more for ResNet50-FPN), as does the first one at a new batch shape.
        """
        if options and not self.sync_free:
            raise ValueError(
                "compile_network needs sync_free: MONAI's training path (sync_free false) runs the network as it is, "
                "and its host syncs would break the compiled graphs anyway"
            )
        self.compile_options = (options if isinstance(options, dict) else {}) if options else None
        self._compiled = None

    def _training_network(self) -> Callable:
        """The network, or its forward compiled (on first use, and again for another network: a deep copy's)."""
        if self.compile_options is None:
            return self.network
        if self._compiled is None or self._compiled[0] != id(self.network):
            # the bound forward, not the module: an `OptimizedModule` attribute would join the module tree (and its
            # ``_orig_mod.`` keys the state dict)
            self._compiled = (id(self.network), torch.compile(self.network.forward, **self.compile_options))
        return self._compiled[1]

    def set_sliding_window_inferer(self, *args: Any, **kwargs: Any) -> None:
        """
        MONAI's, where ``device`` (the device the windows' outputs are stitched on) may also be `STITCH_AUTO`: the
        device the windows run on, or the host for a volume that runs out of device memory there.
        """
        self.stitch_auto = kwargs.get("device") == STITCH_AUTO
        if self.stitch_auto:
            kwargs["device"] = None  # MONAI's inferer then stitches where the windows run
        super().set_sliding_window_inferer(*args, **kwargs)

    def set_sync_free(self, enabled: bool = True) -> None:
        """Use (or stop using, which also stops compiling) the sync-free heads, matching, sampling and losses."""
        make_heads_sync_free(self.network, enabled)
        self.sync_free = enabled
        if not enabled:
            self.set_compiled(False)  # compiling is for the sync-free path only

    def forward(
        self,
        input_images: list[torch.Tensor] | torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
        use_inferer: bool = False,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """
        MONAI's forward; in training with ``sync_free`` the same steps without reading any tensor value; in
        inference with the `STITCH_AUTO` sliding window, stitched on the host when the device runs out of memory.
        """
        if not self.training and use_inferer and self.stitch_auto:
            return self._infer_stitching_where_it_fits(input_images)
        if not (self.training and self.sync_free):
            return super().forward(input_images, targets, use_inferer)
        # shape, key and dtype checks only: these read no tensor value
        targets = check_training_targets(
            input_images, targets, self.spatial_dims, self.target_label_key, self.target_box_key
        )
        self._check_detector_training_components()
        if isinstance(input_images, torch.Tensor):
            images, _ = pad_images(input_images, self.spatial_dims, self.size_divisible)  # shapes only
        else:
            images = _pad_image_list(list(input_images), self.spatial_dims, self.size_divisible)
        head_outputs = self._training_network()(images)
        if isinstance(head_outputs, (tuple, list)):
            half = len(head_outputs) // 2
            head_outputs = {self.cls_key: list(head_outputs[:half]), self.box_reg_key: list(head_outputs[half:])}
        else:
            ensure_dict_value_to_list_(head_outputs)
        self.generate_anchors(images, head_outputs)
        num_anchor_locs_per_level = [x.shape[2:].numel() for x in head_outputs[self.cls_key]]
        for key in (self.cls_key, self.box_reg_key):
            head_outputs[key] = self._reshape_maps(head_outputs[key])
        return self.compute_loss(head_outputs, targets, self.anchors, num_anchor_locs_per_level)

    def _infer_stitching_where_it_fits(
        self, input_images: list[torch.Tensor] | torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """Sliding-window inference stitched on the images' device; on the host for a volume that does not fit."""
        try:
            return super().forward(input_images, None, True)
        except torch.OutOfMemoryError:  # an accelerator's memory: the host's raises a plain RuntimeError
            pass
        first = input_images if isinstance(input_images, torch.Tensor) else input_images[0]
        shape = tuple(first.shape[-self.spatial_dims :])
        logger.warning(
            "a %s volume ran out of device memory: its sliding-window outputs are stitched on the host", shape
        )
        torch.cuda.empty_cache()  # what the failed attempt left cached, so that the windows fit again
        # MONAI caches the anchors by image shape on the device of the outputs: made again there, and after
        self.inferer.device, self.anchors = torch.device("cpu"), None
        try:
            return super().forward(input_images, None, True)
        finally:
            self.inferer.device, self.anchors = None, None

    def _reshape_maps(self, result_maps: list[torch.Tensor]) -> torch.Tensor:
        """MONAI's reshape to (B, sum(HWDA), channels); in sync-free training without its NaN check."""
        if not (self.training and self.sync_free):
            return super()._reshape_maps(result_maps)
        reshaped = []
        for result_map in result_maps:
            batch, channels = result_map.shape[0], result_map.shape[1] // self.num_anchors_per_loc
            spatial = tuple(result_map.shape[-self.spatial_dims :])
            # (B, A, C, *spatial) -> (B, *spatial, A, C) -> (B, spatial*A, C)
            per_anchor = result_map.view(batch, -1, channels, *spatial)
            order = (0, *range(3, 3 + self.spatial_dims), 1, 2)
            reshaped.append(per_anchor.permute(order).reshape(batch, -1, channels))
        return torch.cat(reshaped, dim=1)

    def compute_loss(
        self,
        head_outputs_reshape: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        anchors: list[torch.Tensor],
        num_anchor_locs_per_level: Sequence[int],
    ) -> dict[str, torch.Tensor]:
        """
        MONAI's losses (``cls_key``, ``box_reg_key``) and `ANCHOR_SCORES` from the same anchor matching; with
        ``sync_free`` computed by `SyncFreeRetinaNetLoss` (built from this detector's current settings), with
        `HEADS_FINITE` besides.
        """
        cls_logits = head_outputs_reshape[self.cls_key]
        box_regression = head_outputs_reshape[self.box_reg_key]
        labels = [t[self.target_label_key] for t in targets]
        if self.sync_free:
            boxes = [t[self.target_box_key] for t in targets]
            result = SyncFreeRetinaNetLoss.from_detector(self)(
                cls_logits, box_regression, boxes, labels, anchors, num_anchor_locs_per_level
            )
            return {
                self.cls_key: result.cls_loss,
                self.box_reg_key: result.box_loss,
                ANCHOR_SCORES: anchor_scores(cls_logits, list(result.matched_idxs), labels),
                HEADS_FINITE: result.finite,
            }
        matched_idxs = self.compute_anchor_matched_idxs(anchors, targets, num_anchor_locs_per_level)
        return {
            self.cls_key: self.compute_cls_loss(cls_logits, targets, matched_idxs),
            self.box_reg_key: self.compute_box_loss(box_regression, targets, anchors, matched_idxs),
            ANCHOR_SCORES: anchor_scores(cls_logits, matched_idxs, labels),
        }
