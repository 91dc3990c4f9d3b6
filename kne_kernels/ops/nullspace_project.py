"""``nullspace_project_``: a compact row delta projected off the preserved key space (AlphaEdit),
then written into the ensemble rows of the weight in place.

Dispatcher op ``kne::nullspace_project_(Tensor(a!) weight, Tensor index, Tensor(b!) delta, Tensor
basis, Tensor base, float scale) -> ()``: ``delta -= (delta @ basis) @ basis^T`` (fp32 ``delta``
``[K, in]``, fp32 ``basis`` ``[in, r]`` with orthonormal columns; products and sums in fp32), then
``weight[index] = (base + scale * delta).to(weight.dtype)`` (rows; ``base`` ``[K, in]`` in the
weight's dtype). Kernels: ``triton/nullspace_project.py``, ``csrc/cpu/nullspace_project.cpp``,
``csrc/cuda/nullspace_project.cu``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backends, _checks
from ._registry import OpDef, close, generator


def nullspace_project_torch(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, basis: torch.Tensor,
                            base: torch.Tensor, scale: float) -> None:
    """The pure-torch kernel (the default, and the reference): two float32 GEMMs, then
    ``index_copy_``."""
    if basis.shape[1]:
        delta.sub_((delta @ basis) @ basis.t())
    weight.index_copy_(0, index, (base.float() + scale * delta).to(weight.dtype))


def _fake(weight, index, delta, basis, base, scale) -> None:
    return None


def _selfcheck(impl, ref, device):
    basis = torch.linalg.qr(torch.randn(77, 20, generator=generator())).Q.contiguous().to(device)
    idx = torch.tensor([1, 5, 6], device=device)
    res = []
    for fn in (impl, ref):
        w = torch.randn(9, 77, generator=generator(3)).to(device)
        delta = torch.randn(3, 77, generator=generator(4)).to(device)
        fn(w, idx, delta, basis, w[idx].clone(), 0.3)
        res.append((w, delta))
    ok, why = close(res[0][0], res[1][0], 1e-5)
    if ok:
        ok, why = close(res[0][1], res[1][1], 1e-5)
    return ok, why


OPS = (OpDef("nullspace_project_",
             "(Tensor(a!) weight, Tensor index, Tensor(b!) delta, Tensor basis, Tensor base, float scale) -> ()",
             nullspace_project_torch, _fake, _selfcheck),)


def nullspace_project_(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, basis: torch.Tensor,
                       base: torch.Tensor, *, scale: float, backend: Optional[str] = None) -> None:
    """Project a compact row delta off the preserved key space, then rewrite the ensemble rows.

    ``delta`` (float32 ``[K, in]``, the rows ``index`` of ``weight [out, in]``) becomes
    ``delta - (delta @ basis) @ basis^T`` in place, and ``weight[index] = base + scale * delta``
    (cast to the weight's dtype; ``base`` ``[K, in]`` in the weight's dtype). ``basis`` is float32
    ``[in, r]`` with orthonormal columns: the key directions whose outputs the edit must leave
    unchanged (AlphaEdit's null-space projection; ``r`` may be 0). Products and sums are float32.
    ``index`` holds each row once; ``weight`` and ``delta`` share no memory with the other arguments.

    >>> B = torch.linalg.qr(torch.randn(8, 3)).Q.contiguous()
    >>> w, d = torch.zeros(4, 8), torch.randn(2, 8)
    >>> nullspace_project_(w, torch.tensor([0, 2]), d, B, torch.zeros(2, 8), scale=1.0)
    >>> bool((d @ B).abs().max() < 1e-5)
    True
    """
    _checks.tensor("weight", weight, _checks.FLOAT_DTYPES, dim=2)
    _checks.tensor("index", index, (torch.int64,), dim=1)
    K, n = index.numel(), weight.shape[1]
    _checks.tensor("delta", delta, (torch.float32,), dim=2)
    if tuple(delta.shape) != (K, n):
        raise ValueError(f"delta must have the compact row shape {(K, n)} (K={K}, in={n}), got {tuple(delta.shape)}")
    _checks.tensor("basis", basis, (torch.float32,), dim=2)
    if basis.shape[0] != n:
        raise ValueError(f"basis must be [in={n}, r] (one orthonormal key direction per column), got "
                         f"{tuple(basis.shape)}")
    _checks.tensor("base", base, (weight.dtype,), dim=2)
    if tuple(base.shape) != (K, n):
        raise ValueError(f"base must have the compact row shape {(K, n)}, got {tuple(base.shape)}")
    scale = _checks.finite_number("scale", scale)
    device = _checks.same_device(weight=weight, index=index, delta=delta, basis=basis, base=base)
    _checks.no_overlap("nullspace_project_", {"weight": weight, "delta": delta},
                       {"index": index, "basis": basis, "base": base})
    _checks.unique_in_range(index, weight.shape[0], "weight.shape[0]")
    if K == 0 or n == 0:
        return
    _backends.kernel("nullspace_project_", backend, device)[1](weight, index, delta, basis, base, scale)
