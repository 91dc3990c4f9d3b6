"""kne_kernels: the fused ops under ``kne``, usable on their own by other KNE codebases.

Ops (float32 results and optimizer state), one module each under ``kne_kernels.ops``:

* :func:`neuron_attribution` -- per-neuron ``sum_n scale[n] * act[n, d] * grad[n, d]``, per segment;
* :func:`weight_attribution` -- ``sum over dim of weight * grad`` (signed or absolute), one pass;
* :func:`ensemble_select` -- aggregate over requests, one global ``numpy.percentile`` threshold,
  exact at any size (radix select), masks, counts and per-layer indices;
* :func:`ensemble_adamw_step_` -- one fused AdamW step on a compact ensemble delta, written into
  the ensemble rows (or columns) of the weight in place;
* :func:`nullspace_project_` -- a compact row delta projected off the preserved key space
  (AlphaEdit), written into the ensemble rows of the weight in place.

Each op module defines its schemas (``torch.library``, namespace ``kne``), its pure-torch kernel
(the default on every device and the reference the other kernels are tested against), its fake
kernel for ``torch.compile``, its first-use self-check and the checked public function. The C++
(CPU, CUDA) and Triton kernels run on top. Every op takes ``backend=`` (``auto``, ``torch``,
``cpu``, ``triton``, ``cuda``; ``KNE_BACKEND`` sets the default): ``kne_kernels._backends``
decides which kernel runs. ``python -m kne_kernels.info`` says which backends are live here and
why the others are not.
"""

from . import ops

ops.define()

from . import _extension  # noqa: E402

_extension.load()  # never raises: a failure is recorded and reported when a C++ kernel is asked for

from ._backends import BACKENDS, default_backend, status  # noqa: E402
from ._checks import FLOAT_DTYPES  # noqa: E402
from .ops.ensemble_adamw_step import adamw_update_, ensemble_adamw_step_  # noqa: E402
from .ops.ensemble_select import EnsembleSelection, ensemble_select, percentile_linear  # noqa: E402
from .ops.neuron_attribution import neuron_attribution  # noqa: E402
from .ops.nullspace_project import nullspace_project_  # noqa: E402
from .ops.weight_attribution import weight_attribution  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "EnsembleSelection",
    "FLOAT_DTYPES",
    "adamw_update_",
    "default_backend",
    "ensemble_adamw_step_",
    "ensemble_select",
    "neuron_attribution",
    "nullspace_project_",
    "percentile_linear",
    "status",
    "weight_attribution",
    "__version__",
]
