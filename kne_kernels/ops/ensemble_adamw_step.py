"""``ensemble_adamw_step_``: one fused AdamW step on a compact ensemble delta, written into the
ensemble rows (or columns) of the weight in place.

Dispatcher op ``kne::ensemble_adamw_step_(Tensor(a!) weight, Tensor index, Tensor grad, Tensor(b!)
delta, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, Tensor base, int step, float lr, float scale, int
dim, float beta1, float beta2, float eps, float weight_decay) -> ()``: one ``torch.optim.AdamW``
step (``amsgrad=False``) on the compact fp32 ``delta`` (rows ``[K, in]`` for ``dim=0``, columns
``[out, K]`` for ``dim=1``) and its moments, then ``weight[index] = (base + scale *
delta).to(weight.dtype)`` along ``dim``. ``index`` is unique and in range, and the tensors written
in place alias no other argument: the public function checks both for every backend (the C++
kernels check aliasing again, the CPU one the index too). Kernels: ``triton/ensemble_adamw_step.py``,
``csrc/cpu/ensemble_adamw_step.cpp``, ``csrc/cuda/ensemble_adamw_step.cu``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backends, _checks
from ._registry import OpDef, close


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0) -> None:
    """One AdamW step on ``param`` in place, ``torch.optim.AdamW``'s single-tensor arithmetic
    (``amsgrad=False``, ``maximize=False``), op for op; ``step`` counts from 1. Any float dtype
    (``kne.fast_edit`` runs it on float64 models, which the kernels do not take).

    >>> p, g = torch.zeros(3), torch.ones(3)
    >>> m, v = torch.zeros(3), torch.zeros(3)
    >>> adamw_update_(p, g, m, v, step=1, lr=0.1)
    >>> p
    tensor([-0.1000, -0.1000, -0.1000])
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def ensemble_adamw_step_torch(weight: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor,
                              exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, base: torch.Tensor, step: int,
                              lr: float, scale: float, dim: int, beta1: float, beta2: float, eps: float,
                              weight_decay: float) -> None:
    """The pure-torch kernel (the default, and the reference): :func:`adamw_update_`, then the
    ensemble rows/columns rewritten with ``index_copy_``."""
    adamw_update_(delta, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay)
    weight.index_copy_(dim, index, (base.float() + scale * delta).to(weight.dtype))


def _fake(weight, index, grad, delta, exp_avg, exp_avg_sq, base, step, lr, scale, dim, beta1, beta2, eps,
          weight_decay) -> None:
    return None


def _selfcheck(impl, ref, device):
    idx = torch.tensor([2, 9, 30], device=device)
    res = []
    for fn in (impl, ref):
        w = torch.randn(41, 19, generator=torch.Generator().manual_seed(3)).to(device)
        grad = torch.randn(3, 19, generator=torch.Generator().manual_seed(4)).to(device)
        state = [torch.randn(3, 19, generator=torch.Generator().manual_seed(5 + i)).to(device).abs() for i in range(3)]
        base = w[idx].clone()
        fn(w, idx, grad, state[0], state[1], state[2], base, 3, 1e-2, 0.7, 0, 0.9, 0.999, 1e-8, 0.01)
        res.append((w, state[0]))
    ok, why = close(res[0][0], res[1][0], 1e-5)
    if ok:
        ok, why = close(res[0][1], res[1][1], 1e-5)
    return ok, why


OPS = (OpDef("ensemble_adamw_step_",
             "(Tensor(a!) weight, Tensor index, Tensor grad, Tensor(b!) delta, Tensor(c!) exp_avg, "
             "Tensor(d!) exp_avg_sq, Tensor base, int step, float lr, float scale, int dim, float beta1, "
             "float beta2, float eps, float weight_decay) -> ()",
             ensemble_adamw_step_torch, _fake, _selfcheck),)


