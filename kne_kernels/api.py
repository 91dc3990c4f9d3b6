"""The public ops of ``kne_kernels``: validation, then the chosen backend's kernel.

Every op takes ``backend=`` (``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``; default
``KNE_BACKEND`` or ``"auto"``). Bad inputs raise ``ValueError``/``TypeError`` naming the argument
and the fix; nothing is copied or cast silently (non-contiguous inputs are refused). The rules are
checked here, before any backend runs, so every backend accepts and refuses the same inputs
(``kne_kernels._checks``): flags are bools, counts are integers, empty dimensions give empty (or
zero) results, an ensemble index is unique and in range, a tensor written in place aliases no other
argument, and scores must be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch

from . import _backends, _checks
from .reference import FLOAT_DTYPES

__all__ = ["neuron_attribution", "weight_attribution", "ensemble_select", "ensemble_adamw_step_",
           "nullspace_project_", "EnsembleSelection", "numpy_percentile_from_neighbours"]

def _tensor(name: str, t, dtypes=None, dim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {allowed} (cast with .to())")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}): pass {name}.contiguous()")
    return t


def _same_device(**tensors) -> torch.device:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    first = next(iter(devs.values()))
    bad = {k: str(d) for k, d in devs.items() if d != first}
    if bad:
        raise ValueError("all tensors must be on one device; got " + ", ".join(f"{k} on {d}" for k, d in devs.items()))
    return first


# ----------------------------------------------------------------------------------------------
def neuron_attribution(act: torch.Tensor, grad: torch.Tensor, *, segments: Optional[torch.Tensor] = None,
                       num_segments: Optional[int] = None, scale: Union[None, float, torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Per-neuron attribution ``sum_n scale[n] * act[n, d] * grad[n, d]``, float32.

    ``act``/``grad``: ``[..., D]`` (leading dimensions are flattened to ``N``), float32, float16 or
    bfloat16, same dtype, contiguous. Returns ``[D]``, or ``[num_segments, D]`` with ``segments``
    (int64 ``[N]`` of ids; ``num_segments``, an integer >= 0, defaults to ``max + 1``). ``scale``:
    ``None``, a float, or a ``[N]`` tensor (IG step weights). With ``out`` (float32, the result's
    shape, sharing no memory with the inputs) the result is added into ``out`` in place and ``out``
    is returned. Empty inputs are valid: ``D == 0`` gives ``[0]`` (``[S, 0]``), ``N == 0`` zeros.

    >>> a, g = torch.randn(6, 4), torch.randn(6, 4)
    >>> torch.allclose(neuron_attribution(a, g), (a * g).sum(0), atol=1e-6)
    True
    """
    _tensor("act", act, FLOAT_DTYPES)
    _tensor("grad", grad, FLOAT_DTYPES)
    if act.dtype != grad.dtype:
        raise TypeError(f"act ({act.dtype}) and grad ({grad.dtype}) must have the same dtype")
    if act.shape != grad.shape:
        raise ValueError(f"act {tuple(act.shape)} and grad {tuple(grad.shape)} must have the same shape")
    if act.dim() == 0:
        raise ValueError("act must have at least one dimension (the neurons, D)")
    D = act.shape[-1]
    N = math.prod(act.shape[:-1])
    a2, g2 = act.reshape(N, D), grad.reshape(N, D)  # (N, D), not (-1, D): D may be 0
    scale_t, scale_v = None, 1.0
    if isinstance(scale, torch.Tensor):
        _tensor("scale", scale, (torch.float32,), dim=1)
        if scale.shape[0] != N:
            raise ValueError(f"scale must have shape [N]=[{N}] (one weight per row), got {tuple(scale.shape)}")
        scale_t = scale
    elif scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise TypeError(f"scale must be None, a finite float or a float32 [N] tensor, got {scale!r}")
        scale_v = float(scale)
    if segments is None:
        if num_segments is not None:
            raise ValueError("num_segments is only meaningful together with segments")
        S = 1
    else:
        _tensor("segments", segments, (torch.int64,), dim=1)
        if segments.shape[0] != N:
            raise ValueError(f"segments must have shape [N]=[{N}] (one id per row), got {tuple(segments.shape)}")
        lo, hi = torch.stack(torch.aminmax(segments)).tolist() if N else (0, -1)  # one sync
        S = hi + 1 if num_segments is None else _checks.count("num_segments", num_segments)
        if N and (lo < 0 or hi >= S):
            raise ValueError(f"segment ids must lie in [0, num_segments={S}), got [{lo}, {hi}]")
    device = _same_device(act=act, grad=grad, segments=segments, scale=scale_t, out=out)
    want = (D,) if segments is None else (S, D)
    if out is not None:
        _tensor("out", out, (torch.float32,))
        if tuple(out.shape) != want:
            raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
        _checks.no_overlap("neuron_attribution", {"out": out}, {"act": act, "grad": grad, "segments": segments,
                                                                "scale": scale_t})
        target = out.view(1, D) if segments is None else out
    else:
        target = torch.zeros((S, D), dtype=torch.float32, device=device)
    if N and D and S:
        _, fn = _backends.kernel("neuron_attribution_", backend, device)
        fn(target, a2, g2, segments, scale_t, scale_v)
    if out is not None:
        return out
    return target[0] if segments is None else target


