"""kne's warnings: one class, carrying the advice twice -- for Python callers and for the command line."""

from __future__ import annotations

import warnings
from typing import Optional

__all__ = ["KNEWarning", "warn"]


class KNEWarning(UserWarning):
    """A warning of kne. ``str(w)`` is the Python caller's text; ``w.cli`` the same advice in the
    command line's terms (``--subject`` where Python says ``subject=``), or ``None`` when it is the same."""

    def __init__(self, text: str, cli: Optional[str] = None):
        super().__init__(text)
        self.cli = cli


def warn(text: str, *, cli: Optional[str] = None, stacklevel: int = 2) -> None:
    """``warnings.warn`` a :class:`KNEWarning` (``stacklevel`` counts from the caller of this function)."""
    warnings.warn(KNEWarning(text, cli), stacklevel=stacklevel + 1)
