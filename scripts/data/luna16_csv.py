"""The LUNA16 download's tables and the LUNA16 submission format, read and written with every bad line named.

- ``annotations.csv`` and ``annotations_excluded.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm``, one finding
  a row, its centre in world millimetres (LPS); excluded findings may have ``diameter_mm`` -1 (none measured).
- ``seriesuids.csv``: one uid a line, no header (all 888 scans of LUNA16).
- A submission (``seriesuid,coordX,coordY,coordZ,probability``): one candidate a row, LPS world millimetres.

Python's ``csv`` module reads them; this module adds the checks a user needs (the file and line of each problem),
which no MONAI or torch reader has.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scripts.errors import UserError
from scripts.json_io import write_atomically

__all__ = [
    "Candidate",
    "Finding",
    "Luna16TableError",
    "FINDING_COLUMNS",
    "SUBMISSION_COLUMNS",
    "read_findings",
    "read_seriesuids",
    "read_submission",
    "seriesuid_of",
    "write_submission",
]

FINDING_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")


class Luna16TableError(UserError):
    """A LUNA16 table (or submission) is missing or has a bad line; the message names the file and the line."""


@dataclass(frozen=True)
class Finding:
    """
    One row of annotations.csv or annotations_excluded.csv.

    Args:
        seriesuid: the scan.
        center: ``(x, y, z)`` world millimetres, LPS.
        diameter_mm: the diameter (-1 in excluded rows where none was measured).
        line: the line of the file it was read from (1 is the header).
    """

    seriesuid: str
    center: tuple[float, float, float]
    diameter_mm: float
    line: int = 0


@dataclass(frozen=True)
class Candidate:
    """
    One row of a LUNA16 submission.

    Args:
        seriesuid: the scan.
        center: ``(x, y, z)`` world millimetres, LPS.
        probability: the detection score.
        source: the file it was read from (``""`` when made in memory).
        line: its line in that file.
    """

    seriesuid: str
    center: tuple[float, float, float]
    probability: float
    source: str = ""
    line: int = 0


def seriesuid_of(image: str) -> str:
    """The LUNA16 seriesuid of an image path: its file name without the image suffix (``.nii.gz``, ``.mhd``, ...)."""
    name = os.path.basename(str(image))
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _rows(path: str, columns: Sequence[str], what: str) -> Iterable[tuple[int, dict[str, str]]]:
    """``(line, row)`` of a CSV file whose header holds ``columns``; raises `Luna16TableError` naming the file."""
    if not os.path.isfile(path):
        raise Luna16TableError(f"{what} {os.path.abspath(path)} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise Luna16TableError(
                f"{what} {os.path.abspath(path)}: the header {header} lacks {missing} (expected {','.join(columns)})"
            )
        reader.fieldnames = header
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            yield reader.line_num, {k: (row.get(k) or "").strip() for k in columns}


def _number(value: str, column: str, path: str, line: int, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise Luna16TableError(
            f"{what} {os.path.abspath(path)} line {line}: {column} is {value!r}, not a finite number"
        )
    return number


def _uid(value: str, path: str, line: int, what: str) -> str:
    if not value:
        raise Luna16TableError(f"{what} {os.path.abspath(path)} line {line}: empty seriesuid")
    return value


def read_findings(path: str, what: str = "annotations") -> dict[str, list[Finding]]:
    """
    The findings of an annotations table, by seriesuid, in file order. A diameter must be positive, or -1 (no
    measurement, as in annotations_excluded.csv). ``what`` names the table in errors.
    """
    out: dict[str, list[Finding]] = {}
    for line, row in _rows(path, FINDING_COLUMNS, what):
        uid = _uid(row["seriesuid"], path, line, what)
        center = tuple(_number(row[c], c, path, line, what) for c in FINDING_COLUMNS[1:4])
        diameter = _number(row["diameter_mm"], "diameter_mm", path, line, what)
        if diameter <= 0 and diameter != -1:
            raise Luna16TableError(
                f"{what} {os.path.abspath(path)} line {line}: diameter_mm {row['diameter_mm']} must be > 0 (or -1)"
            )
        out.setdefault(uid, []).append(Finding(uid, center, diameter, line))  # type: ignore[arg-type]
    return out


def read_seriesuids(path: str) -> list[str]:
    """The uids of seriesuids.csv (one a line, no header; blank lines skipped), in file order; a repeat is an error."""
    if not os.path.isfile(path):
        raise Luna16TableError(f"seriesuids {os.path.abspath(path)} does not exist")
    uids: list[str] = []
    seen: dict[str, int] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            if len(cells) != 1:
                raise Luna16TableError(
                    f"seriesuids {os.path.abspath(path)} line {line}: expected one uid, got {len(cells)} cells"
                )
            uid = cells[0]
            if uid in seen:
                raise Luna16TableError(
                    f"seriesuids {os.path.abspath(path)} line {line}: {uid} is listed again (first at line {seen[uid]})"
                )
            seen[uid] = line
            uids.append(uid)
    return uids


def read_submission(paths: str | Sequence[str]) -> list[Candidate]:
    """The candidates of one submission file, or of several (the ten folds' files) one after another."""
    out: list[Candidate] = []
    for path in [paths] if isinstance(paths, str) else list(paths):
        for line, row in _rows(path, SUBMISSION_COLUMNS, "submission"):
            uid = _uid(row["seriesuid"], path, line, "submission")
            center = tuple(_number(row[c], c, path, line, "submission") for c in SUBMISSION_COLUMNS[1:4])
            probability = _number(row["probability"], "probability", path, line, "submission")
            out.append(Candidate(uid, center, probability, os.path.abspath(path), line))  # type: ignore[arg-type]
    return out


def write_submission(path: str, candidates: Iterable[Candidate]) -> None:
    """Write ``candidates`` as a LUNA16 submission file, atomically (full float precision)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SUBMISSION_COLUMNS)
            for c in candidates:
                writer.writerow([c.seriesuid, *(repr(float(v)) for v in c.center), repr(float(c.probability))])

    write_atomically(path, write, suffix=".csv")
