"""``weight_attribution``: ``sum over dim of weight * grad`` (or of ``|weight * grad|``), one pass.

Dispatcher op ``kne::weight_attribution_(Tensor(a!) out, Tensor weight, Tensor grad, int dim, bool
absolute) -> ()``: ``out += sum over dim of weight * grad`` (``|weight * grad|`` when
``absolute``), products and sums in float32. ``weight``/``grad`` ``[R, C]`` (fp32/fp16/bf16, one
dtype); ``out`` fp32 ``[R]`` (``dim=1``) or ``[C]`` (``dim=0``). Kernels:
``triton/weight_attribution.py``, ``csrc/cpu/weight_attribution.cpp``,
``csrc/cuda/weight_attribution.cu``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backends, _checks
from ._registry import OpDef, close, generator


def weight_attribution_torch(out: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dim: int,
                             absolute: bool) -> None:
    """The pure-torch kernel (the default, and the reference)."""
    prod = weight.float() * grad.float()
    if absolute:
        prod = prod.abs()
    out.add_(prod.sum(dim))


def _fake(out, weight, grad, dim, absolute) -> None:
    return None


def _selfcheck(impl, ref, device):
    g = generator()
    w = torch.randn(65, 33, generator=g).to(device)
    gr = torch.randn(65, 33, generator=g).to(device)
    for dim in (0, 1):
        a = torch.zeros(w.shape[1 - dim], device=device)
        b = torch.zeros(w.shape[1 - dim], device=device)
        impl(a, w, gr, dim, dim == 0)
        ref(b, w, gr, dim, dim == 0)
        ok, why = close(a, b, 1e-5)
        if not ok:
            return ok, f"dim={dim}: {why}"
    return True, ""


OPS = (OpDef("weight_attribution_", "(Tensor(a!) out, Tensor weight, Tensor grad, int dim, bool absolute) -> ()",
             weight_attribution_torch, _fake, _selfcheck),)


def weight_attribution(weight: torch.Tensor, grad: torch.Tensor, *, dim: int = 1, absolute: bool = False,
                       out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``sum over dim of weight * grad`` (or of ``|weight * grad|``), float32, one pass.

    ``weight``/``grad``: 2-D ``[R, C]``, float32/float16/bfloat16, same dtype. ``dim=1`` (or -1)
    gives one score per row ``[R]``, ``dim=0`` (or -2) one per column ``[C]``. ``absolute``:
    ``True``/``False``. With ``out`` (float32, sharing no memory with the inputs) the result is
    added in place and ``out`` is returned.

    >>> w, g = torch.randn(5, 3), torch.randn(5, 3)
    >>> torch.allclose(weight_attribution(w, g, dim=0), (w * g).sum(0), atol=1e-6)
    True
    """
    _checks.tensor("weight", weight, _checks.FLOAT_DTYPES, dim=2)
    _checks.tensor("grad", grad, _checks.FLOAT_DTYPES, dim=2)
    if weight.dtype != grad.dtype:
        raise TypeError(f"weight ({weight.dtype}) and grad ({grad.dtype}) must have the same dtype")
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} must have the same shape")
    if dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 0 (per column) or 1 (per row), got {dim}")
    absolute = _checks.flag("absolute", absolute)
    dim = dim % 2
    device = _checks.same_device(weight=weight, grad=grad, out=out)
    want = (weight.shape[1 - dim],)
    if out is not None:
        _checks.tensor("out", out, (torch.float32,), dim=1)
        if tuple(out.shape) != want:
            raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
        _checks.no_overlap("weight_attribution", {"out": out}, {"weight": weight, "grad": grad})
        target = out
    else:
        target = torch.zeros(want, dtype=torch.float32, device=device)
    if weight.numel():
        _backends.kernel("weight_attribution_", backend, device)[1](target, weight, grad, dim, absolute)
    return target
