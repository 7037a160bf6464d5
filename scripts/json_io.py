"""JSON files written atomically, so a crash or a concurrent reader never sees half a report or datalist."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

__all__ = ["write_json"]


def write_json(path: str, payload: Any, indent: int = 4, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=indent, default=default)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
