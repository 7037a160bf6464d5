"""The training dataset: the deterministic part of the pipeline computed once and kept on disk, or in RAM.

`detection_dataset` picks one of MONAI's datasets by config (``cache_dir``, ``cache_rate``):

- ``cache_dir`` set: `SharedPersistentDataset`, MONAI's `PersistentDataset` (everything before the first random
  transform is computed on first use and stored as one file per item; RAM does not grow with the data);
- otherwise `CacheDataset` with ``cache_rate`` (the fraction of items kept in RAM; 0 is a plain `Dataset`).

`PersistentDataset` itself is not safe for a cache folder that loader workers, DDP ranks and successive runs
share: it writes each file in the system's temporary folder and moves it, which across file systems is a copy
that another process can read half-written (and then fails); its key is the datalist item only, so a volume
regenerated at the same path is served stale; and with ``track_meta`` its files hold objects that
``torch.load(weights_only=True)`` refuses, so every read silently recomputes. `SharedPersistentDataset` writes in
the cache folder and renames atomically, keys each file by the item, the image file's size and modification time
and the deterministic transforms, and expects items that `scripts.data.crop.CompactVolumed` made loadable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.utils import convert_to_tensor
from scripts.json_io import write_atomically

__all__ = ["SharedPersistentDataset", "detection_dataset", "file_state_hash"]

logger = logging.getLogger(__name__)


def file_state_hash(item: Any) -> bytes:
    """`pickle_hashing` of a datalist item together with the size and modification time of the files it names."""
    files = {}
    if isinstance(item, dict):
        for key, value in item.items():
            if isinstance(value, str) and os.path.isfile(value):
                stat = os.stat(value)
                files[key] = (stat.st_size, stat.st_mtime_ns)
    return pickle_hashing({"item": item, "files": files})


class SharedPersistentDataset(PersistentDataset):
    """
    A `PersistentDataset` whose cache folder can be shared by loader workers, DDP ranks and runs.

    Each file is written under a temporary name in the cache folder and renamed into place (atomic on one file
    system), so a reader sees a whole file or none; two processes that build the same item at once both write it
    and the second rename wins with the same content. A file that cannot be read is rebuilt.

    Args:
        data: datalist items (dicts with absolute ``image`` paths).
        transform: the whole pipeline; the part before the first random transform is cached.
        cache_dir: the cache folder (created if missing).
        hash_func: key of an item; by default it includes the image file's size and modification time.
    """

    def __init__(
        self,
        data: Sequence,
        transform: Callable,
        cache_dir: str | Path,
        hash_func: Callable[..., bytes] = file_state_hash,
    ) -> None:
        super().__init__(
            data, transform, cache_dir, hash_func=hash_func, hash_transform=pickle_hashing, track_meta=True
        )

    def cache_path(self, item: Any) -> Path:
        """The cache file of a datalist item."""
        return Path(self.cache_dir) / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed: Any) -> Any:
        path = self.cache_path(item_transformed)
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except (UnpicklingError, RuntimeError, EOFError, OSError) as e:
                logger.warning(f"cache file {path} is unreadable ({e}); rebuilding it")
        item = self._pre_transform(deepcopy(item_transformed))  # the datalist item stays as it was hashed
        stored = convert_to_tensor(item, convert_numeric=False, track_meta=True)
        try:
            write_atomically(str(path), lambda temporary: torch.save(stored, temporary))
        except OSError as e:  # e.g. a full disk: train on, uncached
            logger.warning(f"could not write cache file {path} ({e})")
        return item


def detection_dataset(
    data: Sequence,
    transform: Callable,
    cache_dir: str | Path | None = None,
    cache_rate: float = 0.0,
    num_workers: int | None = 1,
) -> Dataset:
    """
    The dataset of a training pipeline, chosen by config.

    Args:
        data: datalist items.
        transform: the whole pipeline (deterministic part first).
        cache_dir: folder of the persistent cache; empty or ``None``: no persistent cache.
        cache_rate: without ``cache_dir``, the fraction of items whose deterministic part is kept in RAM.
        num_workers: threads that fill the RAM cache.
    """
    if cache_dir:
        return SharedPersistentDataset(data, transform, cache_dir)
    if cache_rate > 0:
        # no copy of the cached item per draw: the first random transform (the crop) copies what it takes
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, copy_cache=False)
    return Dataset(data, transform)
