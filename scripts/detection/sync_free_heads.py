"""
RetinaNet heads without the per-level ``isnan().any() or isinf().any()`` check of MONAI's heads in training.

MONAI's ``RetinaNetClassificationHead.forward`` and ``RetinaNetRegressionHead.forward`` read two booleans per
pyramid level from the device (host syncs on a GPU) to raise on a non-finite output. `make_heads_sync_free` swaps the
class of a network's head instances to the subclasses here, whose training forward is the same computation without
the check; the modules, their parameters and so the state-dict keys are unchanged. The finiteness of the outputs is
then carried by the losses (`SyncFreeRetinaNetLoss` makes both NaN), read by the trainer with everything else.
"""

from __future__ import annotations

from monai.apps.detection.networks.retinanet_network import RetinaNetClassificationHead, RetinaNetRegressionHead
from torch import Tensor, nn

__all__ = ["SyncFreeClassificationHead", "SyncFreeRegressionHead", "make_heads_sync_free"]


def _feature_list(x: list[Tensor] | Tensor) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


class SyncFreeClassificationHead(RetinaNetClassificationHead):
    """MONAI's classification head whose training forward skips the NaN/Inf check; evaluation keeps MONAI's."""

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        if not self.training:
            return super().forward(x)  # inference: MONAI's warning on a non-finite map, syncs do not matter there
        return [self.cls_logits(self.conv(features)) for features in _feature_list(x)]


class SyncFreeRegressionHead(RetinaNetRegressionHead):
    """MONAI's regression head whose training forward skips the NaN/Inf check; evaluation keeps MONAI's."""

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        if not self.training:
            return super().forward(x)
        return [self.bbox_reg(self.conv(features)) for features in _feature_list(x)]


_SYNC_FREE = {RetinaNetClassificationHead: SyncFreeClassificationHead, RetinaNetRegressionHead: SyncFreeRegressionHead}
_MONAI = {v: k for k, v in _SYNC_FREE.items()}


def make_heads_sync_free(network: nn.Module, enabled: bool = True) -> int:
    """
    Swap (``enabled``) or swap back the class of ``network``'s MONAI RetinaNet head modules (exact classes only;
    a subclass of MONAI's head with its own forward is left alone). Returns the number of heads swapped.
    """
    table = _SYNC_FREE if enabled else _MONAI
    swapped = 0
    for module in network.modules():
        target = table.get(type(module))
        if target is not None:
            module.__class__ = target  # same attributes and submodules: parameters and state-dict keys unchanged
            swapped += 1
    return swapped
