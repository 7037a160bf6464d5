"""What goes into and out of ``inference.json``: the input list, the trained network, the result JSON and the LUNA16
submission file."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from monai.handlers import CheckpointLoader
from scripts.data.datalist import load_datalist
from scripts.data.luna16_csv import Candidate, seriesuid_of, write_submission
from scripts.data.quarantine import image_path
from scripts.data.rules import resolve_image
from scripts.data.screening import Rejected
from scripts.errors import UserError, describe
from scripts.json_io import write_json

__all__ = [
    "checkpoint_file",
    "DetectionWriter",
    "Failure",
    "InferenceFailed",
    "image_name",
    "list_inputs",
    "load_network",
    "PretrainedLoader",
    "submission_candidates",
]

logger = logging.getLogger(__name__)

# models/model.pt of large_files.yml: the model zoo's published LUNA16 weights, which fit network_def
ZOO_WEIGHTS_URL = (
    "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/model_lung_nodule_ct_detection.pt"
)
IMAGE_PATTERNS = ("*.nii.gz", "*.nii", "*.mhd", "*.mha")  # NIfTI, and MetaImage (the LUNA16 download), read by ITK
LUNA16_CANDIDATES_PER_SCAN = 100  # LUNA16's evaluation keeps the 100 best candidates of each scan


class InferenceFailed(UserError):
    """Some images got no result; the message says how many and where they are listed."""


@dataclass(frozen=True)
class Failure:
    """
    An image that got no result.

    Args:
        image: its name as the result lists it.
        problem: a short code (the data check's codes, or ``load_failed``, ``nonfinite_prediction``,
            ``out_of_memory``).
        message: one line saying what went wrong.
    """

    image: str
    problem: str
    message: str

    @classmethod
    def from_rejected(cls, rejected: Rejected) -> Failure:
        """The failure of an input the data check refused."""
        problems = "; ".join(sorted({f.problem for f in rejected.errors}))
        return cls(image_name(rejected.item), problems, "; ".join(f.message for f in rejected.errors))


def list_inputs(data_list_file_path: str, dataset_dir: str, data_list_key: str = "validation") -> list[dict[str, str]]:
    """
    The images to run on, as ``[{"image": absolute path, "image_name": name written to the result}]``.

    When ``data_list_file_path`` names an existing datalist, its ``data_list_key`` list is used, each ``image``
    resolved against ``dataset_dir`` when relative and written back as it is in the datalist. Otherwise (an empty
    path, or a datalist that does not exist) every NIfTI (``.nii.gz``, ``.nii``) and MetaImage (``.mhd``, ``.mha``)
    file directly in ``dataset_dir`` is used, sorted, each written as its path relative to ``dataset_dir``. Raises
    `UserError` when there is nothing to run on. An image the datalist lists more than once (the same file) is run
    once, with a warning; its item's ``listings`` says how often it is listed, so that its result stands for each.
    """
    if data_list_file_path and os.path.isfile(data_list_file_path):
        datalist = load_datalist(data_list_file_path)
        where = f"datalist {os.path.abspath(data_list_file_path)}"
        if not isinstance(datalist, dict) or not isinstance(datalist.get(data_list_key), list):
            keys = sorted(datalist) if isinstance(datalist, dict) else []
            raise UserError(f"{where} has no {data_list_key!r} list (it has {keys}): set data_list_key")
        names = []
        for i, item in enumerate(datalist[data_list_key]):
            if not (isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]):
                raise UserError(f"{where}: {data_list_key}[{i}] has no image path: {str(item)[:80]}")
            names.append(item["image"])
        if not names:
            raise UserError(f"{where}: the {data_list_key!r} list is empty")
    else:
        found = sorted({p for pattern in IMAGE_PATTERNS for p in glob.glob(os.path.join(dataset_dir, pattern))})
        if not found:
            datalist = f"no datalist at {data_list_file_path}" if data_list_file_path else "no datalist given"
            raise UserError(
                f"{datalist} and no image files ({', '.join(IMAGE_PATTERNS)}) in {os.path.abspath(dataset_dir)}: "
                "set dataset_dir to the folder of the images, or data_list_file_path"
            )
        if data_list_file_path:
            logger.warning(
                f"datalist {data_list_file_path} not found: running on the {len(found)} image files of {dataset_dir}"
            )
        names = [os.path.relpath(p, dataset_dir) for p in found]
    items: dict[str, dict[str, Any]] = {}
    for name in names:
        image = resolve_image(name, dataset_dir)
        key = os.path.realpath(image)
        if key in items:
            items[key]["listings"] += 1
        else:
            items[key] = {"image": image, "image_name": name, "listings": 1}
    for item in items.values():
        if item["listings"] > 1:
            logger.warning(
                f"{item['image_name']} is listed {item['listings']} times in {data_list_file_path} "
                f"({data_list_key}): inferred once, its result written for each listing"
            )
    return list(items.values())


def _state_dict_mismatch(network: torch.nn.Module, state: Any) -> str:
    """Why ``state`` is not a state dict of ``network`` (``""`` when it is: same keys, same shapes)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "it holds no network weights (a state dict, or a checkpoint with a 'model' entry)"
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return ""
    first = (missing or unexpected or reshaped)[0]
    return (
        f"its weights are for another network: {len(missing)} of the {len(expected)} tensors of network_def "
        f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape (first: {first})"
    )


