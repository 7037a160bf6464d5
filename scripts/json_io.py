"""Files written atomically, so a crash or a concurrent reader never sees half a report, datalist or cache file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

__all__ = ["write_atomically", "write_json"]


def write_atomically(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """
    Call ``write(temporary)`` on a new file in ``path``'s folder, then rename it to ``path`` (atomic on one file
    system): readers see the old file, the whole new one, or none. The temporary file is removed if writing fails.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, payload: Any, indent: int = 4, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``payload`` to ``path`` as JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=indent, default=default)
            f.write("\n")

    write_atomically(path, write, suffix=".json")
