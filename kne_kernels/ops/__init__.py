"""The kne ops, one module per public op; each module holds everything about its op but the
compiled kernels:

* the schema(s) of its dispatcher op(s) ``kne::<name>``;
* the pure-torch kernel: the default on every device and the reference the tests hold every other
  kernel to;
* the fake kernel (shapes only, for ``torch.compile``);
* the first-use self-check case (one small input, run before a GPU kernel is first trusted);
* the public, checked function, with the formula, shapes, dtypes and an example in its docstring.

Modules: ``neuron_attribution``, ``weight_attribution``, ``ensemble_select`` (three internal ops:
``ensemble_aggregate``, ``order_statistics``, ``threshold_mask``), ``ensemble_adamw_step`` and
``nullspace_project``. The backends live beside them under the same names:
``kne_kernels/triton/<module>.py``, ``csrc/cpu/<module>.cpp``, ``csrc/cuda/<module>.cu``. The
registry (``_registry``) finds the modules itself; ``kne_kernels._backends`` decides which kernel
runs.
"""

from ._registry import OpDef, define, modules, op, registry

__all__ = ["OpDef", "define", "modules", "op", "registry"]
