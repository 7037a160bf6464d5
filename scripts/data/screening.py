"""The data check's policies, ``data_check``: what training and inference do with the cases the check refuses.

Training (`screen_datalists`) and inference (`screen_inputs`) run the check (`scripts.data.check`) under one of
``strict`` (refuse to start on any error), ``exclude`` (drop the bad cases, name each, and go on) or ``off`` (no
check). Dropped training images join the quarantine the NaN guard shares.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scripts.data.check import CaseWalk, DataCheckFailed, Loader, check_failed, write_report
from scripts.data.datalist import SECTIONS, DatalistError, load_datalist, resolved_items, section_items
from scripts.data.quarantine import Quarantine
from scripts.data.report import DataReport, Finding
from scripts.data.rules import CheckSettings
from scripts.errors import UserError

__all__ = ["POLICIES", "Rejected", "ScreenedInputs", "screen_datalists", "screen_inputs"]

logger = logging.getLogger(__name__)

POLICIES = ("strict", "exclude", "off")


@dataclass(frozen=True)
class Rejected:
    """
    An input the data check refused.

    Args:
        item: the input as given.
        errors: its error findings.
    """

    item: dict
    errors: list[Finding]


@dataclass(frozen=True)
class ScreenedInputs:
    """
    Inference inputs after the data check.

    Args:
        items: the usable inputs, in their order.
        rejected: the refused ones, with why.
        report_path: the JSON report (``None``: not written).
    """

    items: list[dict]
    rejected: list[Rejected]
    report_path: str | None


def screen_datalists(
    policy: str,
    data_list_file_path: str,
    dataset_dir: str,
    loader: Loader | None,
    patch_size: Sequence[int] | None,
    output_dir: str | None,
    quarantine: Quarantine | None = None,
    num_classes: int = 1,
    sections: Sequence[str] = SECTIONS,
    progress: bool | None = None,
    **settings: Any,
) -> dict[str, list[dict]]:
    """
    The datalist sections ready for MONAI datasets (``image`` made absolute), screened by the ``data_check`` policy.

    - ``"off"``: load the datalist and return it (the first section must exist);
    - ``"strict"``: run the check; on any error print the summary, write the report and raise `DataCheckFailed`;
    - ``"exclude"``: run the check, drop every item with an error (each listed in a warning), quarantine the
      dropped training images, write the report and go on; raise `DataCheckFailed` if no item of the first
      section is left.

    Warnings never block. Under DDP every rank runs the check (so all return the same lists); only rank 0 prints
    and writes files. The datalist is read once.

    Args:
        policy: ``"strict"``, ``"exclude"`` or ``"off"``.
        data_list_file_path, dataset_dir, loader, patch_size, num_classes, sections, settings: as `check_datalist`.
        output_dir: folder of the JSON report ``data_check.json`` (``None``: none, as on DDP ranks other than 0).
        quarantine: shared record of bad files the dropped training images are added to (source ``data_check``).
        progress: show a progress bar (default: where ``output_dir`` is set).
    """
    if policy not in POLICIES:
        raise UserError(f"data_check must be one of {POLICIES}, got {policy!r}")
    rank0 = output_dir is not None
    datalist = load_datalist(data_list_file_path)
    if policy == "off":
        first = sections[0]
        if not isinstance(datalist, dict) or not isinstance(datalist.get(first), list):
            path = os.path.abspath(data_list_file_path)
            raise DatalistError(path, "missing_section", f'no "{first}" list; check the datalist and its key')
        return {s: resolved_items(datalist, s, dataset_dir, set()) for s in sections}
    report = DataReport(data_list_file_path, dataset_dir)
    walk = CaseWalk(report, dataset_dir, loader, CheckSettings(patch_size, num_classes, **settings), annotated=True)
    walk.sections(section_items(datalist, sections, report), rank0 if progress is None else progress)
    path = write_report(report, output_dir)
    if report.ok:
        if rank0:
            logger.info(report.summary())
        return {s: resolved_items(datalist, s, dataset_dir, set()) for s in sections}
    if policy == "strict" or report.datalist_errors():
        if rank0:
            print(report.summary())
        hint = (
            "fix them" if report.datalist_errors() else "fix them, or set data_check to exclude to go on without them"
        )
        raise check_failed(report, path, hint)
    if rank0:
        logger.warning(report.summary())
    out = {}
    for section in sections:
        drop = report.bad_indices(section)
        for index in sorted(drop):
            found = report.item_errors(section, index)
            image = found[0].image
            if rank0:
                reasons = "; ".join(f"{f.problem}: {f.message}" for f in found)
                logger.warning(f"data check: dropped {section}[{index}] {image or '(no image)'}: {reasons}")
            problems = sorted({f.problem for f in found})
            if section == "training" and quarantine is not None and image and problems != ["duplicate_image"]:
                quarantine.add(image, "; ".join(problems), source="data_check", problems=problems, index=index)
        out[section] = resolved_items(datalist, section, dataset_dir, drop)
    if not out.get(sections[0]):
        raise DataCheckFailed(
            f"data check excluded every {sections[0]} item of {report.datalist}: nothing left to train on; "
            f"fix the data (report: {path})"
        )
    if rank0:
        kept = ", ".join(f"{s} {len(v)}" for s, v in out.items())
        logger.warning(f"data check: excluded {sum(len(report.bad_indices(s)) for s in sections)} items; kept {kept}")
    return out


def screen_inputs(
    items: list[dict],
    loader: Loader,
    output_dir: str | None,
    dataset_dir: str,
    section: str = "inputs",
    source: str = "",
    progress: bool | None = None,
    policy: str = "exclude",
    **settings: Any,
) -> ScreenedInputs:
    """
    Inference inputs checked like training images (no boxes, no patch-size warning) under the ``data_check``
    policy: ``"exclude"`` returns the usable ones and lists the others with their errors (for the caller to report),
    ``"strict"`` raises `DataCheckFailed` when any input has an error, ``"off"`` returns every input unchecked (a
    file that then fails to load is still reported for itself). The warnings are logged; the report goes to
    ``output_dir/data_check.json``.

    Args:
        items: the inputs of `scripts.inference.io.list_inputs`: ``image_name`` as written in the datalist (or
            relative to the folder), ``image`` resolved.
        loader: inference's loading path (see `check_datalist`).
        output_dir: folder of the JSON report (``None``: none).
        dataset_dir: the folder ``image_name`` is relative to.
        section: the name the inputs are reported under (the datalist key, or ``inputs``).
        source: the datalist or folder the inputs came from, named in the report.
        progress: show a progress bar (default: where ``output_dir`` is set).
        policy: ``"exclude"``, ``"strict"`` or ``"off"``.
        settings: see `scripts.data.rules.CheckSettings`.
    """
    if policy not in POLICIES:
        raise UserError(f"data_check must be one of {POLICIES}, got {policy!r}")
    if policy == "off":
        return ScreenedInputs(list(items), [], None)
    report = DataReport(source, dataset_dir)
    walk = CaseWalk(report, dataset_dir, loader, CheckSettings(**{"patch_size": None, **settings}), annotated=False)
    show = output_dir is not None if progress is None else progress
    walk.sections([(section, [{"image": item["image_name"]} for item in items])], show)
    path = write_report(report, output_dir)
    if policy == "strict" and not report.ok:
        raise check_failed(report, path, "fix them, or set data_check to exclude to run the others")
    bad = report.bad_indices(section)
    rejected = [Rejected(items[i], report.item_errors(section, i)) for i in sorted(bad)]
    for f in report.warnings:
        logger.warning(f"data check: {f.problem}: {f.message}")
    kept = [item for i, item in enumerate(items) if i not in bad]
    return ScreenedInputs(kept, rejected, path)