# ----------------------------------------------------------------------------------------------
def weight_attribution(weight: torch.Tensor, grad: torch.Tensor, *, dim: int = 1, absolute: bool = False,
                       out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``sum over dim of weight * grad`` (or of ``|weight * grad|``), float32, one pass.

    ``weight``/``grad``: 2-D ``[R, C]``, float32/float16/bfloat16, same dtype. ``dim=1`` gives one
    score per row ``[R]``, ``dim=0`` one per column ``[C]``. ``absolute``: ``True``/``False``. With
    ``out`` (sharing no memory with the inputs) the result is added in place.
    """
    _tensor("weight", weight, FLOAT_DTYPES, dim=2)
    _tensor("grad", grad, FLOAT_DTYPES, dim=2)
    if weight.dtype != grad.dtype:
        raise TypeError(f"weight ({weight.dtype}) and grad ({grad.dtype}) must have the same dtype")
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} must have the same shape")
    if dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 0 (per column) or 1 (per row), got {dim}")
    absolute = _checks.flag("absolute", absolute)
    dim = dim % 2
    device = _same_device(weight=weight, grad=grad, out=out)
    want = (weight.shape[1 - dim],)
    if out is not None:
        _tensor("out", out, (torch.float32,), dim=1)
        if tuple(out.shape) != want:
            raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
        _checks.no_overlap("weight_attribution", {"out": out}, {"weight": weight, "grad": grad})
        target = out
    else:
        target = torch.zeros(want, dtype=torch.float32, device=device)
    if weight.numel():
        _, fn = _backends.kernel("weight_attribution_", backend, device)
        fn(target, weight, grad, dim, absolute)
    return target


# ----------------------------------------------------------------------------------------------
@dataclass
class EnsembleSelection:
    """Result of :func:`ensemble_select`: ``mask`` bool ``[L, D]``, ``threshold`` (float),
    ``counts`` int64 ``[L]``, ``indices`` (one ascending int64 tensor per layer) and ``aggregated``
    float32 ``[L, D]``."""

    mask: torch.Tensor
    threshold: float
    counts: torch.Tensor
    indices: List[torch.Tensor]
    aggregated: torch.Tensor


def numpy_percentile_from_neighbours(a: float, b: float, n: int, percentile: float) -> float:
    """NumPy's linear percentile given the two neighbouring order statistics, in float32 exactly as
    ``numpy.percentile`` computes it for a float32 array and a Python-float percentile."""
    q = float(np.true_divide(percentile, 100))
    vi = (n - 1) * q
    a32, b32 = np.float32(a), np.float32(b)
    if vi >= n - 1:
        return float(b32)
    gamma = vi - math.floor(vi)
    diff = np.float32(b32 - a32)
    if gamma >= 0.5:
        return float(np.float32(b32 - diff * np.float32(1 - gamma)))
    return float(np.float32(a32 + diff * np.float32(gamma)))


def _rank(n: int, percentile: float) -> int:
    """0-based rank of the lower neighbour NumPy interpolates from (``n-1`` at the top)."""
    vi = (n - 1) * float(np.true_divide(percentile, 100))
    return n - 1 if vi >= n - 1 else int(math.floor(vi))


def ensemble_select(scores: torch.Tensor, *, percentile: float = 99.0, aggregate: str = "max",
                    positive_only: bool = True, backend: Optional[str] = None) -> EnsembleSelection:
    """Aggregate ``[R, L, D]`` float32 scores over requests (``max``/``mean``), take one threshold
    ``numpy.percentile(aggregated, percentile)`` (linear) over all ``L*D`` values, keep
    ``aggregated > threshold`` (and ``> 0`` with ``positive_only``, a bool). Every score must be
    finite: NaN and +-infinity are refused (``ValueError`` with the position of the first), as the
    reference refuses them -- an infinite score is an overflow of the attribution that produced it.

    Exact at any size: the threshold's two order statistics come from a radix select (no sort, no
    ``torch.quantile`` size limit).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    _tensor("scores", scores, (torch.float32,), dim=3)
    R, L, D = scores.shape
    if scores.numel() == 0:
        raise ValueError(f"scores {tuple(scores.shape)} is empty")
    percentile = _checks.percentile(percentile)
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
    positive_only = _checks.flag("positive_only", positive_only)
    _checks.require_finite("scores", scores, "the attribution that produced them failed")
    device = scores.device
    if R == 1:
        agg = scores[0]
    else:
        _, fn = _backends.kernel("ensemble_aggregate", backend, device)
        agg = fn(scores.view(R, L * D), 0 if aggregate == "max" else 1).view(L, D)
    if aggregate == "mean" and R > 1:  # finite scores whose float32 sum overflows
        _checks.require_finite("the mean scores over requests", agg, "scale the scores down")
    n = L * D
    k = _rank(n, percentile)
    _, fn = _backends.kernel("order_statistics", backend, device)
    a, b = fn(agg.reshape(n), k).tolist()
    thr = numpy_percentile_from_neighbours(a, b, n, percentile)
    _, fn = _backends.kernel("threshold_mask", backend, device)
    mask, counts = fn(agg, thr, positive_only)
    cols = mask.nonzero()[:, 1]
    indices = list(torch.split(cols, counts.tolist()))
    return EnsembleSelection(mask=mask, threshold=thr, counts=counts, indices=indices, aggregated=agg)


