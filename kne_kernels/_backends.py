"""Which implementation runs an op: backend names, availability with reasons, the first-use check.

Backends: ``torch`` (the pure-torch kernels of ``_ops``, any device), ``cpu`` (the C++ extension,
CPU tensors), ``triton`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (the
CUDA C++ extension). ``auto`` picks, per device, ``cpu`` then ``torch`` on CPU and ``triton``
then ``cuda`` then ``torch`` on CUDA. The default comes from ``KNE_BACKEND`` (else ``auto``).

The first time a GPU backend (``triton``/``cuda``) runs an op in a process, it is checked once
on a small case against the torch kernel; on a mismatch it warns once and that op falls back to
the next backend, so a wrong kernel never silently edits a model.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _extension, _ops

BACKENDS = ("torch", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
_LOCK = threading.Lock()
_CHECKED: Dict[Tuple[str, str, str], bool] = {}  # (op, backend, device) -> passed


def default_backend() -> str:
    name = os.environ.get("KNE_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"KNE_BACKEND={name!r} is not a backend: use one of auto, {', '.join(BACKENDS)}")
    return name


def status(backend: str, device_type: str) -> Tuple[bool, str]:
    """``(live, reason)`` of ``backend`` for tensors on ``device_type`` (``"cpu"``/``"cuda"``)."""
    if backend == "torch":
        return True, "pure-torch kernels (always available)"
    if backend == "cpu":
        if device_type != "cpu":
            return False, "the cpu backend runs CPU tensors only"
        return _extension.status("cpu")
    if backend == "cuda":
        if device_type != "cuda":
            return False, "the cuda backend runs CUDA tensors only"
        return _extension.status("cuda")
    if backend == "triton":
        from .triton import status as triton_status

        return triton_status(device_type)
    raise ValueError(f"unknown backend {backend!r}: use one of auto, {', '.join(BACKENDS)}")


def _device_type(device: torch.device) -> str:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"kne_kernels runs on CPU and CUDA tensors, not {device.type}")
    return device.type


def _implementation(op: str, backend: str) -> Callable:
    if backend == "torch":
        return _ops.TORCH_KERNELS[op]
    if backend in ("cpu", "cuda"):
        return _ops.op(op)  # the dispatcher routes CPU/CUDA tensors to the C++ kernels
    from .triton.kernels import KERNELS

    return KERNELS[op]


def resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend that will run on ``device``: an explicit one must be live (else ``RuntimeError``
    with the reason); ``auto`` takes the first live one in the device's order."""
    dtype = _device_type(device)
    name = (backend or default_backend()).lower()
    if name == "auto":
        for cand in _AUTO_ORDER[dtype]:
            if status(cand, dtype)[0]:
                return cand
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not a backend: use one of auto, {', '.join(BACKENDS)}")
    live, why = status(name, dtype)
    if not live:
        raise RuntimeError(f"backend {name!r} cannot run {dtype} tensors here: {why}. "
                           "Use backend='auto' (or KNE_BACKEND=auto), or see `python -m kne_kernels.info`")
    return name


def kernel(op: str, backend: Optional[str], device: torch.device) -> Tuple[str, Callable]:
    """``(backend name, callable)`` running ``op`` for tensors on ``device``."""
    name = resolve(backend, device)
    if device.type == "cuda" and name in ("triton", "cuda") and not _passes_check(op, name, device):
        others = [c for c in ("triton", "cuda") if c != name and status(c, "cuda")[0] and _passes_check(op, c, device)]
        name = others[0] if others else "torch"
    return name, _implementation(op, name)


def _passes_check(op: str, backend: str, device: torch.device) -> bool:
    key = (op, backend, str(device))
    if key not in _CHECKED:
        with _LOCK:
            if key not in _CHECKED:
                _CHECKED[key] = _first_use_check(op, backend, device)
    return _CHECKED[key]


def _first_use_check(op: str, backend: str, device: torch.device) -> bool:
    """Run one small case of ``op`` with ``backend`` and with the torch kernel; ``False`` (and one
    warning) on any mismatch or error."""
    from ._selfcheck import CASES

    try:
        ok, detail = CASES[op](_implementation(op, backend), _implementation(op, "torch"), device)
    except Exception as e:  # a kernel that cannot even run is as wrong as one that runs wrong
        ok, detail = False, f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"kne_kernels: the {backend} kernel of {op} disagreed with the reference on its first-use "
                      f"check on {device} ({detail}); falling back for this process", RuntimeWarning, stacklevel=3)
    return ok


def reset_checks() -> None:
    """Forget the first-use checks (tests)."""
    _CHECKED.clear()
