"""Optional dependencies (pip extras) and the error that names the one missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message names the pip command."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` saying that ``feature`` needs the
    ``kne[extra]`` extra (for example ``require("matplotlib", "plots", "kne plot")``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{feature} needs {module.split('.')[0]}, which is not installed ({e}): "
                                f"pip install 'kne[{extra}]'") from None