# ----------------------------------------------------------------------------------------------
def ensemble_adamw_step_(weight: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor,
                         exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, base: torch.Tensor, *, step: int,
                         lr: float, scale: float, dim: int = 0, beta1: float = 0.9, beta2: float = 0.999,
                         eps: float = 1e-8, weight_decay: float = 0.0, backend: Optional[str] = None) -> None:
    """One fused, in-place AdamW step on a compact ensemble delta, then
    ``weight[index] = base + scale * delta`` along ``dim`` (cast to the weight's dtype).

    ``weight`` ``[out, in]`` (fp32/fp16/bf16). ``dim=0``: ensemble rows; ``grad``, ``delta``,
    ``exp_avg``, ``exp_avg_sq`` float32 ``[K, in]`` and ``base`` ``[K, in]`` in the weight's dtype.
    ``dim=1``: columns, ``[out, K]``. ``index`` holds each row (column) once, in range. ``weight``,
    ``delta``, ``exp_avg`` and ``exp_avg_sq`` are written in place and must not share memory with
    each other or with ``index``, ``grad`` or ``base``. ``step`` counts from 1. Nothing outside the
    ensemble is touched.

    The arithmetic is ``torch.optim.AdamW``'s (``amsgrad=False``), one float32 rounding per torch
    op. What is bit-exact (measured on x86-64 with AVX-512, torch 2.13 CPU; see the README):

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
    """
    _tensor("weight", weight, FLOAT_DTYPES, dim=2)
    _tensor("index", index, (torch.int64,), dim=1)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim}")
    K = index.numel()
    shape = (K, weight.shape[1]) if dim == 0 else (weight.shape[0], K)
    for name, t in (("grad", grad), ("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _tensor(name, t, (torch.float32,), dim=2)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the compact shape {shape} (dim={dim}, K={K}), got {tuple(t.shape)}")
    _tensor("base", base, (weight.dtype,), dim=2)
    if tuple(base.shape) != shape:
        raise ValueError(f"base must have the compact shape {shape}, got {tuple(base.shape)}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step counts from 1, got {step!r}")
    for name, v in (("lr", lr), ("scale", scale), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
                    ("weight_decay", weight_decay)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {beta1}, {beta2}")
    device = _same_device(weight=weight, index=index, grad=grad, delta=delta, exp_avg=exp_avg,
                          exp_avg_sq=exp_avg_sq, base=base)
    _checks.no_overlap("ensemble_adamw_step_", {"weight": weight, "delta": delta, "exp_avg": exp_avg,
                                                "exp_avg_sq": exp_avg_sq},
                       {"index": index, "grad": grad, "base": base})
    _checks.unique_in_range(index, weight.shape[dim], f"weight.shape[{dim}]")
    if K == 0:
        return
    _, fn = _backends.kernel("ensemble_adamw_step_", backend, device)
    fn(weight, index, grad, delta, exp_avg, exp_avg_sq, base, int(step), float(lr), float(scale), int(dim),
       float(beta1), float(beta2), float(eps), float(weight_decay))


# ----------------------------------------------------------------------------------------------
def nullspace_project_(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, basis: torch.Tensor,
                       base: torch.Tensor, *, scale: float, backend: Optional[str] = None) -> None:
    """Project a compact row delta off the preserved key space, then rewrite the ensemble rows.

    ``delta`` (float32 ``[K, in]``, the rows ``index`` of ``weight [out, in]``) becomes
    ``delta - (delta @ basis) @ basis^T`` in place, and ``weight[index] = base + scale * delta``
    (cast to the weight's dtype; ``base`` ``[K, in]`` in the weight's dtype). ``basis`` is float32
    ``[in, r]`` with orthonormal columns: the key directions whose outputs the edit must leave
    unchanged (AlphaEdit's null-space projection; ``r`` may be 0). Products and sums are float32.

    >>> B = torch.linalg.qr(torch.randn(8, 3)).Q
    >>> w, d = torch.zeros(4, 8), torch.randn(2, 8)
    >>> nullspace_project_(w, torch.tensor([0, 2]), d, B, torch.zeros(2, 8), scale=1.0)
    >>> bool((d @ B).abs().max() < 1e-5)
    True
    """
    _tensor("weight", weight, FLOAT_DTYPES, dim=2)
    _tensor("index", index, (torch.int64,), dim=1)
    K, n = index.numel(), weight.shape[1]
    _tensor("delta", delta, (torch.float32,), dim=2)
    if tuple(delta.shape) != (K, n):
        raise ValueError(f"delta must have the compact row shape {(K, n)} (K={K}, in={n}), got {tuple(delta.shape)}")
    _tensor("basis", basis, (torch.float32,), dim=2)
    if basis.shape[0] != n:
        raise ValueError(f"basis must be [in={n}, r] (one orthonormal key direction per column), got "
                         f"{tuple(basis.shape)}")
    _tensor("base", base, (weight.dtype,), dim=2)
    if tuple(base.shape) != (K, n):
        raise ValueError(f"base must have the compact row shape {(K, n)}, got {tuple(base.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    device = _same_device(weight=weight, index=index, delta=delta, basis=basis, base=base)
    _checks.no_overlap("nullspace_project_", {"weight": weight, "delta": delta},
                       {"index": index, "basis": basis, "base": base})
    _checks.unique_in_range(index, weight.shape[0], "weight.shape[0]")
    if K == 0 or n == 0:
        return
    _, fn = _backends.kernel("nullspace_project_", backend, device)
    fn(weight, index, delta, basis, base, float(scale))
