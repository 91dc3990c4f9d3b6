"""kne_kernels: the fused ops under ``kne``, usable on their own by other KNE codebases.

Ops (float32 results and optimizer state):

* :func:`neuron_attribution` -- per-neuron ``sum_n scale[n] * act[n, d] * grad[n, d]``, per segment;
* :func:`weight_attribution` -- ``sum over dim of weight * grad`` (signed or absolute), one pass;
* :func:`ensemble_select` -- aggregate over requests, one global ``numpy.percentile`` threshold,
  exact at any size (radix select), masks, counts and per-layer indices;
* :func:`ensemble_adamw_step_` -- one fused AdamW step on a compact ensemble delta, written into
  the ensemble rows (or columns) of the weight in place;
* :func:`nullspace_project_` -- a compact row delta projected off the preserved key space
  (AlphaEdit), written into the ensemble rows of the weight in place.

Schemas are defined once with ``torch.library`` (namespace ``kne``, see ``kne_kernels._ops``), with
the pure-torch kernel as the default and a fake kernel for ``torch.compile``; the C++ extension
(CPU, CUDA) and Triton kernels run on top. Every op takes ``backend=`` (``auto``, ``torch``,
``cpu``, ``triton``, ``cuda``); ``KNE_BACKEND`` sets the default. ``python -m kne_kernels.info``
says which backends are live here and why the others are not. ``kne_kernels.reference`` holds
plain pure-torch versions of the public functions.
"""

from . import _ops

_ops.define()

from . import _extension  # noqa: E402

_extension.load()  # never raises: a failure is recorded and reported when a C++ kernel is asked for

from . import reference  # noqa: E402
from ._backends import BACKENDS, default_backend, status  # noqa: E402
from .api import (  # noqa: E402
    EnsembleSelection,
    ensemble_adamw_step_,
    ensemble_select,
    neuron_attribution,
    nullspace_project_,
    weight_attribution,
)
from .reference import FLOAT_DTYPES, percentile_linear  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "EnsembleSelection",
    "FLOAT_DTYPES",
    "default_backend",
    "ensemble_adamw_step_",
    "ensemble_select",
    "neuron_attribution",
    "nullspace_project_",
    "percentile_linear",
    "reference",
    "status",
    "weight_attribution",
    "__version__",
]
