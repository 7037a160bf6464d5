"""Problems the user can fix end a run with one line that names the file and what to do, not with a traceback.

Library code raises `UserError` (or a subclass) and stays testable; the configs call the functions that may raise it
through `exit_on_user_error`, which turns it into ``SystemExit(message)``. MONAI's bundle runner wraps any
``Exception`` raised inside a config expression in a "Failed to evaluate" traceback, but a `SystemExit` passes
through and Python prints just its message and exits with status 1. Every other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["UserError", "describe", "exit_on_user_error"]

T = TypeVar("T")


class UserError(Exception):
    """A problem in the user's inputs or settings; its message is one line naming the file and what to do."""


def exit_on_user_error(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, with a `UserError` turned into ``SystemExit`` carrying its one-line message."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        raise SystemExit(str(e)) from None


def describe(e: BaseException) -> str:
    """``"Type: first line of the message"``, never with an empty message (a bare ``MemoryError()`` has none)."""
    text = (str(e).splitlines() or [""])[0].strip()
    if len(text) > 120 and ". " in text[:200]:  # long library messages: their first sentence says it
        text = text[: text.index(". ", 0, 200) + 1]
    text = text[:200]
    if not text:
        text = "out of memory" if isinstance(e, MemoryError) else "no message"
    return f"{type(e).__name__}: {text}"
