"""What goes into and out of ``inference.json``: the input list, the trained network, and the result JSON writer."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.json_io import write_json

__all__ = ["DetectionWriter", "image_name", "list_inputs", "load_network"]

logger = logging.getLogger(__name__)

NIFTI_PATTERNS = ("*.nii.gz", "*.nii")


def list_inputs(data_list_file_path: str, dataset_dir: str, data_list_key: str = "validation") -> list[dict[str, str]]:
    """
    The images to run on, as ``[{"image": absolute path, "image_name": name written to the result}]``.

    When ``data_list_file_path`` names an existing datalist, its ``data_list_key`` list is used, each ``image``
    resolved against ``dataset_dir`` when relative and written back as it is in the datalist. Otherwise (an empty
    path, or a datalist that does not exist) every NIfTI file directly in ``dataset_dir`` is used, sorted, each
    written as its path relative to ``dataset_dir``.
    """
    if data_list_file_path and os.path.isfile(data_list_file_path):
        with open(data_list_file_path) as f:
            datalist = json.load(f)
        if data_list_key not in datalist:
            raise KeyError(f"datalist {data_list_file_path} has no {data_list_key!r} list; it has {sorted(datalist)}")
        names = [item["image"] for item in datalist[data_list_key]]
    else:
        found = sorted({p for pattern in NIFTI_PATTERNS for p in glob.glob(os.path.join(dataset_dir, pattern))})
        if not found:
            raise FileNotFoundError(
                f"no datalist at {data_list_file_path!r} and no NIfTI files (*.nii, *.nii.gz) in {dataset_dir!r}"
            )
        if data_list_file_path:
            logger.warning(
                f"datalist {data_list_file_path} not found: running on the {len(found)} NIfTI files of {dataset_dir}"
            )
        names = [os.path.relpath(p, dataset_dir) for p in found]
    return [{"image": os.path.abspath(os.path.join(dataset_dir, n)), "image_name": n} for n in names]


def load_network(model_path: str, network_def: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """
    The trained network on ``device``: a TorchScript module when ``model_path`` ends with ``.ts``, otherwise
    ``network_def`` with the weights of the checkpoint ``model_path`` loaded strictly (a bare state dict as
    `CheckpointSaver` writes ``model.pt``, or a training checkpoint with a ``model`` entry).
    """
    if model_path.endswith(".ts"):
        return torch.jit.load(model_path, map_location=device)
    state = torch.load(model_path, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network_def.load_state_dict(state, strict=True)
    return network_def.to(device)


def image_name(item: dict[str, Any]) -> str:
    """The name an input item is reported under: its ``image_name``, else the file its image was loaded from."""
    if item.get("image_name"):
        return str(item["image_name"])
    meta = getattr(item["image"], "meta", {})
    return str(meta.get("filename_or_obj", ""))


class DetectionWriter:
    """
    Writes the predictions of an evaluator run as a datalist-format JSON,
    ``{data_list_key: [{"image", "box", "label", "label_scores"}]}``, one entry per image in loading order.

    Args:
        output_dir: folder of the result file (created if missing).
        postprocessing: maps ``{"box", "label", "label_scores", "image"}`` (boxes ``xyzxyz`` in the coordinates of
            the loaded ``image``) to the boxes to write, e.g. `AffineBoxToWorldCoordinated` then `ConvertBoxModed`.
        filename: name of the result file.
        data_list_key: the list the entries are written under.
    """

    def __init__(
        self,
        output_dir: str,
        postprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        filename: str = "result.json",
        data_list_key: str = "validation",
    ) -> None:
        self.output_dir = output_dir
        self.postprocessing = postprocessing
        self.filename = filename
        self.data_list_key = data_list_key
        self.results: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Reset at each epoch start, convert at each iteration, write at each epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the collected results."""
        self.results = []

    def convert(self, item: dict[str, Any], pred: dict[str, Any]) -> dict[str, Any]:
        """One result entry: the prediction for the loaded ``item`` through ``postprocessing``, as JSON values."""
        data = {k: pred[k].detach().cpu() for k in ("box", "label", "label_scores")}
        out = self.postprocessing({**data, "image": item["image"]})
        return {
            "image": image_name(item),
            "box": torch.as_tensor(out["box"]).reshape(-1, 6).tolist(),
            "label": [int(v) for v in torch.as_tensor(out["label"]).reshape(-1).tolist()],
            "label_scores": [float(v) for v in torch.as_tensor(out["label_scores"]).reshape(-1).tolist()],
        }

    def update(self, engine: Engine) -> None:
        """Convert and keep the predictions of the current batch."""
        self.results += [
            self.convert(i, p) for i, p in zip(engine.state.batch, engine.state.output["pred"], strict=True)
        ]

    def write(self, engine: Engine | None = None) -> str:
        """Write the result file; returns its path."""
        path = os.path.join(self.output_dir, self.filename)
        write_json(path, {self.data_list_key: self.results})
        logger.info(f"wrote the detections of {len(self.results)} images to {path}")
        return path
