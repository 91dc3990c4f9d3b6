"""kne: fast KNE (Knowledge Neuronal Ensemble) knowledge editing for Hugging Face models.

>>> import kne
>>> model, tok = kne.load_model()                       # embedded SmolLM2-135M-Instruct, offline
>>> res = kne.fast_edit(model, tok, {"prompt": "The capital of France is", "target_new": "Rome"})
>>> kne.evaluate(model, tok, res.requests)              # EasyEdit's metrics
>>> res.restore()                                       # every weight back, bit for bit

The names below are imported on first use (PEP 562), so ``import kne`` -- and the ``kne`` command
line, which starts by importing ``kne.cli`` -- does not load torch and transformers before it has
to: a Ctrl-C during that start-up reaches the command line's own handler.
"""

from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.2.0"

_EXPORTS = {
    "register_architecture": "adapters", "supported_model_types": "adapters",
    "Attribution": "attribution", "attribute": "attribution", "locate": "attribution",
    "KNEConfig": "config",
    "EditError": "result", "EditResult": "result", "CapacityError": "result", "Editor": "editor", "fast_edit": "editing", "ModelBusyError": "_exclusive",
    "apply_edit": "editfile", "read_edit": "editfile", "revert_edit": "editfile",
    "Ensemble": "ensemble",
    "EvalResult": "evaluation", "evaluate": "evaluation",
    "load_model": "models",
    "EditRequest": "requests", "load_knowedit": "requests",
}
_MODULES = ("baselines", "datasets", "plots", "reference")

__all__ = [
    "apply_edit", "read_edit", "revert_edit", "Attribution", "CapacityError", "EditError", "Editor", "EditRequest", "EditResult", "Ensemble", "EvalResult", "KNEConfig",
    "ModelBusyError",
    "attribute", "baselines", "datasets", "evaluate", "plots", "fast_edit", "load_knowedit", "load_model", "locate", "reference",
    "register_architecture", "supported_model_types", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:  # any other submodule (kne.models, kne.nullspace, ...), as an eager package would have it
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
