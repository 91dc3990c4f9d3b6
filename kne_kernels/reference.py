"""Pure-torch reference implementations of the kne ops.

These are written for obvious correctness, not speed: every fused kernel of ``kne_kernels`` is
validated against them, and they are what runs when no faster backend is available.

Ops (all results and optimizer state are float32):

* :func:`neuron_attribution` -- ``sum_n scale[n] * act[n, d] * grad[n, d]``, optionally per segment.
* :func:`weight_attribution` -- ``sum over dim of weight * grad`` (signed or absolute).
* :func:`ensemble_select` -- aggregate ``[R, L, D]`` scores over requests, one global
  ``numpy.percentile`` (linear) threshold over all ``L * D`` values, strict ``>``.
* :func:`ensemble_adamw_step_` -- one ``torch.optim.AdamW`` step on a compact ensemble delta, then
  ``weight[index] = base + scale * delta`` along ``dim``.
* :func:`nullspace_project_` -- project a compact row delta off the span of an orthonormal basis
  (``delta -= delta @ basis @ basis^T``), then ``weight[index] = base + scale * delta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch

from . import _checks

__all__ = [
    "neuron_attribution",
    "weight_attribution",
    "ensemble_select",
    "EnsembleSelection",
    "percentile_linear",
    "adamw_update_",
    "ensemble_adamw_step_",
    "nullspace_project_",
    "FLOAT_DTYPES",
]

# The float dtypes every op takes (inputs, weights); results and optimizer state are float32.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {allowed} (cast it with .to())")


# --------------------------------------------------------------------------------------------
# neuron_attribution
# --------------------------------------------------------------------------------------------
def neuron_attribution(
    act: torch.Tensor,
    grad: torch.Tensor,
    *,
    segments: Optional[torch.Tensor] = None,
    num_segments: Optional[int] = None,
    scale: Union[None, float, torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-neuron attribution: ``sum_n scale[n] * act[n, d] * grad[n, d]`` in float32.

    ``act`` and ``grad`` have the same shape ``[..., D]`` (leading dimensions are flattened to
    ``N``), dtype float32, float16 or bfloat16. ``segments`` (LongTensor ``[N]``) splits the sum
    per segment id into ``[num_segments, D]`` (an integer >= 0, default ``max + 1``); ``scale`` is
    ``None``, a float or a ``[N]`` tensor (integrated-gradient step weights). With ``out`` (sharing
    no memory with the inputs) the result is added into ``out`` in place. ``D == 0`` gives an empty
    result, ``N == 0`` zeros.

    >>> a = torch.randn(6, 4); g = torch.randn(6, 4)
    >>> torch.allclose(neuron_attribution(a, g), (a * g).sum(0))
    True
    """
    _check_float("act", act)
    _check_float("grad", grad)
    if act.shape != grad.shape:
        raise ValueError(f"act {tuple(act.shape)} and grad {tuple(grad.shape)} must have the same shape")
    if act.dim() == 0:
        raise ValueError("act must have at least one dimension (the neuron dimension D)")
    D = act.shape[-1]
    N = math.prod(act.shape[:-1])
    a = act.reshape(N, D).float()
    g = grad.reshape(N, D).float()
    prod = a * g
    if scale is not None:
        if isinstance(scale, torch.Tensor):
            if scale.shape != (N,):
                raise ValueError(f"scale must have shape [N]=[{N}], got {tuple(scale.shape)}")
            prod = prod * scale.to(device=prod.device, dtype=torch.float32)[:, None]
        else:
            prod = prod * float(scale)
    if segments is None:
        if num_segments is not None:
            raise ValueError("num_segments is only meaningful together with segments")
        res = prod.sum(0)
    else:
        if segments.dtype != torch.long or segments.shape != (N,):
            raise ValueError(f"segments must be a LongTensor of shape [N]=[{N}], got {segments.dtype} {tuple(segments.shape)}")
        if num_segments is None:
            num_segments = int(segments.max().item()) + 1 if N else 0
        num_segments = _checks.count("num_segments", num_segments)
        if N and (int(segments.min()) < 0 or int(segments.max()) >= num_segments):
            raise ValueError(f"segment ids must lie in [0, {num_segments})")
        res = torch.zeros(num_segments, D, dtype=torch.float32, device=prod.device)
        res.index_add_(0, segments.to(prod.device), prod)
    if out is not None:
        if out.dtype != torch.float32 or out.shape != res.shape:
            raise ValueError(f"out must be float32 of shape {tuple(res.shape)}, got {out.dtype} {tuple(out.shape)}")
        _checks.no_overlap("neuron_attribution", {"out": out}, {"act": act, "grad": grad, "segments": segments,
                                                                "scale": scale if isinstance(scale, torch.Tensor) else None})
        out.add_(res)
        return out
    return res


