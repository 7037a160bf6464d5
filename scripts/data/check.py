"""The data check: every case of a datalist (or every inference input) checked before use, each bad file named.

`check_datalist` walks a datalist one case at a time and returns a `DataReport`. Each case goes, in order, through:
the datalist entry (`scripts.data.rules.check_annotations`), the file itself (`scripts.data.probe.file_problem`),
its header before any voxel is read (`check_header`), its voxels in slabs (`read_voxel_stats`, `check_voxels`), and
the training loading and coordinate path (same reader, orientation and LPS world -> image box mapping, before
intensity scaling) run on a voxel-free stand-in (`voxel_free`), for the affine, the size and the boxes
(`check_geometry`, `check_boxes`). The memory a case takes is bounded whatever its header claims. A failure of the
check itself on one case is recorded as ``internal_error`` for that case, and the others go on.

Entry points: the run ID ``check_data`` calls `run_check_data`; training and inference go through the ``data_check``
policies of `scripts.data.screening`, which walk their cases with `CaseWalk`. Problems the user must fix raise
`DataCheckFailed` or `scripts.data.datalist.DatalistError` (`scripts.errors.UserError`), which the configs turn into
a one-line exit.

Problem codes (severity in brackets):

- datalist: ``datalist_missing``, ``datalist_invalid_json``, ``datalist_not_dict``, ``missing_section`` (error
  for the first section asked for, warning for the others), ``bad_section``, ``empty_section``,
  ``item_not_dict``, ``missing_key``, ``bad_image_type``, ``duplicate_image`` [error unless said];
  ``outside_dataset_dir`` (a relative image path that climbs out of ``dataset_dir``) [warning];
- file: ``missing_file`` (``details["reason"]``: broken_symlink), ``unreadable`` (reason: symlink_loop,
  directory, permission_denied, corrupt_gzip, truncated_gzip, not_gzip, empty_file, not_nifti, truncated_nifti,
  size_mismatch, load_error), ``wrong_dimensions``, ``multi_channel``, ``unsupported_dtype``, ``too_large``,
  ``transform_failed``, ``degenerate_affine``, ``nan_voxels``, ``inf_voxels``, ``internal_error`` [error];
  ``dtype_range``, ``intensity_range``, ``unexpected_spacing``, ``small_volume`` [warning];
- boxes and labels: ``bad_box_type``, ``bad_label_type``, ``box_values`` (not 6 values, or non-finite),
  ``box_size`` (w, h or d <= 0), ``box_outside`` [error]; ``box_partly_outside`` [warning]; ``label_count``,
  ``label_range`` [error].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scripts.data.datalist import SECTIONS, DatalistError, load_datalist, section_items
from scripts.data.probe import Diagnosis, diagnose, file_problem, open_image, read_header, read_voxel_stats, voxel_free
from scripts.data.report import DataReport, ItemRecorder
from scripts.data.rules import (
    Annotations,
    CheckSettings,
    check_annotations,
    check_boxes,
    check_geometry,
    check_header,
    check_path,
    check_voxels,
    resolve_image,
)
from scripts.errors import UserError, describe
from tqdm import tqdm

__all__ = [
    "CaseWalk",
    "DataCheckFailed",
    "DataReport",
    "check_datalist",
    "check_failed",
    "run_check_data",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_NAME = "data_check.json"

Loader = Callable[[dict], dict]


class DataCheckFailed(UserError):
    """The data check found errors that the policy does not let the run go on with."""


def _record(rec: ItemRecorder, found: Diagnosis) -> None:
    rec.error(found.problem, found.text, **({"reason": found.reason} if found.reason else {}))


def _check_image(
    path: str, rec: ItemRecorder, loader: Loader, settings: CheckSettings, annotations: Annotations | None
) -> None:
    """The file, its header, its voxels, then the loading path for the affine, size and boxes."""
    found = file_problem(path)
    if found is not None:
        _record(rec, found)
        return
    try:
        image = open_image(path)
        header = read_header(image)
    except Exception as e:
        _record(rec, diagnose(e, path))
        return
    if not check_header(header, rec, settings.max_voxels):
        return
    try:
        stats = read_voxel_stats(image, settings.intensity_range)
    except Exception as e:
        _record(rec, diagnose(e, path))
        return
    del image  # closes the file kept open for the slabs
    check_voxels(stats, rec, settings.intensity_range)
    sample: dict[str, Any] = {"image": path}
    if annotations is not None:
        sample["box"] = np.asarray(annotations.boxes, dtype=np.float32).reshape(-1, 6)
        sample["label"] = np.zeros(len(annotations.boxes), dtype=np.int64)
    try:
        data = loader(sample)
    except Exception as e:
        _record(rec, diagnose(e, path))
        return
    loaded = data["image"]
    spatial = [int(s) for s in loaded.shape[1:]]
    if not check_geometry(spatial, getattr(loaded, "affine", None), rec, settings) or annotations is None:
        return
    mapped = np.asarray(torch.as_tensor(data["box"]).detach().cpu(), dtype=np.float64).reshape(-1, 6)
    check_boxes(mapped, annotations.positions, spatial, rec)


class CaseWalk:
    """
    One pass of the data check over the items of one or more sections, into one report.

    Args:
        report: where the findings go.
        dataset_dir: folder relative image paths are joined to.
        loader: the training loading and coordinate path (see `check_datalist`).
        settings: what is accepted.
        annotated: whether items carry boxes and labels (datalists) or only an image (inference inputs).
    """

    def __init__(
        self, report: DataReport, dataset_dir: str, loader: Loader, settings: CheckSettings, annotated: bool
    ) -> None:
        self.report, self.dataset_dir, self.settings, self.annotated = report, dataset_dir, settings, annotated
        self.loader = voxel_free(loader)
        self.seen: dict[str, tuple[str, int]] = {}  # real path -> first (section, index)

    def sections(self, todo: Sequence[tuple[str, list]], progress: bool) -> None:
        """Check every item of each ``(section, items)``, with a progress bar."""
        total = sum(len(items) for _, items in todo)
        with tqdm(total=total, desc="data check", unit="case", disable=not progress) as bar:
            for section, items in todo:
                for index, item in enumerate(items):
                    self.report.checked[section] += 1
                    bar.update(1)
                    try:
                        self.item(item, section, index)
                    except Exception as e:  # a bug of the check on one case must not lose the others
                        logger.exception(f"data check: internal error on {section}[{index}]")
                        self.report.item(section, index, self.path(item)).error(
                            "internal_error", f"the data check failed on this case ({describe(e)}); please report it"
                        )

    def path(self, item: Any) -> str:
        """The absolute image path of a datalist item (``""`` when it has none)."""
        image = item.get("image") if isinstance(item, dict) else None
        return resolve_image(image, self.dataset_dir) if isinstance(image, str) and image else ""

    def item(self, item: Any, section: str, index: int) -> None:
        """Check one datalist item: its entry, then its file (once per file)."""
        if not isinstance(item, dict):
            self.report.item(section, index).error("item_not_dict", f"item is a {type(item).__name__}, not a dict")
            return
        image = item.get("image")
        path = self.path(item)
        rec = self.report.item(section, index, path)
        if "image" not in item:
            rec.error("missing_key", 'missing key "image"', key="image")
        elif not path:
            rec.error("bad_image_type", f'"image" must be a path, got {image!r}')
        annotations = check_annotations(item, rec, self.settings.num_classes) if self.annotated else None
        if not path:
            return
        key = os.path.realpath(path)
        if key in self.seen:
            first = self.seen[key]
            rec.error("duplicate_image", f"duplicate of {first[0]}[{first[1]}]")
            return
        self.seen[key] = (section, index)
        check_path(image, self.dataset_dir, rec)
        if annotations is not None:
            self.report.no_boxes += not annotations.present
        _check_image(path, rec, self.loader, self.settings, annotations)


def check_datalist(
    data_list_file_path: str,
    dataset_dir: str,
    loader: Loader,
    patch_size: Sequence[int] | None,
    num_classes: int = 1,
    sections: Sequence[str] = SECTIONS,
    progress: bool = True,
    **settings: Any,
) -> DataReport:
    """
    Check a datalist and every case in it, one volume at a time; nothing but the findings is kept.

    Args:
        data_list_file_path: datalist JSON (model-zoo / LUNA16 format).
        dataset_dir: folder that relative ``image`` paths are relative to.
        loader: the training loading and coordinate path up to (not including) intensity scaling: train.json's
            ``loader`` (image (C, x, y, z) in RAS, boxes ``xyzxyz`` in image coordinates). Its `LoadImaged` is
            replaced by a voxel-free stand-in (`scripts.data.probe.voxel_free`).
        patch_size, num_classes, settings: see `scripts.data.rules.CheckSettings` (``intensity_range``,
            ``expected_spacing``, ``spacing_tolerance``, ``max_voxels``).
        sections: datalist sections to check; the first one is required, the others may be missing (warning).
        progress: show a tqdm progress bar.
    """
    report = DataReport(data_list_file_path, dataset_dir)
    try:
        datalist = load_datalist(data_list_file_path)
    except DatalistError as e:
        report.item(None, None).error(e.code, e.detail)
        return report
    walk = CaseWalk(report, dataset_dir, loader, CheckSettings(patch_size, num_classes, **settings), annotated=True)
    walk.sections(section_items(datalist, sections, report), progress)
    return report


def write_report(report: DataReport, output_dir: str | None) -> str | None:
    """Write the report to ``output_dir`` (``None``: nowhere, as on DDP ranks other than 0)."""
    if output_dir is None:
        return None
    path = os.path.join(os.path.abspath(str(output_dir)), REPORT_NAME)
    report.to_json(path)
    return path


def check_failed(report: DataReport, path: str | None, hint: str) -> DataCheckFailed:
    """The one-line verdict on a report with errors: what is wrong (the datalist itself, or how many items), what to
    do, and where the report is."""
    whole = report.datalist_errors()
    if whole:
        prefix = f"datalist {report.datalist}: "
        why = "; ".join(f.message.removeprefix(prefix) for f in whole)
        text = f"data check failed: {prefix}{why}; fix the datalist"
    else:
        where = report.datalist or "the inputs"
        text = (
            f"data check failed: {len(report.errors)} errors in {report.items_with_errors()} items of {where}; {hint}"
        )
    return DataCheckFailed(text + (f" (report: {path})" if path else ""))


def run_check_data(
    data_list_file_path: str,
    dataset_dir: str,
    output_dir: str | None,
    loader: Loader,
    patch_size: Sequence[int] | None = (192, 192, 80),
    num_classes: int = 1,
    **kwargs: Any,
) -> DataReport:
    """
    The ``check_data`` run: check the datalist with a progress bar, print the summary, write
    ``output_dir/data_check.json``, and raise `DataCheckFailed` (one line) if any error was found.

    Args:
        data_list_file_path, dataset_dir, loader, patch_size, num_classes, kwargs: as `check_datalist`.
        output_dir: folder of the JSON report (``None``: no report and no printing, as on DDP ranks other than 0).
    """
    rank0 = output_dir is not None
    kwargs.setdefault("progress", rank0)
    report = check_datalist(data_list_file_path, dataset_dir, loader, patch_size, num_classes, **kwargs)
    path = write_report(report, output_dir)
    if rank0:
        print(report.summary())
        print(f"data check report: {path}")
    if not report.ok:
        raise check_failed(report, path, "fix them")
    return report
