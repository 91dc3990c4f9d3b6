"""kne_kernels: the low-level ops under ``kne`` (usable on their own by other KNE codebases).

Ops: :func:`neuron_attribution`, :func:`weight_attribution`, :func:`ensemble_select`,
:func:`ensemble_adamw_step_`. This release ships the pure-torch reference implementation of
each (``kne_kernels.reference``); it is what every op runs today.
"""

from .reference import (
    EnsembleSelection,
    ensemble_adamw_step_,
    ensemble_select,
    neuron_attribution,
    percentile_linear,
    weight_attribution,
)

__version__ = "0.1.0"

__all__ = [
    "EnsembleSelection",
    "ensemble_adamw_step_",
    "ensemble_select",
    "neuron_attribution",
    "percentile_linear",
    "weight_attribution",
    "__version__",
]
