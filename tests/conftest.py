"""Shared fixtures: a tiny RetinaNet detector and tiny in-memory detection samples, fast enough for CI."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.data import Dataset, MetaTensor
from monai.data.utils import no_collation
from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
from monai.networks.blocks.feature_pyramid_network import LastLevelMaxPool
from monai.networks.nets.resnet import ResNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from scripts.quarantine import Quarantine, QuarantineSampler  # noqa: E402

torch.set_num_threads(2)


def tiny_detector(norm: str | tuple = "batch", roi_size=(32, 32, 16)) -> RetinaNetDetector:
    """The bundle's detector with a one-block-per-stage ResNet and an 8-channel FPN."""
    backbone = ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[8, 16, 32, 64],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_stride=[2, 2, 1],
        conv1_t_size=[7, 7, 7],
        norm=norm,
    )
    extractor = BackboneWithFPN(
        backbone, {"layer1": "0", "layer2": "1"}, [8, 16], 8, spatial_dims=3, extra_blocks=LastLevelMaxPool(3)
    )
    network = RetinaNet(3, 1, 3, extractor, size_divisible=[16, 16, 8])
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[1, 2, 4], base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]]
    )
    detector = RetinaNetDetector(network, anchors)
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    detector.set_target_keys(box_key="box", label_key="label")
    detector.set_box_selector_parameters(
        score_thresh=0.02, topk_candidates_per_level=100, nms_thresh=0.22, detections_per_img=10
    )
    detector.set_sliding_window_inferer(
        roi_size=list(roi_size), overlap=0.25, sw_batch_size=1, mode="constant", device="cpu"
    )
    return detector


def tiny_sample(index: int, shape=(32, 32, 16), seed: int = 0) -> dict:
    """A [0, 1] volume with one bright box; its image carries a file name like a loaded NIfTI."""
    g = torch.Generator().manual_seed(seed * 1000 + index)
    image = 0.1 * torch.rand((1, *shape), generator=g)
    x, y = (int(v) for v in torch.randint(4, shape[0] - 14, (2,), generator=g))
    z = int(torch.randint(2, shape[2] - 8, (1,), generator=g))
    image[:, x : x + 8, y : y + 8, z : z + 5] += 0.8
    meta = {"filename_or_obj": f"/data/case_{index:02d}.nii.gz"}
    return {
        "image": MetaTensor(image, meta=meta),
        "box": torch.tensor([[x, y, z, x + 8, y + 8, z + 5]], dtype=torch.float32),
        "label": torch.tensor([0]),
    }


def tiny_loader(num: int = 4, quarantine: Quarantine | None = None, seed: int = 0, shuffle: bool = False):
    """A loader over ``num`` tiny samples, one image per batch, through the bundle's quarantine sampler."""
    dataset = Dataset([tiny_sample(i, seed=seed) for i in range(num)])
    sampler = QuarantineSampler(dataset, quarantine if quarantine is not None else Quarantine(), shuffle=shuffle)
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=no_collation)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
