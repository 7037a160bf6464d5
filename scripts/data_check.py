"""Data QA for the detection datalist: every case checked before training, with a named problem per bad file.

`check_datalist` streams the datalist one case at a time through the training loader (same reader, orientation
and LPS world -> image box mapping, before intensity scaling) and returns a `DataReport` of findings. The run ID
``check_data`` calls `run_check_data`; training calls `screen_datalists` with the ``data_check`` policy
(``strict``, ``exclude`` or ``off``), which shares its record of bad files with the NaN guard (`Quarantine`).

Problem codes (severity in brackets):

- datalist: ``datalist_missing``, ``datalist_invalid_json``, ``datalist_not_dict``, ``missing_section`` (error
  for the first section asked for, warning for the others), ``bad_section``, ``empty_section``,
  ``item_not_dict``, ``missing_key``, ``bad_image_type``, ``bad_box_type``, ``bad_label_type``,
  ``duplicate_image`` [error unless said];
- file: ``missing_file``, ``unreadable`` (``details["reason"]``: corrupt_gzip, truncated_gzip, not_gzip,
  empty_file, not_nifti, truncated_nifti, load_error), ``transform_failed``, ``degenerate_affine``,
  ``nan_voxels``, ``inf_voxels`` [error]; ``intensity_range``, ``unexpected_spacing``, ``small_volume`` [warning];
- boxes and labels: ``box_values`` (not 6 values, or non-finite), ``box_size`` (w, h or d <= 0),
  ``box_outside`` [error]; ``box_partly_outside`` [warning]; ``label_count``, ``label_range`` [error].
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from scripts.json_io import write_json
from scripts.quarantine import Quarantine, image_path

__all__ = ["DataReport", "check_datalist", "load_datalist", "run_check_data", "screen_datalists"]

logger = logging.getLogger(__name__)

POLICIES = ("strict", "exclude", "off")
REPORT_NAME = "data_check.json"
# slack, in voxels, before a box edge counts as outside the image (centre vs corner voxel conventions)
EXTENT_SLACK = 0.5


class DatalistError(ValueError):
    """The datalist file is missing (``code`` ``datalist_missing``) or is not valid JSON (``datalist_invalid_json``)."""

    def __init__(self, path: str, code: str, detail: str) -> None:
        super().__init__(f"datalist {path}: {detail}")
        self.code, self.detail = code, detail


def load_datalist(data_list_file_path: str) -> Any:
    """The parsed datalist JSON; raises `DatalistError` naming the file when it is missing or not valid JSON."""
    path = os.path.abspath(str(data_list_file_path))
    if not os.path.isfile(path):
        raise DatalistError(path, "datalist_missing", "file does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatalistError(path, "datalist_invalid_json", f"not valid JSON ({e})") from e


def _resolve(image: str, dataset_dir: str) -> str:
    """``image`` as an absolute path: joined to ``dataset_dir`` when relative (the quarantine's path form)."""
    return image_path(os.path.join(str(dataset_dir), os.path.expanduser(image)))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


class DataReport:
    """
    The findings of a data check, one dict per problem: ``section``, ``index`` (the item's position in its section,
    ``None`` for the datalist itself), ``image`` (absolute path, ``""`` when unknown), ``severity`` (``"error"`` or
    ``"warning"``), ``problem`` (a short code, see the module docstring), ``message`` (human text naming the file)
    and ``details`` (numbers behind the message).

    Args:
        datalist: the datalist file checked.
        dataset_dir: the folder relative image paths are joined to.
    """

    def __init__(self, datalist: str = "", dataset_dir: str = "") -> None:
        self.datalist = os.path.abspath(str(datalist)) if datalist else ""
        self.dataset_dir = os.path.abspath(str(dataset_dir)) if dataset_dir else ""
        self.findings: list[dict[str, Any]] = []
        self.checked: Counter[str] = Counter()  # items seen per section
        self.no_boxes = 0  # items with no boxes and no labels (valid)

    def add(
        self,
        section: str | None,
        index: int | None,
        image: str,
        severity: str,
        problem: str,
        message: str,
        **details: Any,
    ) -> None:
        """Record one finding; ``message`` is prefixed with where it is (``section[index] file:``)."""
        where = f"{section}[{index}] " if section is not None and index is not None else ""
        what = image or (f"datalist {self.datalist}" if index is None else "(no image)")
        finding = {
            "section": section,
            "index": index,
            "image": image,
            "severity": severity,
            "problem": problem,
            "message": f"{where}{what}: {message}",
            "details": details,
        }
        self.findings.append(finding)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["severity"] == "error"]

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["severity"] == "warning"]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def bad_images(self, section: str) -> set[str]:
        """Absolute paths of the images of ``section`` with at least one error."""
        return {f["image"] for f in self.errors if f["section"] == section and f["image"]}

    def bad_indices(self, section: str) -> set[int]:
        """Positions in ``section`` of the items with at least one error."""
        return {f["index"] for f in self.errors if f["section"] == section and f["index"] is not None}

    def datalist_errors(self) -> list[dict[str, Any]]:
        """Errors of the datalist as a whole (no item to drop)."""
        return [f for f in self.errors if f["index"] is None]

    def summary(self) -> str:
        """Readable multi-line text: totals, counts per problem, then one line per finding (errors first)."""
        items = ", ".join(f"{s} {n}" for s, n in self.checked.items())
        lines = [
            f"data check of {self.datalist or '(datalist)'}: {sum(self.checked.values())} items"
            + (f" ({items})" if items else "")
            + f", {len(self.errors)} errors, {len(self.warnings)} warnings"
            + f", {len({(f['section'], f['index']) for f in self.errors})} items with errors"
        ]
        if self.no_boxes:
            lines.append(f"  items without boxes (valid negatives): {self.no_boxes}")
        for severity, found in (("errors", self.errors), ("warnings", self.warnings)):
            if found:
                counts = Counter(f["problem"] for f in found)
                lines.append(f"{severity} by problem: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines += [f"  ERROR   {f['problem']}: {f['message']}" for f in self.errors]
        lines += [f"  WARNING {f['problem']}: {f['message']}" for f in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "datalist": self.datalist,
            "dataset_dir": self.dataset_dir,
            "ok": self.ok,
            "items": dict(self.checked),
            "items_without_boxes": self.no_boxes,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": dict(Counter(f["problem"] for f in self.findings)),
            "findings": self.findings,
        }

    def to_json(self, path: str) -> None:
        """Write the report to ``path`` atomically."""
        write_json(str(path), self.to_dict(), indent=2, default=str)


def _exception_chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _looks_like_text(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text) and all(c.isprintable() or c.isspace() for c in text)


def _diagnose(e: BaseException, path: str) -> tuple[str, str, str]:
    """``(problem, reason code, short text)`` for a loader exception, from its exception chain."""
    chain = list(_exception_chain(e))
    root = chain[-1]
    failed_in = next((str(x) for x in chain if str(x).startswith("applying transform")), "")
    for x in chain:
        text = str(x).splitlines()[0] if str(x) else type(x).__name__
        name = type(x).__name__
        if isinstance(x, np.linalg.LinAlgError) or "singular" in text.lower():
            return "degenerate_affine", "singular_affine", f"affine cannot be inverted ({text})"
        if isinstance(x, zlib.error) or name == "BadGzipFile" or "crc check failed" in text.lower():
            return "unreadable", "corrupt_gzip", f"corrupt gzip data ({text})"
        if isinstance(x, EOFError):
            return "unreadable", "truncated_gzip", "truncated gzip: the compressed stream ends early"
        if "not a gzip file" in text.lower():
            kind = "a text file" if _looks_like_text(path) else "not gzip data"
            return "unreadable", "not_gzip", f"not a NIfTI file: {kind} named .gz"
        if "empty file" in text.lower():
            return "unreadable", "empty_file", "empty file"
        if "cannot work out file type" in text.lower():
            kind = " (a text file)" if _looks_like_text(path) else ""
            return "unreadable", "not_nifti", f"not a NIfTI file{kind}"
        if text.startswith("Expected") and "bytes" in text:
            return "unreadable", "truncated_nifti", f"truncated NIfTI: {text.replace(' from ', ' ').strip()}"
        if name in ("HeaderDataError", "ImageFileError", "WrapStructError"):
            return "unreadable", "not_nifti", f"not a valid NIfTI file ({text})"
    root_text = (str(root).splitlines() or [""])[0][:200]
    if "LoadImage" in failed_in or not failed_in:
        return "unreadable", "load_error", f"cannot be loaded: {type(root).__name__}: {root_text}"
    transform = failed_in.split("<")[-1].split(" ")[0].rsplit(".", 1)[-1] if "<" in failed_in else failed_in
    return "transform_failed", "transform_error", f"{transform} failed: {type(root).__name__}: {root_text}"


def _affine_problem(affine: Any) -> str:
    """Why an affine is degenerate (``""`` if it is not)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape[0] < 4 or not np.all(np.isfinite(a)):
        return "has non-finite values" if a.shape[0] >= 4 else f"has shape {a.shape}"
    rzs = a[:3, :3]
    det = float(np.linalg.det(rzs))
    if abs(det) < 1e-6 * max(float(np.abs(rzs).max()), 1e-12) ** 3:
        return f"is singular (det {det:.3g})"
    return ""


def _header_affine(path: str) -> np.ndarray | None:
    """The affine a NIfTI header states (sform/qform), read without the voxels; ``None`` if not NIfTI."""
    try:
        import nibabel as nib

        return np.asarray(nib.load(path).affine)
    except Exception:  # not readable by nibabel: the loader reports it
        return None


def _check_structure(item: dict, section: str, index: int, image: str, report: DataReport, num_classes: int) -> tuple:
    """Check keys and types of boxes and labels on the raw datalist values; returns (well-formed boxes, their
    positions in the item's box list, whether the item has boxes or labels)."""
    for key in ("box", "label"):
        if key not in item:
            report.add(section, index, image, "error", "missing_key", f'missing key "{key}"', key=key)
    boxes, labels = item.get("box", []), item.get("label", [])
    good: list[list[float]] = []
    positions: list[int] = []
    box_list_ok = isinstance(boxes, (list, tuple)) and all(isinstance(b, (list, tuple)) for b in boxes)
    if not box_list_ok:
        report.add(
            section, index, image, "error", "bad_box_type",
            f"box must be a list of [cx, cy, cz, w, h, d] lists, got {str(boxes)[:80]}",
        )  # fmt: skip
        boxes = []
    for j, b in enumerate(boxes):
        if not all(_is_number(v) for v in b):
            report.add(section, index, image, "error", "bad_box_type", f"box {j} has non-numeric values {list(b)}")
        elif len(b) != 6:
            report.add(
                section, index, image, "error", "box_values", f"box {j} has {len(b)} values, not 6: {list(b)}", box=j
            )
        elif not all(math.isfinite(float(v)) for v in b):
            report.add(section, index, image, "error", "box_values", f"box {j} has non-finite values {list(b)}", box=j)
        elif min(float(v) for v in b[3:]) <= 0:
            report.add(
                section, index, image, "error", "box_size",
                f"box {j} has non-positive size (w, h, d) = {tuple(float(v) for v in b[3:])}", box=j,
            )  # fmt: skip
        else:
            good.append([float(v) for v in b])
            positions.append(j)
    if not (isinstance(labels, (list, tuple)) and all(_is_int(v) for v in labels)):
        report.add(section, index, image, "error", "bad_label_type", f"label must be a list of ints, got {labels}")
    else:
        if box_list_ok and len(labels) != len(boxes):
            report.add(
                section, index, image, "error", "label_count",
                f"{len(labels)} labels for {len(boxes)} boxes", labels=len(labels), boxes=len(boxes),
            )  # fmt: skip
        bad = sorted({int(v) for v in labels if not 0 <= int(v) < num_classes})
        if bad:
            report.add(
                section, index, image, "error", "label_range",
                f"labels {bad} outside [0, {num_classes}) (num_classes={num_classes})", labels=bad,
            )  # fmt: skip
    has_annotations = bool(boxes) or bool(labels)
    return good, positions, has_annotations


def _check_file(
    path: str,
    boxes: list[list[float]],
    positions: list[int],
    section: str,
    index: int,
    report: DataReport,
    loader: Callable[[dict], dict],
    patch_size: Sequence[int] | None,
    intensity_range: Sequence[float] | None,
    expected_spacing: Sequence[float] | None,
    spacing_tolerance: float,
) -> None:
    """Load one case through ``loader`` and check voxels, affine, size and the boxes in image coordinates."""
    if not os.path.isfile(path):
        report.add(section, index, path, "error", "missing_file", "file does not exist")
        return
    header_affine = _header_affine(path)
    why = _affine_problem(header_affine) if header_affine is not None else ""
    if why:
        report.add(
            section, index, path, "error", "degenerate_affine",
            f"affine in the NIfTI header {why}: {header_affine[:3].tolist()}",
        )  # fmt: skip
        return  # the reader would substitute an affine of its own, so boxes cannot be placed
    sample = {
        "image": path,
        "box": np.asarray(boxes, dtype=np.float32).reshape(-1, 6),
        "label": np.zeros(len(boxes), dtype=np.int64),
    }
    try:
        data = loader(sample)
    except Exception as e:
        problem, reason, text = _diagnose(e, path)
        report.add(section, index, path, "error", problem, text, reason=reason)
        return
    image = data["image"]
    affine = getattr(image, "affine", None)
    del sample
    nan = int(torch.isnan(image).sum())
    inf = int(torch.isinf(image).sum())
    if nan:
        report.add(section, index, path, "error", "nan_voxels", f"{nan} NaN voxels", count=nan)
    if inf:
        report.add(section, index, path, "error", "inf_voxels", f"{inf} Inf voxels", count=inf)
    if intensity_range is not None and nan + inf < image.numel():
        finite = torch.isfinite(image)
        lo, hi = float(intensity_range[0]), float(intensity_range[1])
        vmin = float(torch.where(finite, image, torch.inf).min())
        vmax = float(torch.where(finite, image, -torch.inf).max())
        outside = int((((image < lo) | (image > hi)) & finite).sum())
        if outside:
            report.add(
                section, index, path, "warning", "intensity_range",
                f"{outside} voxels outside [{lo:g}, {hi:g}] (min {vmin:g}, max {vmax:g})",
                count=outside, min=vmin, max=vmax,
            )  # fmt: skip
    spatial = [int(s) for s in image.shape[1:]]
    del image
    if affine is not None:
        why = _affine_problem(affine)
        if why:
            report.add(section, index, path, "error", "degenerate_affine", f"affine {why}")
            return
        a = np.asarray(affine, dtype=np.float64)
        spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
        if expected_spacing is not None:
            expected = np.asarray(expected_spacing, dtype=np.float64)
            if np.any(np.abs(spacing - expected) / expected > spacing_tolerance):
                report.add(
                    section, index, path, "warning", "unexpected_spacing",
                    f"spacing {tuple(round(float(s), 4) for s in spacing)} mm is far from the expected "
                    f"{tuple(float(s) for s in expected)} mm", spacing=spacing.tolist(),
                )  # fmt: skip
    if patch_size is not None:
        small = [int(p) for s, p in zip(spatial, patch_size, strict=False) if p is not None and 0 < int(p) and s < p]
        if small:
            report.add(
                section, index, path, "warning", "small_volume",
                f"volume {tuple(spatial)} is smaller than patch_size {tuple(patch_size)}: will be padded",
                shape=spatial,
            )  # fmt: skip
    size = np.asarray(spatial[:3], dtype=np.float64)
    mapped = np.asarray(torch.as_tensor(data["box"]).detach().cpu(), dtype=np.float64).reshape(-1, 6)
    for j, b in zip(positions, mapped, strict=True):
        lo, hi = np.minimum(b[:3], b[3:]), np.maximum(b[:3], b[3:])
        where = f"box {j} maps to image coordinates {np.round(b, 2).tolist()}, image size {tuple(spatial)}"
        if np.any(hi <= 0) or np.any(lo >= size):
            report.add(section, index, path, "error", "box_outside", f"{where}: entirely outside", box=j)
        elif np.any(lo < -EXTENT_SLACK) or np.any(hi > size + EXTENT_SLACK):
            report.add(section, index, path, "warning", "box_partly_outside", f"{where}: partly outside", box=j)


def check_datalist(
    data_list_file_path: str,
    dataset_dir: str,
    loader: Callable[[dict], dict],
    patch_size: Sequence[int] | None,
    num_classes: int = 1,
    intensity_range: Sequence[float] | None = (-1100, 3100),
    expected_spacing: Sequence[float] | None = (0.703125, 0.703125, 1.25),
    spacing_tolerance: float = 0.5,
    sections: Sequence[str] = ("training", "validation"),
    progress: bool = True,
) -> DataReport:
    """
    Check a datalist and every case in it, one volume at a time; nothing but the findings is kept.

    Args:
        data_list_file_path: datalist JSON (model-zoo / LUNA16 format).
        dataset_dir: folder that relative ``image`` paths are relative to.
        loader: the training loading and coordinate path up to (not including) intensity scaling: train.json's
            ``loader`` (image (C, x, y, z) in RAS, boxes ``xyzxyz`` in image coordinates).
        patch_size: training patch size; smaller volumes get a ``small_volume`` warning (``None``: no check).
        num_classes: labels must lie in ``[0, num_classes)``.
        intensity_range: plausible HU range; voxels outside give a warning (``None``: no check).
        expected_spacing: expected voxel spacing in mm (``None``: no check).
        spacing_tolerance: relative difference from ``expected_spacing`` on any axis that gives a warning.
        sections: datalist sections to check; the first one is required, the others may be missing (warning).
        progress: show a tqdm progress bar.
    """
    report = DataReport(data_list_file_path, dataset_dir)
    try:
        datalist = load_datalist(data_list_file_path)
    except DatalistError as e:
        report.add(None, None, "", "error", e.code, e.detail)
        return report
    if not isinstance(datalist, dict):
        report.add(
            None, None, "", "error", "datalist_not_dict", f"must be a JSON object, got {type(datalist).__name__}"
        )
        return report
    todo: list[tuple[str, list]] = []
    for k, section in enumerate(sections):
        required = k == 0
        if section not in datalist:
            report.add(
                section, None, "", "error" if required else "warning", "missing_section", f'no "{section}" section'
            )
        elif not isinstance(datalist[section], list):
            report.add(section, None, "", "error", "bad_section", f'"{section}" must be a list of items')
        else:
            if not datalist[section]:
                report.add(
                    section, None, "", "error" if required else "warning", "empty_section", f'"{section}" is empty'
                )
            todo.append((section, datalist[section]))
    seen: dict[str, tuple[str, int]] = {}
    total = sum(len(items) for _, items in todo)
    with tqdm(total=total, desc="data check", unit="case", disable=not progress) as bar:
        for section, items in todo:
            for index, item in enumerate(items):
                report.checked[section] += 1
                bar.update(1)
                if not isinstance(item, dict):
                    report.add(
                        section, index, "", "error", "item_not_dict", f"item is a {type(item).__name__}, not a dict"
                    )
                    continue
                image = item.get("image")
                path = _resolve(image, dataset_dir) if isinstance(image, str) and image else ""
                if "image" not in item:
                    report.add(section, index, "", "error", "missing_key", 'missing key "image"', key="image")
                elif not path:
                    report.add(section, index, "", "error", "bad_image_type", f'"image" must be a path, got {image!r}')
                boxes, positions, has_annotations = _check_structure(item, section, index, path, report, num_classes)
                if not path:
                    continue
                key = os.path.realpath(path)
                if key in seen:
                    first = seen[key]
                    report.add(section, index, path, "error", "duplicate_image", f"duplicate of {first[0]}[{first[1]}]")
                    continue
                seen[key] = (section, index)
                report.no_boxes += not has_annotations
                _check_file(
                    path, boxes, positions, section, index, report, loader, patch_size,
                    intensity_range, expected_spacing, spacing_tolerance,
                )  # fmt: skip
    return report


def _write_report(report: DataReport, output_dir: str | None) -> str | None:
    """Write the report to ``output_dir`` (``None``: nowhere, as on DDP ranks other than 0)."""
    if output_dir is None:
        return None
    path = os.path.join(os.path.abspath(str(output_dir)), REPORT_NAME)
    report.to_json(path)
    return path


def run_check_data(
    data_list_file_path: str,
    dataset_dir: str,
    output_dir: str,
    loader: Callable[[dict], dict],
    patch_size: Sequence[int] | None = (192, 192, 80),
    num_classes: int = 1,
    **kwargs: Any,
) -> DataReport:
    """
    The ``check_data`` run: check the datalist with a progress bar, print the summary, write
    ``output_dir/data_check.json``, and exit non-zero with one message if any error was found.

    Args:
        data_list_file_path, dataset_dir, loader, patch_size, num_classes, kwargs: as `check_datalist`.
        output_dir: folder of the JSON report.
    """
    rank0 = output_dir is not None
    kwargs.setdefault("progress", rank0)
    report = check_datalist(data_list_file_path, dataset_dir, loader, patch_size, num_classes, **kwargs)
    path = _write_report(report, output_dir)
    if rank0:
        print(report.summary())
        print(f"data check report: {path}")
    if not report.ok:
        items = len({(f["section"], f["index"]) for f in report.errors})
        raise SystemExit(
            f"data check failed: {len(report.errors)} errors in {items} items of {report.datalist}; see {path}"
        )
    return report


def screen_datalists(
    policy: str,
    data_list_file_path: str,
    dataset_dir: str,
    loader: Callable[[dict], dict],
    patch_size: Sequence[int] | None,
    output_dir: str,
    quarantine: Quarantine | None = None,
    num_classes: int = 1,
    **kwargs: Any,
) -> dict[str, list[dict]]:
    """
    The datalist sections ready for MONAI datasets (``image`` made absolute), screened by the ``data_check`` policy.

    - ``"off"``: load the datalist and return it;
    - ``"strict"``: run `check_datalist`; on any error print the summary, write the report and exit non-zero;
    - ``"exclude"``: run the check, drop every item with an error (each listed in a warning), quarantine the
      dropped training images, write the report and go on; exit if no training item is left.

    Warnings never block. Under DDP every rank runs the check (so all return the same lists); only rank 0 prints
    and writes files.

    Args:
        policy: ``"strict"``, ``"exclude"`` or ``"off"``.
        data_list_file_path, dataset_dir, loader, patch_size, num_classes, kwargs: as `check_datalist`.
        output_dir: folder of the JSON report ``data_check.json``.
        quarantine: shared record of bad files the dropped training images are added to (source ``data_check``).
    """
    if policy not in POLICIES:
        raise ValueError(f"data_check must be one of {POLICIES}, got {policy!r}")
    sections = tuple(kwargs.pop("sections", ("training", "validation")))
    rank0 = output_dir is not None
    try:
        datalist = load_datalist(data_list_file_path)
    except DatalistError as e:
        raise SystemExit(str(e)) from None
    if not isinstance(datalist, dict):
        raise SystemExit(f"datalist {os.path.abspath(data_list_file_path)} must be a JSON object with a training list")

    def resolved(section: str, drop: set[int]) -> list[dict]:
        items = datalist.get(section) or []
        out = []
        for i, item in enumerate(items if isinstance(items, list) else []):
            if i in drop:
                continue
            if isinstance(item, dict) and isinstance(item.get("image"), str):
                item = {**item, "image": _resolve(item["image"], dataset_dir)}
            out.append(item)
        return out

    if policy == "off":
        return {s: resolved(s, set()) for s in sections}
    kwargs.setdefault("progress", rank0)
    report = check_datalist(
        data_list_file_path, dataset_dir, loader, patch_size, num_classes, sections=sections, **kwargs
    )
    path = _write_report(report, output_dir)
    if report.ok:
        if rank0:
            logger.info(report.summary())
        return {s: resolved(s, set()) for s in sections}
    if policy == "strict" or report.datalist_errors():
        if rank0:
            print(report.summary())
        why = "; ".join(f["message"] for f in report.datalist_errors())
        raise SystemExit(
            f"data check found {len(report.errors)} errors"
            + (f" in the datalist itself ({why})" if why else "")
            + f"; fix them{'' if why else ' or set data_check to exclude to train without the bad cases'}"
            + f" (report: {path})"
        )
    if rank0:
        logger.warning(report.summary())
    out = {}
    for section in sections:
        drop = report.bad_indices(section)
        for index in sorted(drop):
            found = [f for f in report.errors if f["section"] == section and f["index"] == index]
            image = found[0]["image"]
            reasons = "; ".join(f"{f['problem']}: {f['message']}" for f in found)
            if rank0:
                logger.warning(f"data check: dropped {section}[{index}] {image or '(no image)'}: {reasons}")
            problems = {f["problem"] for f in found}
            if section == "training" and quarantine is not None and image and problems != {"duplicate_image"}:
                quarantine.add(
                    image, "; ".join(sorted(problems)), source="data_check", problems=sorted(problems), index=index
                )
        out[section] = resolved(section, drop)
    if not out.get(sections[0]):
        raise SystemExit(
            f"data check excluded every {sections[0]} item of {report.datalist}: nothing left to train on; "
            f"fix the data (report: {path})"
        )
    if rank0:
        kept = ", ".join(f"{s} {len(v)}" for s, v in out.items())
        logger.warning(f"data check: excluded {sum(len(report.bad_indices(s)) for s in sections)} items; kept {kept}")
    return out
