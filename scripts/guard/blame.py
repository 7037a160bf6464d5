"""Which image files to blame for the events of a run, and when to quarantine one.

An LR blow-up fails every file alike and must blame none; a file with non-finite voxels fails every time it is
seen. `FileBlame` counts, per file, the iterations it took part in and the events it was held responsible for, and
decides from those counts alone, so the decision does not depend on the data set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scripts.distributed import gather_lists

__all__ = ["Blame", "FileBlame"]


@dataclass(frozen=True)
class Blame:
    """The files of one event (merged over the DDP ranks) and those of them to quarantine, with the reasons."""

    files: tuple[str, ...]
    quarantine: tuple[tuple[str, str], ...]


class FileBlame:
    """
    Per-file event statistics and the quarantine decision.

    A file is quarantined once it took part in ``quarantine_after`` events: at once for ``input`` events (its voxels
    are not finite), otherwise only if, seen at least 4 times, it failed in at least 3/4 of its iterations and twice
    as often as the iterations without it.

    Args:
        quarantine_after: events a file must take part in before it is quarantined (0: never).
    """

    def __init__(self, quarantine_after: int = 2) -> None:
        self.quarantine_after = quarantine_after
        self.stats: dict[str, list[int]] = {}  # file -> [events, iterations seen]
        self.iterations = 0
        self.events = 0

    def seen(self, files: Iterable[str]) -> None:
        """Count one iteration and the (distinct, non-empty) files that took part in it."""
        self.iterations += 1
        for path in {os.path.abspath(f) for f in files if f}:
            self.stats.setdefault(path, [0, 0])[1] += 1

    def blame(self, files: Iterable[str], kind: str) -> Blame:
        """
        Count one event of ``kind`` against this rank's ``files`` and decide which to quarantine.

        A collective under DDP: every rank records the same event and receives the files and decisions of all.
        """
        self.events += 1
        local = sorted({os.path.abspath(f) for f in files if f})
        candidates = []
        for f in local:
            stats = self.stats.setdefault(f, [0, 1])
            stats[0] += 1
            if self.quarantine_after and stats[0] >= self.quarantine_after and (kind == "input" or self._stands_out(f)):
                candidates.append((f, f"{stats[0]} events in {stats[1]} iterations (last: {kind})"))
        merged, candidates = gather_lists(local, candidates)
        return Blame(tuple(sorted(set(merged))), tuple((f, why) for f, why in candidates))

    def _stands_out(self, file: str) -> bool:
        """Whether ``file``, seen 4+ times, failed in 3/4 of its iterations and twice as often as the others."""
        events, seen = self.stats[file]
        others = (self.events - events) / max(self.iterations - seen, 1)
        return seen >= 4 and 4 * events >= 3 * seen and events / seen >= 2 * others

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": {k: list(v) for k, v in self.stats.items()},
            "iterations": self.iterations,
            "events": self.events,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {k: list(v) for k, v in state["stats"].items()}
        self.iterations = int(state["iterations"])
        self.events = int(state["events"])
