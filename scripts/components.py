"""Two factories that train.json calls as ``_target_`` components where an expression used Python a component has
no form for: the ``**`` of a mapping ID (``phantoms``), and a key present only when its value is not None."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from scripts.data.phantoms import ensure_dataset

__all__ = ["checkpoint_objects", "ensure_phantom_dataset"]


def ensure_phantom_dataset(
    data_list_file_path: str, dataset_dir: str, phantoms: Mapping[str, Any], default_dir: str | None = None
) -> str:
    """`scripts.data.phantoms.ensure_dataset` with the phantoms' settings as one mapping (train.json's ``phantoms``),
    passed on as keywords: a config that replaces ``phantoms`` with fewer keys leaves the others at their defaults."""
    return ensure_dataset(data_list_file_path, dataset_dir, default_dir=default_dir, **phantoms)


def checkpoint_objects(scaler: torch.amp.GradScaler | None = None, **objects: Any) -> dict[str, Any]:
    """The objects a training checkpoint saves and resumes, by name in the order given, with ``scaler`` last and only
    when there is one (no AMP gradient scaler: no ``scaler`` entry, as ignite's `Checkpoint` takes no None)."""
    return {**objects, **({"scaler": scaler} if scaler is not None else {})}