def ensemble_adamw_step_(weight: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor,
                         exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, base: torch.Tensor, *, step: int,
                         lr: float, scale: float, dim: int = 0, beta1: float = 0.9, beta2: float = 0.999,
                         eps: float = 1e-8, weight_decay: float = 0.0, backend: Optional[str] = None) -> None:
    """One fused, in-place AdamW step on a compact ensemble delta, then
    ``weight[index] = base + scale * delta`` along ``dim`` (cast to the weight's dtype).

    ``weight`` ``[out, in]`` (fp32/fp16/bf16). ``dim=0``: ensemble rows; ``grad``, ``delta``,
    ``exp_avg``, ``exp_avg_sq`` float32 ``[K, in]`` and ``base`` ``[K, in]`` in the weight's dtype.
    ``dim=1``: columns, ``[out, K]``. ``index`` (int64 ``[K]``) holds each row (column) once, in
    range. ``weight``, ``delta``, ``exp_avg`` and ``exp_avg_sq`` are written in place and must not
    share memory with each other or with ``index``, ``grad`` or ``base``. ``step`` counts from 1.
    Nothing outside the ensemble is touched.

    The arithmetic is ``torch.optim.AdamW``'s (``amsgrad=False``), one float32 rounding per torch
    op. What is bit-exact (measured on x86-64 with AVX-512, torch 2.13 CPU; see docs/robustness.md):

    * ``backend="torch"``: ``delta``, ``exp_avg`` and ``exp_avg_sq`` equal ``torch.optim.AdamW``'s
      default CPU step (single-tensor and ``foreach`` paths) bit for bit: it runs those ops.
    * ``backend="cpu"`` (C++): the moments equal torch's default step bit for bit; ``delta`` equals
      ``torch.optim.AdamW(fused=True)`` bit for bit, and differs from the default step on some
      elements because ATen's vectorised float32 ``sqrt`` is not correctly rounded (the kernel's
      is): about 14% of the elements of a first step from zero state (by at most 2 ulp of the
      result), 3-5% of those of later steps (by at most 4 ulp of ``max(|delta before|, |update|)``,
      more ulp of the result where the update nearly cancels delta).
    * ``backend="triton"``/``"cuda"``: torch's CUDA arithmetic op for op (correctly rounded sqrt and
      division, FMAs where torch's kernels fuse); compared with the torch kernel to float32
      rounding by the tests, not bit for bit.

    >>> w = torch.zeros(4, 3); idx = torch.tensor([1, 3])
    >>> g, d, m, v = torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
    >>> ensemble_adamw_step_(w, idx, g, d, m, v, w[idx].clone(), step=1, lr=0.1, scale=2.0)
    >>> [round(x, 6) for x in w[:, 0].tolist()]
    [0.0, -0.2, 0.0, -0.2]
    """
    _checks.tensor("weight", weight, _checks.FLOAT_DTYPES, dim=2)
    _checks.tensor("index", index, (torch.int64,), dim=1)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim}")
    K = index.numel()
    shape = (K, weight.shape[1]) if dim == 0 else (weight.shape[0], K)
    for name, t in (("grad", grad), ("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _checks.tensor(name, t, (torch.float32,), dim=2)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the compact shape {shape} (dim={dim}, K={K}), got {tuple(t.shape)}")
    _checks.tensor("base", base, (weight.dtype,), dim=2)
    if tuple(base.shape) != shape:
        raise ValueError(f"base must have the compact shape {shape}, got {tuple(base.shape)}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step counts from 1, got {step!r}")
    for name, v in (("lr", lr), ("scale", scale), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
                    ("weight_decay", weight_decay)):
        _checks.finite_number(name, v)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {beta1}, {beta2}")
    device = _checks.same_device(weight=weight, index=index, grad=grad, delta=delta, exp_avg=exp_avg,
                                 exp_avg_sq=exp_avg_sq, base=base)
    _checks.no_overlap("ensemble_adamw_step_", {"weight": weight, "delta": delta, "exp_avg": exp_avg,
                                                "exp_avg_sq": exp_avg_sq},
                       {"index": index, "grad": grad, "base": base})
    _checks.unique_in_range(index, weight.shape[dim], f"weight.shape[{dim}]")
    if K == 0:
        return
    _backends.kernel("ensemble_adamw_step_", backend, device)[1](
        weight, index, grad, delta, exp_avg, exp_avg_sq, base, int(step), float(lr), float(scale), int(dim),
        float(beta1), float(beta2), float(eps), float(weight_decay))
