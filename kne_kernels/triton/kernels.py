"""``KERNELS``: op name -> Triton launcher, each with exactly the signature of the op's torch kernel
(``kne_kernels._ops.TORCH_KERNELS``). Imported only when the triton backend is selected; under
``TRITON_INTERPRET=1`` (set before this import) the kernels run on CPU tensors.
"""

from __future__ import annotations

from .ensemble_adamw import ensemble_adamw_step_
from .ensemble_select import ensemble_aggregate, order_statistics, threshold_mask
from .neuron_attribution import neuron_attribution_
from .nullspace_project import nullspace_project_
from .weight_attribution import weight_attribution_

KERNELS = {
    "neuron_attribution_": neuron_attribution_,
    "weight_attribution_": weight_attribution_,
    "ensemble_aggregate": ensemble_aggregate,
    "order_statistics": order_statistics,
    "threshold_mask": threshold_mask,
    "ensemble_adamw_step_": ensemble_adamw_step_,
    "nullspace_project_": nullspace_project_,
}
