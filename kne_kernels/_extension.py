"""Loader of the C++ op library ``kne_kernels/_C*.so``: never breaks import, explains itself.

The library holds only kernel registrations (no Python bindings), so it is loaded with
``torch.ops.load_library``. A missing or unloadable library is recorded with the facts of the
build (written by setup.py into ``_build_info.json``) and of this process, and reported only when
a native kernel is asked for (and by ``python -m kne_kernels.info``).
"""

from __future__ import annotations

import glob
import json
import os
import platform
from typing import Any, Dict, Optional, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_STATE: Dict[str, Any] = {"tried": False, "loaded": False, "path": None, "error": None}


def build_info() -> Dict[str, Any]:
    """What setup.py recorded when it built the library (empty when it was never built here)."""
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def runtime_info() -> Dict[str, Any]:
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
            "cuda_available": torch.cuda.is_available()}


def library_path() -> Optional[str]:
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    return found[0] if found else None


def load() -> bool:
    """Load the library once; ``True`` when its kernels are registered."""
    if _STATE["tried"]:
        return _STATE["loaded"]
    _STATE["tried"] = True
    path = os.environ.get("KNE_KERNELS_LIBRARY") or library_path()
    if path is None:
        _STATE["error"] = ("the C++ library kne_kernels/_C was not built (installed with KNE_NO_EXT=1, or not "
                           "with `pip install --no-build-isolation -e .`)")
        return False
    _STATE["path"] = path
    try:
        torch.ops.load_library(path)
    except Exception as e:  # an ABI mismatch, a missing libcudart, ...
        built, now = build_info(), runtime_info()
        _STATE["error"] = (f"loading {os.path.basename(path)} failed: {type(e).__name__}: {e}. Built for torch "
                           f"{built.get('torch', '?')} (CUDA {built.get('torch_cuda')}, Python {built.get('python', '?')}); "
                           f"running torch {now['torch']} (CUDA {now['torch_cuda']}, Python {now['python']}). Rebuild "
                           "with `pip install --no-build-isolation -e .` against this torch")
        return False
    _STATE["loaded"] = True
    from . import _backends

    _backends.invalidate()  # new kernels: every cached choice of kernel is stale
    return True


def registered_keys(op_name: str = "neuron_attribution_") -> Tuple[str, ...]:
    """Dispatch keys with a kernel for ``kne::<op_name>`` (from the dispatcher's own table; parsed
    anew on every call: ``kne_kernels._backends`` caches what it concludes)."""
    dump = torch._C._dispatch_dump(f"kne::{op_name}")
    keys = []
    for line in dump.splitlines():
        if ": registered at" in line and not line.startswith("debug"):
            keys.append(line.split(":", 1)[0].split("[", 1)[0].strip())
    return tuple(keys)


def status(kind: str) -> Tuple[bool, str]:
    """``(live, reason)`` of the C++ ``cpu`` or ``cuda`` kernels as a whole (the library loaded and
    registered kernels for that dispatch key; uncached)."""
    if not load():
        return False, _STATE["error"]
    key = "CPU" if kind == "cpu" else "CUDA"
    if key not in registered_keys():
        if kind == "cuda":
            built = build_info()
            return False, (f"{os.path.basename(_STATE['path'])} was built without CUDA kernels (torch "
                           f"{built.get('torch', '?')}, with_cuda={built.get('with_cuda')}); rebuild with a CUDA torch "
                           "and nvcc, or FORCE_CUDA=1")
        return False, f"{os.path.basename(_STATE['path'])} registered no CPU kernels"
    if kind == "cuda" and not torch.cuda.is_available():
        return False, "the CUDA kernels are built, but torch sees no CUDA device"
    return True, f"{os.path.basename(_STATE['path'])} ({'CPU' if kind == 'cpu' else 'CUDA'} kernels)"
