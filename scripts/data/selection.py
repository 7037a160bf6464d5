"""The model-selection set: the images training validates on, chooses ``models/model.pt`` by, and lets the guard judge
learning on. Never the datalist's ``validation`` list: in the model zoo's LUNA16 fold files that is the held-out test
subset, and selecting a model on it would make every figure reported on it optimistic.

The rule: the datalist's ``selection`` list when it has one (``prepare_luna16``'s fold files and the phantom datalists
name theirs); otherwise the last ``selection_fraction`` of the ``training`` list that the data check kept (the zoo's
rule: it trains on the first 95% of ``training`` and selects on the rest), at least one image, taken out of training.
A datalist with a single training image trains and selects on it, with a warning. Training never reads, checks or
loads the ``validation`` list: a fold file whose test images are absent still trains.
"""

from __future__ import annotations

import logging
from typing import Any

from scripts.data.datalist import load_datalist
from scripts.data.screening import screen_datalists
from scripts.errors import UserError

__all__ = ["SELECTION_FRACTION", "NoSelectionImages", "selection_count", "training_datalists"]

SELECTION_FRACTION = 0.05  # the zoo's: it trains on the first 95% of training and selects on the rest

logger = logging.getLogger(__name__)


class NoSelectionImages(UserError):
    """The datalist's ``selection`` list has no usable image left."""


def selection_count(num_training: int, fraction: float) -> int:
    """How many of ``num_training`` images the zoo's rule keeps for selection: those past the first
    ``int((1 - fraction) * num_training)`` (``fraction`` of them rounded up), and at least one (none taken from a
    single image). ``prepare_luna16`` sizes its folds' selection lists by it too."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"selection_fraction must be in (0, 1), got {fraction}")
    if num_training < 2:
        return 0
    return max(1, num_training - int((1.0 - fraction) * num_training))


def training_datalists(
    policy: str,
    data_list_file_path: str,
    dataset_dir: str,
    selection_fraction: float = SELECTION_FRACTION,
    **screening: Any,
) -> dict[str, list[dict]]:
    """
    ``{"training": [...], "selection": [...]}`` for training, screened by the ``data_check`` policy (see
    `scripts.data.screening.screen_datalists`, whose arguments ``screening`` passes on); ``validation`` is never read.

    Args:
        policy: ``data_check``: ``"strict"``, ``"exclude"`` or ``"off"``.
        data_list_file_path: the datalist JSON.
        dataset_dir: the folder relative image paths are relative to.
        selection_fraction: the share of ``training`` that selects the model when the datalist names no
            ``selection`` list.
        screening: ``loader``, ``patch_size``, ``output_dir``, ``quarantine``, ``num_classes`` of `screen_datalists`.
    """
    datalist = load_datalist(data_list_file_path)
    named = isinstance(datalist, dict) and "selection" in datalist
    sections = ("training", "selection") if named else ("training",)
    lists = screen_datalists(policy, data_list_file_path, dataset_dir, sections=sections, **screening)
    training = lists["training"]
    if named:
        if not lists["selection"]:
            raise NoSelectionImages(
                f'datalist {data_list_file_path}: its "selection" list has no usable image (empty, or every image '
                "excluded by the data check): add images to it, or remove the key to select on the end of training"
            )
        return {"training": training, "selection": lists["selection"]}
    count = selection_count(len(training), selection_fraction)
    if count == 0:
        logger.warning(
            f'datalist {data_list_file_path}: one training image and no "selection" list: it trains and selects the '
            "model on the same image"
        )
        return {"training": training, "selection": list(training)}
    logger.info(
        f"model selection on the last {count} of {len(training)} training images (selection_fraction "
        f'{selection_fraction}; the datalist names no "selection" list)'
    )
    return {"training": training[:-count], "selection": training[-count:]}