def checkpoint_file(path: str) -> str:
    """
    ``path``, absolute, if it is a complete checkpoint as `torch.save` writes them (a zip archive), for
    ``resume_from``; a `UserError` naming it otherwise (MONAI's `CheckpointLoader` would fail with a traceback).
    """
    path = os.path.abspath(str(path))
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: check resume_from (models/checkpoint_final.pt?)")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is not a complete torch checkpoint (truncated, or another kind of file)")
    return path


def load_network(model_path: str, network_def: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """
    The trained network on ``device``: a TorchScript module when ``model_path`` ends with ``.ts``, otherwise
    ``network_def`` with the weights of the checkpoint ``model_path`` loaded strictly (a bare state dict as
    `CheckpointSaver` writes ``model.pt``, or a training checkpoint with a ``model`` entry). Raises `UserError`
    naming the file when it is missing, unreadable, or holds weights for another network.
    """
    path = os.path.abspath(str(model_path))
    if not os.path.isfile(path):
        raise UserError(
            f"model file {path} does not exist: train a model first, set model_path, or download the zoo's LUNA16 "
            f"weights that large_files.yml lists ({ZOO_WEIGHTS_URL})"
        )
    try:
        if path.endswith(".ts"):
            return torch.jit.load(path, map_location=device)
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # whatever torch makes of a damaged file, it is the file's fault
        raise UserError(f"model file {path} cannot be read ({describe(e)}): is it a complete .pt or .ts file?") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    why = _state_dict_mismatch(network_def, state)
    if why:
        raise UserError(
            f"model file {path} does not fit network_def: {why}; "
            "use the config the model was trained with (e.g. add configs/demo.json for the demo model)"
        )
    network_def.load_state_dict(state, strict=True)
    return network_def.to(device)


class PretrainedLoader(CheckpointLoader):
    """
    inference.json's ``checkpointloader`` (the model zoo's ID, run by ``initialize`` when ``load_pretrain``): MONAI's
    `CheckpointLoader` of the trained weights into ``load_dict["model"]``, with the checks of `load_network` (a
    one-line `UserError` naming the file when it is missing, unreadable or for another network) and a TorchScript
    ``.ts`` file loaded as the network itself. The file is read once, whichever asks first: the ``network`` ID
    (`network`), or ``initialize`` and engines it is attached to (calling it).

    Args:
        load_path: the ``model.pt`` (a state dict or a training checkpoint) or ``model.ts``.
        load_dict: ``{"model": network_def}``, the network the weights go into.
        name: the logger's name, as in `CheckpointLoader`.
    """

    def __init__(self, load_path: str, load_dict: dict[str, torch.nn.Module], name: str | None = None) -> None:
        if "model" not in load_dict:
            raise ValueError(f"PretrainedLoader: load_dict needs a 'model' entry, got {sorted(load_dict)}")
        super().__init__(load_path=load_path, load_dict=load_dict, name=name)
        self.loaded: torch.nn.Module | None = None

    def network(self, device: torch.device | str) -> torch.nn.Module:
        """The network with the weights of ``load_path``, on ``device``, loaded the first time only."""
        if self.loaded is None:
            self.loaded = load_network(self.load_path, self.load_dict["model"], device)
        return self.loaded

    def __call__(self, engine: Any = None) -> None:
        """Load the weights onto the network's own device, unless done already. ``engine``: the one this handler is
        attached to, or the runner ``initialize`` passes, as the zoo's does; not needed."""
        parameter = next(self.load_dict["model"].parameters(), None)
        self.network(parameter.device if parameter is not None else "cpu")


def image_name(item: dict[str, Any]) -> str:
    """The name an input item is reported under: its ``image_name``, else the file its image was loaded from."""
    return str(item.get("image_name") or image_path(item))


class DetectionWriter:
    """
    Writes the predictions of an inference run as a datalist-format JSON,
    ``{data_list_key: [{"image", "box", "label", "label_scores"}], "failed": [{"image", "problem", "message"}]}``,
    and beside it the LUNA16 submission file (``seriesuid,coordX,coordY,coordZ,probability``: the centres of each
    scan's 100 best boxes, in the world coordinates of the boxes, the seriesuid the image's file name without its
    suffix), both rewritten atomically after every image, so that a crash or a kill loses at most the image in flight.

    Args:
        output_dir: folder of the result file (created if missing).
        postprocessing: maps ``{"box", "label", "label_scores", "image"}`` (boxes ``xyzxyz`` in the coordinates of
            the loaded ``image``) to the boxes to write, e.g. `AffineBoxToWorldCoordinated` then `ConvertBoxModed`.
        filename: name of the result file.
        data_list_key: the list the entries are written under.
        submission_file: name of the submission file (``None`` or ``""``: none).
    """

    def __init__(
        self,
        output_dir: str,
        postprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        filename: str = "result.json",
        data_list_key: str = "validation",
        submission_file: str | None = None,
    ) -> None:
        self.path = os.path.join(output_dir, filename)
        self.submission_path = os.path.join(output_dir, submission_file) if submission_file else None
        self.postprocessing = postprocessing
        self.data_list_key = data_list_key
        self.results: list[dict[str, Any]] = []
        self.failures: list[Failure] = []

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

    def add(self, item: dict[str, Any], pred: dict[str, Any]) -> None:
        """Keep the result of one loaded image (once for each time it is listed: ``listings``) and rewrite the
        file."""
        entry = self.convert(item, pred)
        self.results += [entry] * int(item.get("listings", 1))
        self.write()

    def fail(self, failure: Failure) -> None:
        """Keep an image that got no result, log it in one line, and rewrite the file."""
        self.failures.append(failure)
        logger.warning(f"no result for {failure.image}: {failure.problem}: {failure.message}")
        self.write()

    def write(self) -> str:
        """Write the result file; returns its path."""
        failed = [dataclasses.asdict(f) for f in self.failures]
        write_json(self.path, {self.data_list_key: self.results, "failed": failed})
        if self.submission_path is not None:
            unique = {r["image"]: r for r in self.results}.values()  # a scan listed twice is one scan to LUNA16
            write_submission(self.submission_path, [c for r in unique for c in submission_candidates(r)])
        return self.path

    def finish(self, report_path: str | None = None) -> str:
        """
        Write the file and log the totals; raise `InferenceFailed` (one line: how many, where they are listed) if
        any image got no result. ``report_path``: the data check's report, named in that line.
        """
        path = self.write()
        logger.info(f"wrote the detections of {len({r['image'] for r in self.results})} images to {path}")
        if self.failures:
            total = len(self.failures) + len({r["image"] for r in self.results})
            raise InferenceFailed(
                f'inference failed on {len(self.failures)} of {total} images: they are listed under "failed" in '
                f"{path}" + (f" (data check report: {report_path})" if report_path else "")
            )
        return path


def submission_candidates(entry: dict[str, Any]) -> list[Candidate]:
    """
    The LUNA16 candidates of one result entry: the centres of its ``cccwhd`` boxes with their scores, the best
    `LUNA16_CANDIDATES_PER_SCAN` in order of score (ties in the detector's order), under ``seriesuid_of(image)``.
    """
    uid = seriesuid_of(entry["image"])
    order = sorted(range(len(entry["box"])), key=lambda i: -entry["label_scores"][i])[:LUNA16_CANDIDATES_PER_SCAN]
    return [Candidate(uid, tuple(entry["box"][i][:3]), entry["label_scores"][i]) for i in order]  # type: ignore[arg-type]