# --------------------------------------------------------------------------------------------
# weight_attribution
# --------------------------------------------------------------------------------------------
def weight_attribution(
    weight: torch.Tensor,
    grad: torch.Tensor,
    *,
    dim: int = 1,
    absolute: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``sum over dim of weight * grad`` (or of its absolute value), float32.

    For a weight ``[out, in]``, ``dim=1`` gives one score per row (output neuron), ``dim=0`` one
    per column (input neuron); ``absolute`` is ``True``/``False``. With ``out`` (sharing no memory
    with the inputs) the result is added into ``out`` in place.
    """
    _check_float("weight", weight)
    _check_float("grad", grad)
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} must have the same shape")
    absolute = _checks.flag("absolute", absolute)
    prod = weight.float() * grad.float()
    if absolute:
        prod = prod.abs()
    res = prod.sum(dim)
    if out is not None:
        if out.dtype != torch.float32 or out.shape != res.shape:
            raise ValueError(f"out must be float32 of shape {tuple(res.shape)}, got {out.dtype} {tuple(out.shape)}")
        _checks.no_overlap("weight_attribution", {"out": out}, {"weight": weight, "grad": grad})
        out.add_(res)
        return out
    return res


# --------------------------------------------------------------------------------------------
# ensemble_select
# --------------------------------------------------------------------------------------------
def percentile_linear(values: torch.Tensor, percentile: float) -> float:
    """``numpy.percentile(values, percentile)`` (method ``linear``), bit for bit, for float32.

    NumPy interpolates between the two neighbouring order statistics in the array's own dtype
    (float32 here, the percentile being a weak Python float); this does the same arithmetic with
    ``numpy.float32`` scalars, so ``values > threshold`` selects exactly what NumPy's threshold
    selects. Only the two order statistics are located (``kthvalue``), not a full sort.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"values must be float32, got {values.dtype}")
    v = values.reshape(-1)
    n = v.numel()
    if n == 0:
        raise ValueError("cannot take a percentile of an empty tensor")
    q = float(np.true_divide(percentile, 100))
    vi = (n - 1) * q
    if vi >= n - 1:  # NumPy takes the maximum for both neighbours: the interpolation is moot
        return float(np.float32(v.max().item()))
    lo = int(math.floor(vi))
    gamma = vi - lo
    vals = v.cpu()
    a = np.float32(torch.kthvalue(vals, lo + 1).values.item())
    b = np.float32(torch.kthvalue(vals, lo + 2).values.item())
    diff = np.float32(b - a)
    if gamma >= 0.5:
        thr = np.float32(b - diff * np.float32(1 - gamma))
    else:
        thr = np.float32(a + diff * np.float32(gamma))
    return float(thr)


@dataclass
class EnsembleSelection:
    """Result of :func:`ensemble_select`.

    ``mask`` bool ``[L, D]``; ``threshold`` the global percentile (float); ``counts`` LongTensor
    ``[L]``; ``indices`` one ascending LongTensor per layer; ``aggregated`` float32 ``[L, D]``.
    """

    mask: torch.Tensor
    threshold: float
    counts: torch.Tensor
    indices: List[torch.Tensor]
    aggregated: torch.Tensor


def ensemble_select(
    scores: torch.Tensor,
    *,
    percentile: float = 99.0,
    aggregate: str = "max",
    positive_only: bool = True,
) -> EnsembleSelection:
    """Select an ensemble from per-request neuron scores.

    ``scores`` float32 ``[R, L, D]`` (requests, layers, neurons). Aggregates over ``R`` (``max``
    or ``mean``), takes one threshold ``numpy.percentile(aggregated, percentile)`` over all ``L*D``
    values together, and keeps ``aggregated > threshold`` (and ``> 0`` when ``positive_only``, a
    bool). NaN and +-infinity are refused (``ValueError``): the attribution overflowed or failed.
    """
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 3:
        desc = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a float32 tensor [R, L, D], got {desc}")
    if scores.numel() == 0:
        raise ValueError(f"scores {tuple(scores.shape)} is empty")
    percentile = _checks.percentile(percentile)
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
    positive_only = _checks.flag("positive_only", positive_only)
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores contain NaN or infinity (first at {_checks.non_finite_at(scores)}): the attribution "
                         "that produced them failed")
    agg = scores.amax(0) if aggregate == "max" else scores.mean(0)
    if not torch.isfinite(agg).all():
        raise ValueError(f"the mean scores over requests contain NaN or infinity (first at {_checks.non_finite_at(agg)}): "
                         "scale the scores down")
    thr = percentile_linear(agg, percentile)
    mask = agg > thr
    if positive_only:
        mask &= agg > 0
    counts = mask.sum(1)
    indices = [torch.nonzero(row, as_tuple=False).reshape(-1) for row in mask]
    return EnsembleSelection(mask=mask, threshold=thr, counts=counts, indices=indices, aggregated=agg)


