"""Which kernel runs an op: the one place that decides, for ``(op, backend, device)``.

Backends: ``torch`` (the pure-torch kernel of the op module, any device), ``cpu`` (the C++ library,
CPU tensors), ``triton`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (the
CUDA C++ kernels). A requested name comes from the call's ``backend=``, else ``KNE_BACKEND``, else
``auto``.

* ``auto`` takes, per device, the first live kernel of ``cpu``, ``torch`` (CPU tensors) or
  ``triton``, ``cuda``, ``torch`` (CUDA tensors); the torch kernel always runs, so ``auto`` never
  fails for want of a backend.
* A named backend runs or raises ``RuntimeError`` with the reason (not built, no GPU, no kernel
  for this op, failed its check); it is never replaced by another.
* The first time a GPU kernel (``triton``/``cuda`` on a CUDA device) is chosen for an op and
  device in a process, it runs the op's self-check case against the torch kernel. If it fails,
  ``auto`` warns once and takes the next candidate; a named backend raises.

Every answer (a kernel, or the error) is cached per process and key ``(op, name, device)``; loading
the C++ library again (``_extension.load``) clears the cache. ``status`` is cached the same way.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _extension

BACKENDS = ("torch", "cpu", "triton", "cuda")
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
_GPU_BACKENDS = ("triton", "cuda")

_LOCK = threading.RLock()
# (op, requested name, device type, device index) -> (backend name, kernel) or the error to raise
_CHOICES: Dict[tuple, object] = {}
_STATUS: Dict[Tuple[str, str], Tuple[bool, str]] = {}
_CHECKED: Dict[Tuple[str, str, str], Tuple[bool, str]] = {}  # (op, backend, device) -> (passed, detail)


def default_backend() -> str:
    """``KNE_BACKEND`` (lower case), else ``"auto"``; ``ValueError`` for a name that is no backend."""
    name = os.environ.get("KNE_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"KNE_BACKEND={name!r} is not a backend: use one of auto, {', '.join(BACKENDS)}")
    return name


def invalidate() -> None:
    """Forget every cached choice, status and first-use check (called when a library loads)."""
    with _LOCK:
        _CHOICES.clear()
        _STATUS.clear()
        _CHECKED.clear()


def status(backend: str, device_type: str) -> Tuple[bool, str]:
    """``(live, reason)`` of ``backend`` for tensors on ``device_type`` (``"cpu"``/``"cuda"``), for
    the ops as a whole (one op may still lack a kernel: see :func:`kernel`). Cached."""
    key = (backend, device_type)
    got = _STATUS.get(key)
    if got is None:
        got = _STATUS[key] = _status(backend, device_type)
    return got


def _status(backend: str, device_type: str) -> Tuple[bool, str]:
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


def implementation(op: str, backend: str) -> Callable:
    """The kernel of ``backend`` for ``op``, with the schema's signature, unchecked (no liveness, no
    first-use check): the torch kernel, the dispatcher op (which reaches the C++ kernel of the
    tensors' device) or the Triton launcher."""
    from .ops import op as dispatcher_op, registry

    d = registry()[op]
    if backend == "torch":
        return d.torch
    if backend in ("cpu", "cuda"):
        return dispatcher_op(op)
    if backend == "triton":
        return getattr(importlib.import_module(f"kne_kernels.triton.{d.module}"), d.launcher)
    raise ValueError(f"unknown backend {backend!r}: use one of auto, {', '.join(BACKENDS)}")


def _op_status(op: str, backend: str, device_type: str) -> Tuple[bool, str]:
    """``status`` narrowed to one op: the C++ library registered a kernel for it, the Triton
    module has a launcher for it."""
    live, why = status(backend, device_type)
    if not live or backend == "torch":
        return live, why
    if backend in ("cpu", "cuda"):
        key = "CPU" if backend == "cpu" else "CUDA"
        if key not in _extension.registered_keys(op):
            return False, f"the C++ library has no {key} kernel for kne::{op}"
        return True, why
    try:
        implementation(op, backend)
    except (ImportError, AttributeError) as e:
        return False, f"no Triton kernel for kne::{op} ({type(e).__name__}: {e})"
    return True, why


def _first_use_check(op: str, backend: str, device: torch.device) -> Tuple[bool, str]:
    """Run the op's self-check case with ``backend`` and with the torch kernel, once per process,
    op and device: ``(passed, detail)``; a kernel that raises fails."""
    key = (op, backend, str(device))
    got = _CHECKED.get(key)
    if got is None:
        from .ops import registry

        try:
            got = registry()[op].selfcheck(implementation(op, backend), registry()[op].torch, device)
        except Exception as e:  # a kernel that cannot even run is as wrong as one that runs wrong
            got = (False, f"{type(e).__name__}: {e}")
        _CHECKED[key] = got
    return got


def _choose(op: str, requested: str, device: torch.device) -> Tuple[str, Callable]:
    dtype = device.type
    if dtype not in AUTO_ORDER:
        raise ValueError(f"kne_kernels runs on CPU and CUDA tensors, not {dtype}")
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"backend={requested!r} is not a backend: use one of auto, {', '.join(BACKENDS)}")
    from .ops import registry

    if op not in registry():
        raise ValueError(f"kne::{op} is not an op: one of {', '.join(registry())}")
    for cand in (AUTO_ORDER[dtype] if requested == "auto" else (requested,)):
        live, why = _op_status(op, cand, dtype)
        if not live:
            if requested == "auto":
                continue
            raise RuntimeError(f"backend {cand!r} cannot run {dtype} tensors here: {why}. Use "
                               "backend='auto' (or KNE_BACKEND=auto), or see `python -m kne_kernels.info`")
        if dtype == "cuda" and cand in _GPU_BACKENDS:
            ok, detail = _first_use_check(op, cand, device)
            if not ok:
                if requested != "auto":
                    raise RuntimeError(f"the {cand} kernel of kne::{op} disagreed with the torch kernel on its "
                                       f"first-use check on {device} ({detail}); backend={cand!r} was asked for, so "
                                       "nothing else runs in its place. Use backend='auto' to fall back")
                warnings.warn(f"kne_kernels: the {cand} kernel of kne::{op} disagreed with the torch kernel on its "
                              f"first-use check on {device} ({detail}); backend='auto' falls back to the next "
                              "backend for this process", RuntimeWarning, stacklevel=4)
                continue
        return cand, implementation(op, cand)
    raise AssertionError("unreachable: the torch kernel is always live")  # pragma: no cover


def kernel(op: str, backend: Optional[str], device: torch.device) -> Tuple[str, Callable]:
    """``(backend name, kernel)`` running ``op`` for tensors on ``device`` (see the module
    docstring for the rules); cached per process. Raises ``ValueError`` (no such backend, device or
    op) or ``RuntimeError`` (a named backend that cannot run)."""
    requested = default_backend() if backend is None else str(backend).strip().lower() or "auto"
    key = (op, requested, device.type, device.index)
    got = _CHOICES.get(key)
    if got is None:
        with _LOCK:
            got = _CHOICES.get(key)
            if got is None:
                try:
                    got = _choose(op, requested, device)
                except RuntimeError as e:  # a backend that cannot run: the same error on every call
                    got = e
                _CHOICES[key] = got
    if isinstance(got, RuntimeError):
        raise RuntimeError(str(got))
    return got


def resolve(backend: Optional[str], device: torch.device, op: str = "neuron_attribution_") -> str:
    """The name of the backend that runs ``op`` (default: any op with kernels on every backend)
    on ``device`` under ``backend``; raises as :func:`kernel` does."""
    return kernel(op, backend, device)[0]
