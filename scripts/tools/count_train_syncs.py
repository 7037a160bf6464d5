"""
Count the host-sync ops of one training forward and backward of the bundle's detector, MONAI's path against the
sync-free one: ``python -m scripts.tools.count_train_syncs [--tiny] [--size 64 64 32] [--batch 2]``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from monai.bundle import ConfigParser
from scripts.tools.sync_count import SyncCounter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_detector(tiny: bool) -> torch.nn.Module:
    """train.json's detector on the CPU (tests/data/tiny.json's network with ``tiny``)."""
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "configs", "train.json"))
    overrides: dict = {"device": "$torch.device('cpu')"}
    if tiny:
        with open(os.path.join(REPO, "tests", "data", "tiny.json")) as f:
            small = json.load(f)
        overrides.update(backbone=small["backbone"], feature_extractor=small["feature_extractor"])
    parser.update(overrides)
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    return detector


def count(detector: torch.nn.Module, size: tuple[int, ...], batch: int, amp: bool = False) -> dict[str, dict[str, int]]:
    """Sync-op counts of one step (after a warm-up step that builds the anchors) of each path, optionally under the
    trainer's CPU autocast (bfloat16)."""
    torch.manual_seed(0)
    images = [torch.rand(1, *size) for _ in range(batch)]
    targets = [
        {"box": torch.tensor([[10.0 + 3 * i, 12.0, 6.0, 20.0 + 3 * i, 21.0, 11.0]]), "label": torch.tensor([0])}
        for i in range(batch)
    ]
    detector.train()
    result = {}
    for name, sync_free in (("monai", False), ("sync_free", True)):
        detector.set_sync_free(sync_free)
        detector(images, [dict(t) for t in targets])  # warm-up: anchors
        detector.network.zero_grad(set_to_none=True)
        with SyncCounter() as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                losses = detector(images, [dict(t) for t in targets])
            (losses[detector.cls_key] + losses[detector.box_reg_key]).backward()
        result[name] = {"total": counter.total, **dict(counter.counts)}
    return result


def main() -> None:
    """Print the counts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tests/data/tiny.json's network instead of ResNet50-FPN")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="under CPU autocast (bfloat16), as the trainer with amp")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(json.dumps(count(build_detector(args.tiny), tuple(args.size), args.batch, args.amp), indent=1))


if __name__ == "__main__":
    main()
