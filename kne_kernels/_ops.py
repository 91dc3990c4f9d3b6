"""The kne op library: every schema defined once, the pure-torch kernel as the default, a fake each.

Ops (namespace ``kne``), all on contiguous tensors; results and optimizer state are float32:

``neuron_attribution_(Tensor(a!) out, Tensor act, Tensor grad, Tensor? segments, Tensor? scale, float scale_value) -> ()``
    ``out[seg[n], d] += scale_value * scale[n] * act[n, d] * grad[n, d]`` over ``n``. ``act``/``grad``
    ``[N, D]`` (fp32/fp16/bf16, same dtype), ``out`` fp32 ``[S, D]``; ``segments`` None (then
    ``S == 1``) or int64 ``[N]`` with ids in ``[0, S)``; ``scale`` None or fp32 ``[N]``.
``weight_attribution_(Tensor(a!) out, Tensor weight, Tensor grad, int dim, bool absolute) -> ()``
    ``out += sum over dim of weight * grad`` (``|weight * grad|`` when ``absolute``), products in
    fp32. ``weight``/``grad`` ``[R, C]``; ``out`` fp32 ``[R]`` (``dim=1``) or ``[C]`` (``dim=0``).
``ensemble_aggregate(Tensor scores, int mode) -> Tensor``
    ``scores`` fp32 ``[R, M]`` -> fp32 ``[M]``: ``max`` over ``R`` (``mode=0``, exact) or the mean
    (``mode=1``). The torch kernel is ``scores.mean(0)``; the CPU C++ kernel reproduces torch's
    CPU ``mean(0)`` bit for bit (ATen's cascade summation order), so CPU ensembles are identical
    to the reference's; the GPU kernels sum in order ``r = 0..R-1`` in float32 and divide by ``R``
    (torch's CUDA mean uses another order: the two agree to float32 rounding).
``order_statistics(Tensor values, int k) -> Tensor``
    ``values`` fp32 ``[M]`` (finite) -> fp32 ``[2]``: the ``k``-th and ``(k+1)``-th smallest values
    (0-based; ``k+1`` clamped to ``M-1``). Exact at any size (a radix select in the kernels).
``threshold_mask(Tensor values, float threshold, bool positive_only) -> (Tensor, Tensor)``
    ``values`` fp32 ``[L, D]`` -> bool mask ``values > threshold`` (and ``> 0`` when
    ``positive_only``) ``[L, D]`` and int64 counts per row ``[L]``. ``threshold`` is compared in
    float32 (it is a float32 value: the percentile of float32 values).
``ensemble_adamw_step_(Tensor(a!) weight, Tensor index, Tensor grad, Tensor(b!) delta, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, Tensor base, int step, float lr, float scale, int dim, float beta1, float beta2, float eps, float weight_decay) -> ()``
    One ``torch.optim.AdamW`` step on the compact fp32 ``delta`` (rows ``[K, in]`` for ``dim=0``,
    columns ``[out, K]`` for ``dim=1``) and its moments, then
    ``weight[index] = (base + scale * delta).to(weight.dtype)`` along ``dim``. ``index`` is unique
    and in range, and the tensors written in place alias no other argument: ``kne_kernels.api``
    checks both for every backend (the C++ kernels check aliasing again, the CPU one the index too).
    The torch kernel is torch's default AdamW step bit for bit; what the others match exactly is
    listed in :func:`kne_kernels.api.ensemble_adamw_step_`.
``nullspace_project_(Tensor(a!) weight, Tensor index, Tensor(b!) delta, Tensor basis, Tensor base, float scale) -> ()``
    Project the compact fp32 row delta ``[K, in]`` off the span of ``basis`` (fp32 ``[in, r]``,
    orthonormal columns): ``delta -= (delta @ basis) @ basis^T`` (products and sums in fp32), then
    ``weight[index] = (base + scale * delta).to(weight.dtype)`` (rows, ``base`` ``[K, in]``).

Kernels are registered per dispatch key on top of the default: the CPU C++ extension for ``CPU``
and, on a GPU, Triton or the CUDA C++ extension for ``CUDA`` (see ``kne_kernels._backends``).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .reference import adamw_update_

NAMESPACE = "kne"

SCHEMAS: Dict[str, str] = {
    "neuron_attribution_": "(Tensor(a!) out, Tensor act, Tensor grad, Tensor? segments, Tensor? scale, "
                           "float scale_value) -> ()",
    "weight_attribution_": "(Tensor(a!) out, Tensor weight, Tensor grad, int dim, bool absolute) -> ()",
    "ensemble_aggregate": "(Tensor scores, int mode) -> Tensor",
    "order_statistics": "(Tensor values, int k) -> Tensor",
    "threshold_mask": "(Tensor values, float threshold, bool positive_only) -> (Tensor, Tensor)",
    "ensemble_adamw_step_": "(Tensor(a!) weight, Tensor index, Tensor grad, Tensor(b!) delta, Tensor(c!) exp_avg, "
                            "Tensor(d!) exp_avg_sq, Tensor base, int step, float lr, float scale, int dim, "
                            "float beta1, float beta2, float eps, float weight_decay) -> ()",
    "nullspace_project_": "(Tensor(a!) weight, Tensor index, Tensor(b!) delta, Tensor basis, Tensor base, "
                          "float scale) -> ()",
}

# ----------------------------------------------------------------------------------------------
# Pure-torch kernels (the default for every device). Inputs are already validated by the public
# functions in kne_kernels; these are the semantics every device kernel must reproduce.
# ----------------------------------------------------------------------------------------------


def neuron_attribution_torch(out: torch.Tensor, act: torch.Tensor, grad: torch.Tensor,
                             segments: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                             scale_value: float) -> None:
    prod = act.float() * grad.float()
    if scale is not None:
        prod = prod * scale[:, None]
    if scale_value != 1.0:
        prod = prod * scale_value
    if segments is None:
        out[0].add_(prod.sum(0))
    else:
        out.index_add_(0, segments, prod)


def weight_attribution_torch(out: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dim: int,
                             absolute: bool) -> None:
    prod = weight.float() * grad.float()
    if absolute:
        prod = prod.abs()
    out.add_(prod.sum(dim))


def ensemble_aggregate_torch(scores: torch.Tensor, mode: int) -> torch.Tensor:
    return scores.amax(0) if mode == 0 else scores.mean(0)


def order_statistics_torch(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    k1 = min(k + 1, n - 1)
    a = torch.kthvalue(values, k + 1).values
    b = torch.kthvalue(values, k1 + 1).values
    return torch.stack([a, b])


def threshold_mask_torch(values: torch.Tensor, threshold: float, positive_only: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    mask = values > threshold
    if positive_only:
        mask &= values > 0
    return mask, mask.sum(1)


def ensemble_adamw_step_torch(weight: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor,
                              exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, base: torch.Tensor, step: int,
                              lr: float, scale: float, dim: int, beta1: float, beta2: float, eps: float,
                              weight_decay: float) -> None:
    adamw_update_(delta, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay)
    weight.index_copy_(dim, index, (base.float() + scale * delta).to(weight.dtype))


def nullspace_project_torch(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, basis: torch.Tensor,
                            base: torch.Tensor, scale: float) -> None:
    if basis.shape[1]:
        delta.sub_((delta @ basis) @ basis.t())
    weight.index_copy_(0, index, (base.float() + scale * delta).to(weight.dtype))


TORCH_KERNELS = {
    "neuron_attribution_": neuron_attribution_torch,
    "weight_attribution_": weight_attribution_torch,
    "ensemble_aggregate": ensemble_aggregate_torch,
    "order_statistics": order_statistics_torch,
    "threshold_mask": threshold_mask_torch,
    "ensemble_adamw_step_": ensemble_adamw_step_torch,
    "nullspace_project_": nullspace_project_torch,
}


# ----------------------------------------------------------------------------------------------
# Fake kernels (shapes only) so torch.compile can trace the ops.
# ----------------------------------------------------------------------------------------------
def _fake_none(*args, **kwargs) -> None:
    return None


def _fake_aggregate(scores, mode):
    return scores.new_empty(scores.shape[1:], dtype=torch.float32)


def _fake_order_statistics(values, k):
    return values.new_empty((2,), dtype=torch.float32)


def _fake_threshold_mask(values, threshold, positive_only):
    return (values.new_empty(values.shape, dtype=torch.bool),
            values.new_empty(values.shape[:1], dtype=torch.int64))


FAKE_KERNELS = {
    "neuron_attribution_": _fake_none,
    "weight_attribution_": _fake_none,
    "ensemble_aggregate": _fake_aggregate,
    "order_statistics": _fake_order_statistics,
    "threshold_mask": _fake_threshold_mask,
    "ensemble_adamw_step_": _fake_none,
    "nullspace_project_": _fake_none,
}

_LIB: Optional[torch.library.Library] = None


def define() -> None:
    """Define every schema (once per process), register the torch kernels as the
    ``CompositeExplicitAutograd`` default and the fake kernels."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library(NAMESPACE, "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
        lib.impl(name, TORCH_KERNELS[name], "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", FAKE_KERNELS[name], lib=lib)
    _LIB = lib


def op(name: str):
    """The dispatcher op ``torch.ops.kne.<name>.default``."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default
