"""Whole-volume detection image by image: one image's failure is recorded for that image and the run goes on.

MONAI's evaluator stops at the first exception of any image; inference must instead give every good image its
result, list the others (refused by the data check, failed to load, or a non-finite prediction such as MONAI's
``pred_whd_axis is NaN or Inf``), keep what it has on disk after every image, and end with a non-zero exit when
any image failed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from scripts.data.probe import diagnose
from scripts.data.screening import ScreenedInputs
from scripts.detection.precision import precision_name
from scripts.errors import describe
from scripts.evaluation.evaluator import DetectionInferer
from scripts.inference.io import DetectionWriter, Failure, image_name
from scripts.inference.previews import PreviewSaver
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

__all__ = ["DetectionInference", "InferenceDataset", "VolumeInferer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Loaded:
    """One input after preprocessing: ``data`` (the loaded item), or ``failure`` when loading raised."""

    data: dict[str, Any] | None
    failure: Failure | None


class InferenceDataset(Dataset):
    """
    The inputs through ``transform``, each failure caught and returned as a `_Loaded` record (inference.json's
    ``dataset``).

    Args:
        data: the usable inputs (``{"image": path, ...}``), in their order.
        transform: loads one input into the detector's input.
    """

    def __init__(self, data: list[dict], transform: Callable[[dict], dict]) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> _Loaded:
        item = self.data[index]
        try:
            return _Loaded(self.transform(dict(item)), None)
        except Exception as e:  # a file that changed since the data check, or a transform failing on its voxels
            found = diagnose(e, item["image"])
            return _Loaded(None, Failure(image_name(item), "load_failed", f"{found.problem}: {found.text}"))


class VolumeInferer(DetectionInferer):
    """
    inference.json's ``inferer``: `DetectionInferer` (the same autocast) that decides per call, as the model zoo's
    ``RetinaNetInferer``, whether the detector slides its window: always with ``force_sliding_window``, otherwise only
    when an image has at least as many voxels as the window (a smaller one goes through the network whole).

    Args:
        amp, amp_dtype: as `DetectionInferer`.
        force_sliding_window: slide the window over every image (the zoo's ``force_sliding_window``).
    """

    def __init__(self, amp: bool = False, amp_dtype: str | None = None, force_sliding_window: bool = False) -> None:
        super().__init__(amp=amp, amp_dtype=amp_dtype)
        self.force_sliding_window = bool(force_sliding_window)

    def slides(self, inputs: list[torch.Tensor], detector: torch.nn.Module) -> bool:
        """Whether ``detector`` runs its sliding-window inferer on ``inputs`` (never when it has none set)."""
        window = getattr(getattr(detector, "inferer", None), "roi_size", None)
        if window is None:
            return False
        return self.force_sliding_window or any(x[0].numel() >= math.prod(window) for x in inputs)

    def __call__(self, inputs: list[torch.Tensor], network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        dtype = self.autocast_type(inputs[0].device)
        with torch.autocast(inputs[0].device.type, dtype=dtype, enabled=dtype is not None):
            return network(inputs, use_inferer=self.slides(inputs, network))


def _single(batch: list[_Loaded]) -> _Loaded:
    return batch[0]


def _failure_of_prediction(e: Exception) -> str:
    """The problem code of an exception the detector raised on one image, or ``""`` if it is not the image's."""
    if isinstance(e, ValueError) and "NaN or Inf" in str(e):  # MONAI's heads, box coder and detector
        return "nonfinite_prediction"
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return "out_of_memory"
    return ""


class DetectionInference:
    """
    Runs the detector on each screened input and writes its result as soon as it has it.

    Args:
        detector: the `RetinaNetDetector` with its sliding-window inferer set (inference.json's ``detector``).
        inputs: the data check's verdict on the inputs (`scripts.data.screening.screen_inputs`): the refused ones are
            listed as failures.
        dataset: the usable inputs, loaded (an `InferenceDataset` of ``inputs.items``).
        inferer: runs the detector on a list of whole images, in the precision it sets
            (`VolumeInferer`).
        writer: keeps and writes the results and failures.
        device: where the images go.
        previews: saves a picture per image (``None``: none).
        num_workers: processes that load the next images while the detector runs.
        progress: show a progress bar.
    """

    def __init__(
        self,
        detector: torch.nn.Module,
        inputs: ScreenedInputs,
        dataset: InferenceDataset,
        inferer: VolumeInferer,
        writer: DetectionWriter,
        device: torch.device | str,
        previews: PreviewSaver | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        self.detector = detector
        self.inputs = inputs
        self.dataset = dataset
        self.inferer = inferer
        self.writer = writer
        self.device = torch.device(device)
        self.previews = previews
        self.num_workers = int(num_workers)
        self.progress = progress

    def predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The detector's boxes (``xyzxyz``, image coordinates), labels and scores for one loaded image."""
        with torch.no_grad():
            return self.inferer([image.to(self.device)], self.detector)[0]

    def run(self) -> str:
        """Run every input; returns the result file, or raises `InferenceFailed` when any image failed."""
        for rejected in self.inputs.rejected:
            self.writer.fail(Failure.from_rejected(rejected))
        self.detector.eval()
        precision = precision_name(self.inferer.autocast_type(self.device), self.inferer.amp, self.device)
        logger.info(f"inference on {self.device}, {precision}, {len(self.dataset)} images")
        loading = DataLoader(self.dataset, batch_size=1, num_workers=self.num_workers, collate_fn=_single)
        for loaded in tqdm(loading, desc="inference", unit="image", disable=not self.progress):
            if loaded.failure is not None:
                self.writer.fail(loaded.failure)
                continue
            item = loaded.data
            try:
                pred = self.predict(item["image"])
            except Exception as e:
                problem = _failure_of_prediction(e)
                if not problem:
                    raise  # a bug, not this image's fault: keep its traceback (the results so far are on disk)
                self.writer.fail(Failure(image_name(item), problem, describe(e)))
                continue
            self.writer.add(item, pred)
            if self.previews is not None:
                self.previews.save(item, pred)
        return self.writer.finish(self.inputs.report_path)
