"""The shared record of bad image files, and a sampler that keeps them out of training.

Data QA (before training) and the NaN guard (during training) both write to one `Quarantine`; the training
sampler reads it at the start of every pass over the data. Torch and MONAI have no sampler that can drop
items while a run is going, hence `QuarantineSampler`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from scripts.distributed import is_distributed
from scripts.errors import UserError
from scripts.json_io import write_json
from torch.utils.data.distributed import DistributedSampler

__all__ = ["NoTrainingImages", "Quarantine", "QuarantineSampler", "image_path"]

logger = logging.getLogger(__name__)


def image_path(item: Any) -> str:
    """
    The image file of a datalist item, a loaded sample (``image.meta``) or a plain path, as an absolute path: the
    one way the bundle names a file (``""`` for an image that came from no file).
    """
    if isinstance(item, dict):
        item = item["image"]
    meta = getattr(item, "meta", None)
    if meta is not None:
        item = meta.get("filename_or_obj", "")
    elif not isinstance(item, (str, os.PathLike)):
        return ""
    return os.path.abspath(str(item)) if str(item) else ""


class NoTrainingImages(UserError):
    """Every training image is quarantined: nothing is left to train on."""


class Quarantine:
    """
    Image files excluded from training, with the reason for each, kept in memory and mirrored to a JSON file.

    Args:
        path: JSON file the list is written to after every change (``None``: keep it in memory only, as on DDP
            ranks other than 0).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}

    def __contains__(self, item: Any) -> bool:
        return image_path(item) in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, item: Any, reason: str, source: str, **details: Any) -> bool:
        """Quarantine one file; returns ``False`` if it already was. ``source`` is who found it (data_check, guard)."""
        path = image_path(item)
        if path in self.entries:
            return False
        self.entries[path] = {"reason": reason, "source": source, **details}
        logger.warning(f"quarantined {path} ({source}): {reason}")
        self.save()
        return True

    def save(self) -> None:
        """Write the list to ``path`` atomically (if there is one)."""
        if not self.path:
            return
        write_json(self.path, {"quarantined": [{"image": k, **v} for k, v in self.entries.items()]})

    def state_dict(self) -> dict[str, Any]:
        return {"entries": dict(self.entries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = dict(state["entries"])
        self.save()


class QuarantineSampler(DistributedSampler):
    """
    A `DistributedSampler` (one replica by default) that leaves out quarantined items, re-read at every pass.

    Being a `DistributedSampler`, MONAI's workflows call `set_epoch` on it at every epoch, so the shuffling
    is reproducible and different per epoch, and the same class serves single-process and DDP training.

    Args:
        dataset: a dataset with a ``data`` list of datalist items (MONAI `Dataset`).
        quarantine: the shared record of bad files.
        num_replicas: number of processes (``None``: the DDP world size, 1 when not distributed).
        rank: this process's rank (``None``: the DDP rank, 0 when not distributed).
        shuffle: shuffle with ``seed + epoch``.
        seed: base seed of the shuffling.
    """

    def __init__(
        self,
        dataset: Any,
        quarantine: Quarantine,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        distributed = is_distributed()
        num_replicas = (
            num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if distributed else 1)
        )
        rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.quarantine = quarantine

    def _kept(self) -> list[int]:
        kept = [i for i, item in enumerate(self.dataset.data) if item not in self.quarantine]
        if not kept:
            where = self.quarantine.path or "the guard report"
            raise NoTrainingImages(
                f"every training image is quarantined ({len(self.dataset.data)} of them; why, for each: {where}): "
                "fix or replace the files, then train again"
            )
        return kept

    def __iter__(self) -> Iterator[int]:
        kept = self._kept()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            kept = [kept[i] for i in torch.randperm(len(kept), generator=g).tolist()]
        total = math.ceil(len(kept) / self.num_replicas) * self.num_replicas
        kept = (kept * self.num_replicas)[:total]  # pad by repetition so every rank gets as many items
        return iter(kept[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(len(self._kept()) / self.num_replicas)