# --------------------------------------------------------------------------------------------
# ensemble_adamw_step_
# --------------------------------------------------------------------------------------------
def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One AdamW step on ``param`` in place, the same arithmetic as ``torch.optim.AdamW``
    (single-tensor path, ``amsgrad=False``, ``maximize=False``); ``step`` counts from 1."""
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


def ensemble_adamw_step_(
    weight: torch.Tensor,
    index: torch.Tensor,
    grad: torch.Tensor,
    delta: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    base: torch.Tensor,
    *,
    step: int,
    lr: float,
    scale: float,
    dim: int = 0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One AdamW step on a compact ensemble delta, then ``weight[index] = base + scale * delta``.

    ``weight`` ``[out, in]`` (fp32/fp16/bf16). ``dim=0``: ensemble rows, ``grad``/``delta``/
    moments fp32 ``[K, in]`` and ``base`` ``[K, in]`` in the weight's dtype. ``dim=1``: columns,
    shapes ``[out, K]``. ``index`` holds each row (column) once, in range; ``weight``, ``delta`` and
    the moments (written in place) share no memory with each other or with the other arguments.
    Nothing outside the ensemble rows or columns is read or written.
    """
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got {tuple(weight.shape)}")
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim}")
    if index.dtype != torch.long or index.dim() != 1:
        raise ValueError(f"index must be a 1-D LongTensor, got {index.dtype} {tuple(index.shape)}")
    K = index.numel()
    shape = (K, weight.shape[1]) if dim == 0 else (weight.shape[0], K)
    for name, t in (("grad", grad), ("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be float32 of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if base.dtype != weight.dtype or tuple(base.shape) != shape:
        raise ValueError(f"base must be {weight.dtype} of shape {shape}, got {base.dtype} {tuple(base.shape)}")
    _checks.no_overlap("ensemble_adamw_step_", {"weight": weight, "delta": delta, "exp_avg": exp_avg,
                                                "exp_avg_sq": exp_avg_sq},
                       {"index": index, "grad": grad, "base": base})
    _checks.unique_in_range(index, weight.shape[dim], f"weight.shape[{dim}]")
    adamw_update_(delta, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay)
    new = (base.float() + scale * delta).to(weight.dtype)
    weight.index_copy_(dim, index, new)


# --------------------------------------------------------------------------------------------
# nullspace_project_
# --------------------------------------------------------------------------------------------
def nullspace_project_(
    weight: torch.Tensor,
    index: torch.Tensor,
    delta: torch.Tensor,
    basis: torch.Tensor,
    base: torch.Tensor,
    *,
    scale: float,
) -> None:
    """Project the compact row delta off ``span(basis)``, then rewrite the ensemble rows.

    ``delta`` fp32 ``[K, in]`` becomes ``delta - (delta @ basis) @ basis^T`` (``basis`` fp32
    ``[in, r]`` with orthonormal columns: the key directions whose outputs must not change), then
    ``weight[index] = (base + scale * delta).to(weight.dtype)``. The projection matrix is formed
    explicitly here (``I - basis basis^T``, in float64), the obvious way.
    """
    _check_float("weight", weight)
    if index.dtype != torch.long or index.dim() != 1:
        raise ValueError(f"index must be a 1-D LongTensor, got {index.dtype} {tuple(index.shape)}")
    shape = (index.numel(), weight.shape[1])
    if delta.dtype != torch.float32 or tuple(delta.shape) != shape:
        raise ValueError(f"delta must be float32 of shape {shape}, got {delta.dtype} {tuple(delta.shape)}")
    if basis.dtype != torch.float32 or basis.dim() != 2 or basis.shape[0] != weight.shape[1]:
        raise ValueError(f"basis must be float32 [in={weight.shape[1]}, r], got {basis.dtype} {tuple(basis.shape)}")
    if base.dtype != weight.dtype or tuple(base.shape) != shape:
        raise ValueError(f"base must be {weight.dtype} of shape {shape}, got {base.dtype} {tuple(base.shape)}")
    _checks.no_overlap("nullspace_project_", {"weight": weight, "delta": delta},
                       {"index": index, "basis": basis, "base": base})
    _checks.unique_in_range(index, weight.shape[0], "weight.shape[0]")
    B = basis.double()
    P = torch.eye(B.shape[0], dtype=torch.float64, device=B.device) - B @ B.t()
    delta.copy_((delta.double() @ P).float())
    weight.index_copy_(0, index, (base.float() + scale * delta).to(weight.dtype))
