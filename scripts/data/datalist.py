"""The datalist: the model zoo's (LUNA16) JSON of ``{"training": [...], "validation": [...]}`` items, each
``{"image": path, "box": [[cx, cy, cz, w, h, d], ...], "label": [...]}``. Reading it, its structure, and its items
made ready for MONAI datasets. What each item holds is judged by the data check (`scripts.data.check`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scripts.data.report import DataReport
from scripts.data.rules import no_boxes, resolve_image
from scripts.errors import UserError

__all__ = ["OPTIONAL_SECTIONS", "SECTIONS", "DatalistError", "load_datalist", "resolved_items", "section_items"]

# "selection": the model-selection set (`scripts.data.selection`); a datalist may have one, and the zoo's have none
SECTIONS = ("training", "selection", "validation")
OPTIONAL_SECTIONS = ("selection",)


class DatalistError(UserError):
    """The datalist file is missing (``code`` ``datalist_missing``), is not valid JSON (``datalist_invalid_json``),
    or, under the policy ``off``, has no list to use (``missing_section``)."""

    def __init__(self, path: str, code: str, detail: str) -> None:
        super().__init__(f"datalist {path}: {detail}")
        self.code, self.detail = code, detail


def load_datalist(data_list_file_path: str) -> Any:
    """The parsed datalist JSON; raises `DatalistError` naming the file when it is missing or not valid JSON."""
    path = os.path.abspath(str(data_list_file_path))
    if not os.path.isfile(path):
        raise DatalistError(path, "datalist_missing", "file does not exist; check data_list_file_path")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatalistError(path, "datalist_invalid_json", f"not valid JSON ({e})") from e


def section_items(datalist: Any, sections: Sequence[str], report: DataReport) -> list[tuple[str, list]]:
    """
    The datalist's structure: ``(section, items)`` for each of ``sections`` that is a list; what is wrong with the
    datalist itself (not a dict, a section missing, not a list, or empty) goes to ``report``. The first section is
    required (an error), the others may be missing (a warning), and one of `OPTIONAL_SECTIONS` may be missing
    without a word.
    """
    if not isinstance(datalist, dict):
        report.item(None, None).error("datalist_not_dict", f"must be a JSON object, got {type(datalist).__name__}")
        return []
    todo: list[tuple[str, list]] = []
    for k, section in enumerate(sections):
        severity = "error" if k == 0 else "warning"
        rec = report.item(section, None)
        if section not in datalist:
            if k == 0 or section not in OPTIONAL_SECTIONS:
                rec.add(severity, "missing_section", f'no "{section}" section (it has {sorted(datalist)})')
        elif not isinstance(datalist[section], list):
            rec.error("bad_section", f'"{section}" must be a list of items')
        else:
            if not datalist[section]:
                rec.add(severity, "empty_section", f'"{section}" is empty')
            todo.append((section, datalist[section]))
    return todo


def resolved_items(datalist: dict, section: str, dataset_dir: str, drop: set[int]) -> list[dict]:
    """
    The items of ``section`` not in ``drop``, each ``image`` made absolute, and a ``box`` that holds no box (``[]``,
    ``[[]]``) made an empty ``(0, 6)`` array: MONAI's box transforms take no other shape of "no box".
    """
    items = datalist.get(section) or []
    out = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        if i in drop:
            continue
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            item = {**item, "image": resolve_image(item["image"], dataset_dir)}
        if isinstance(item, dict) and no_boxes(item.get("box")):
            item = {**item, "box": np.zeros((0, 6), dtype=np.float32)}
        out.append(item)
    return out
