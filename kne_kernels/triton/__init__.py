"""Triton kernels of the kne ops: ``triton/<module>.py`` beside ``ops/<module>.py``, each with its
``@triton.jit`` kernels (``_<op>_kernel``), their block configurations in one table, one launcher
per op with the torch kernel's signature (``<op>_triton``, found by ``kne_kernels._backends``) and
``aot_specs()``, every (kernel, signature, configuration) the launchers can run, which ``aot``
compiles ahead of time for sm_80/sm_90 (``python -m kne_kernels.triton.aot``).

They run on CUDA devices, and on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before they are imported (how CI checks them without a GPU).
"""

from __future__ import annotations

import os
from typing import Tuple


def status(device_type: str) -> Tuple[bool, str]:
    """``(live, reason)`` of the Triton kernels for tensors on ``device_type`` ("cpu"/"cuda")."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(e).__name__}: {e}); pip install 'kne[triton]'"
    interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
    if device_type == "cpu":
        if not interpret:
            return False, "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before import"
        return True, f"triton {triton.__version__} (interpreter)"
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if interpret:
        return True, f"triton {triton.__version__} (interpreter on CUDA tensors)"
    return True, f"triton {triton.__version__}"
