"""The findings of a data check: one record per problem, recorded per item, summarised for people and as JSON."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scripts.json_io import write_json

__all__ = ["DataReport", "Finding", "ItemRecorder"]

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    """
    One problem found by the data check.

    Args:
        section: the datalist section (``None`` for the datalist itself).
        index: the item's position in its section (``None`` for the datalist or a section as a whole).
        image: the item's image as an absolute path (``""`` when unknown).
        severity: ``"error"`` (the item cannot be used) or ``"warning"`` (it can).
        problem: a short code (see `scripts.data.check`).
        message: human text naming where it is and the file.
        details: the numbers behind the message.
    """

    section: str | None
    index: int | None
    image: str
    severity: str
    problem: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class DataReport:
    """
    The findings of a data check, in the order found, with the number of items checked per section.

    Args:
        datalist: the datalist file checked (``""`` when the items did not come from one).
        dataset_dir: the folder relative image paths are joined to.
    """

    def __init__(self, datalist: str = "", dataset_dir: str = "") -> None:
        self.datalist = os.path.abspath(str(datalist)) if datalist else ""
        self.dataset_dir = os.path.abspath(str(dataset_dir)) if dataset_dir else ""
        self.findings: list[Finding] = []
        self.checked: Counter[str] = Counter()  # items seen per section
        self.no_boxes = 0  # items with no boxes and no labels (valid)

    def item(self, section: str | None, index: int | None, image: str = "") -> ItemRecorder:
        """A recorder of findings bound to one item (or, with ``index`` ``None``, to a section or the datalist)."""
        return ItemRecorder(self, section, index, image)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def bad_images(self, section: str) -> set[str]:
        """Absolute paths of the images of ``section`` with at least one error."""
        return {f.image for f in self.errors if f.section == section and f.image}

    def bad_indices(self, section: str) -> set[int]:
        """Positions in ``section`` of the items with at least one error."""
        return {f.index for f in self.errors if f.section == section and f.index is not None}

    def item_errors(self, section: str, index: int) -> list[Finding]:
        """The errors of one item."""
        return [f for f in self.errors if f.section == section and f.index == index]

    def items_with_errors(self) -> int:
        return len({(f.section, f.index) for f in self.errors})

    def datalist_errors(self) -> list[Finding]:
        """Errors of the datalist as a whole (no item to drop)."""
        return [f for f in self.errors if f.index is None]

    def summary(self) -> str:
        """Readable multi-line text: totals, counts per problem, then one line per finding (errors first)."""
        items = ", ".join(f"{s} {n}" for s, n in self.checked.items())
        lines = [
            f"data check of {self.datalist or '(datalist)'}: {sum(self.checked.values())} items"
            + (f" ({items})" if items else "")
            + f", {len(self.errors)} errors, {len(self.warnings)} warnings"
            + f", {self.items_with_errors()} items with errors"
        ]
        if self.no_boxes:
            lines.append(f"  items without boxes (valid negatives): {self.no_boxes}")
        for severity, found in (("errors", self.errors), ("warnings", self.warnings)):
            if found:
                counts = Counter(f.problem for f in found)
                lines.append(f"{severity} by problem: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines += [f"  ERROR   {f.problem}: {f.message}" for f in self.errors]
        lines += [f"  WARNING {f.problem}: {f.message}" for f in self.warnings]
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
            "problems": dict(Counter(f.problem for f in self.findings)),
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }

    def to_json(self, path: str) -> None:
        """Write the report to ``path`` atomically."""
        write_json(str(path), self.to_dict(), indent=2, default=str)


@dataclass
class ItemRecorder:
    """
    Records the findings of one item into its report, so that each check names only the problem.
    Each message is prefixed with where it is: ``section[index] file:`` (or ``datalist FILE:`` for the datalist).

    Args:
        report: the report the findings go to.
        section, index, image: where the findings are (see `Finding`).
    """

    report: DataReport
    section: str | None
    index: int | None
    image: str = ""
    errors: int = 0  # errors recorded through this recorder

    def error(self, problem: str, message: str, **details: Any) -> None:
        """Record a problem that makes the item unusable."""
        self.errors += 1
        self._add(ERROR, problem, message, details)

    def warning(self, problem: str, message: str, **details: Any) -> None:
        """Record a problem the item can be used with."""
        self._add(WARNING, problem, message, details)

    def add(self, severity: str, problem: str, message: str, **details: Any) -> None:
        """Record a problem of the given severity (``"error"`` or ``"warning"``)."""
        (self.error if severity == ERROR else self.warning)(problem, message, **details)

    def _add(self, severity: str, problem: str, message: str, details: dict[str, Any]) -> None:
        where = f"{self.section}[{self.index}] " if self.section is not None and self.index is not None else ""
        what = self.image or (f"datalist {self.report.datalist}" if self.index is None else "(no image)")
        finding = Finding(self.section, self.index, self.image, severity, problem, f"{where}{what}: {message}", details)
        self.report.findings.append(finding)
