"""``ensemble_select``: aggregate scores over requests, one global ``numpy.percentile`` threshold,
the mask, counts and indices of the neurons above it. Three dispatcher ops do the work:

``kne::ensemble_aggregate(Tensor scores, int mode) -> Tensor``
    ``scores`` fp32 ``[R, M]`` -> fp32 ``[M]``: ``max`` over ``R`` (``mode=0``, exact, NaN
    propagates) or the mean (``mode=1``). The torch kernel is ``scores.mean(0)``; the CPU C++
    kernel reproduces torch's CPU ``mean(0)`` bit for bit (ATen's cascade summation order), so CPU
    ensembles are identical whichever of the two runs; the GPU kernels (Triton, CUDA) sum in order
    ``r = 0..R-1`` in float32 and divide by ``R`` (torch's CUDA mean uses another order: the two
    agree to float32 rounding).
``kne::order_statistics(Tensor values, int k) -> Tensor``
    ``values`` fp32 ``[M]`` -> fp32 ``[2]``: the ``k``-th and ``(k+1)``-th smallest values
    (0-based; ``k+1`` clamped to ``M-1``; ``-0.0`` and ``+0.0`` are one value). Exact at any size
    (a radix select in the kernels, ``torch.kthvalue`` in the torch kernel).
``kne::threshold_mask(Tensor values, float threshold, bool positive_only) -> (Tensor, Tensor)``
    ``values`` fp32 ``[L, D]`` -> bool mask ``values > threshold`` (and ``> 0`` when
    ``positive_only``) ``[L, D]`` and int64 counts per row ``[L]``. ``threshold`` is compared in
    float32 (it is a float32 value: the percentile of float32 values).

The threshold between the two order statistics is NumPy's linear interpolation, written once here
(:func:`numpy_percentile`), so the threshold equals ``numpy.percentile`` of the aggregated float32
scores bit for bit (NumPy 2.4.1 and later). Kernels: ``triton/ensemble_select.py``,
``csrc/cpu/ensemble_select.cpp``, ``csrc/cuda/ensemble_select.cu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from .. import _backends, _checks
from ._registry import OpDef, close, generator


# ----------------------------------------------------------------------------------------------
# pure-torch kernels (the defaults, and the references)
def ensemble_aggregate_torch(scores: torch.Tensor, mode: int) -> torch.Tensor:
    return scores.amax(0) if mode == 0 else scores.mean(0)


def order_statistics_torch(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    k1 = min(k + 1, n - 1)
    a = torch.kthvalue(values, k + 1).values
    b = torch.kthvalue(values, k1 + 1).values
    return torch.stack([a, b])


def threshold_mask_torch(values: torch.Tensor, threshold: float,
                         positive_only: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    mask = values > threshold
    if positive_only:
        mask &= values > 0
    return mask, mask.sum(1)


# ----------------------------------------------------------------------------------------------
# fake kernels
def _fake_aggregate(scores, mode):
    return scores.new_empty(scores.shape[1:], dtype=torch.float32)


def _fake_order_statistics(values, k):
    return values.new_empty((2,), dtype=torch.float32)


def _fake_threshold_mask(values, threshold, positive_only):
    return (values.new_empty(values.shape, dtype=torch.bool),
            values.new_empty(values.shape[:1], dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# first-use self-checks
def _selfcheck_aggregate(impl, ref, device):
    """``max`` must be exact; ``mean`` is compared with a float32 sum in order r = 0..R-1 (the GPU
    kernels' definition), computed on the CPU: the device's own ``torch.mean`` may reduce in
    another order."""
    s = torch.randn(3, 517, generator=generator())
    want = {0: s.amax(0), 1: (s[0] + s[1] + s[2]) / 3}
    for mode, tol in ((0, 0.0), (1, 1e-6)):
        ok, why = close(impl(s.to(device), mode).cpu(), want[mode], tol)
        if not ok:
            return ok, f"mode={mode}: {why}"
    return True, ""


def _selfcheck_order(impl, ref, device):
    v = torch.randn(5000, generator=generator()).round(decimals=2).to(device)
    for k in (0, 17, 2500, 4999):
        ok, why = close(impl(v, k), ref(v, k), 0.0)
        if not ok:
            return ok, f"k={k}: {why}"
    return True, ""


def _selfcheck_mask(impl, ref, device):
    v = torch.randn(7, 300, generator=generator()).to(device)
    a, b = impl(v, 0.25, True), ref(v, 0.25, True)
    ok, why = close(a[0], b[0], 0.0)
    if ok:
        ok, why = close(a[1], b[1], 0.0)
    return ok, why


OPS = (
    OpDef("ensemble_aggregate", "(Tensor scores, int mode) -> Tensor", ensemble_aggregate_torch, _fake_aggregate,
          _selfcheck_aggregate),
    OpDef("order_statistics", "(Tensor values, int k) -> Tensor", order_statistics_torch, _fake_order_statistics,
          _selfcheck_order),
    OpDef("threshold_mask", "(Tensor values, float threshold, bool positive_only) -> (Tensor, Tensor)",
          threshold_mask_torch, _fake_threshold_mask, _selfcheck_mask),
)


# ----------------------------------------------------------------------------------------------
# the percentile, written once
def percentile_rank(n: int, percentile: float) -> int:
    """0-based rank of the lower of the two order statistics ``numpy.percentile`` (linear)
    interpolates between, for ``n`` values (``n - 1`` at the top: both neighbours are the maximum)."""
    vi = (n - 1) * float(np.true_divide(percentile, 100))
    return n - 1 if vi >= n - 1 else int(math.floor(vi))


def numpy_percentile(a: float, b: float, n: int, percentile: float) -> float:
    """NumPy's linear percentile of ``n`` float32 values from its two neighbouring order statistics
    ``a`` (rank :func:`percentile_rank`) and ``b`` (the next), in float32 exactly as
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


def percentile_linear(values: torch.Tensor, percentile: float) -> float:
    """``numpy.percentile(values, percentile)`` (method ``linear``) of float32 ``values`` (any
    shape, not empty), bit for bit: the two order statistics from ``torch.kthvalue`` on the CPU (no
    sort, no size limit), then :func:`numpy_percentile`.

    >>> percentile_linear(torch.tensor([1.0, 2.0, 3.0, 4.0]), 50.0)
    2.5
    """
    if values.dtype != torch.float32:
        raise TypeError(f"values must be float32, got {values.dtype}")
    v = values.reshape(-1)
    n = v.numel()
    if n == 0:
        raise ValueError("cannot take a percentile of an empty tensor")
    a, b = order_statistics_torch(v.cpu(), percentile_rank(n, percentile)).tolist()
    return numpy_percentile(a, b, n, percentile)


# ----------------------------------------------------------------------------------------------
@dataclass
class EnsembleSelection:
    """Result of :func:`ensemble_select`: ``mask`` bool ``[L, D]``, ``threshold`` (float, the global
    percentile), ``counts`` int64 ``[L]``, ``indices`` (one ascending int64 tensor per layer) and
    ``aggregated`` float32 ``[L, D]``."""

    mask: torch.Tensor
    threshold: float
    counts: torch.Tensor
    indices: List[torch.Tensor]
    aggregated: torch.Tensor


def ensemble_select(scores: torch.Tensor, *, percentile: float = 99.0, aggregate: str = "max",
                    positive_only: bool = True, backend: Optional[str] = None) -> EnsembleSelection:
    """Aggregate ``[R, L, D]`` float32 scores over requests (``max``/``mean``), take one threshold
    ``numpy.percentile(aggregated, percentile)`` (linear) over all ``L*D`` values, keep
    ``aggregated > threshold`` (and ``> 0`` with ``positive_only``, a bool).

    Every score must be finite: NaN and +-infinity are refused (``ValueError`` with the position of
    the first) -- an infinite score is an overflow of the attribution that produced it -- and so is
    a mean that overflows. Exact at any size: the threshold's two order statistics come from a
    radix select (no sort, no ``torch.quantile`` size limit).

    >>> s = torch.tensor([[[0.1, 0.9, 0.4], [0.8, -0.2, 0.3]]])
    >>> sel = ensemble_select(s, percentile=50.0)
    >>> round(sel.threshold, 6), [i.tolist() for i in sel.indices]
    (0.35, [[1, 2], [0]])
    """
    _checks.tensor("scores", scores, (torch.float32,), dim=3)
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
        fn = _backends.kernel("ensemble_aggregate", backend, device)[1]
        agg = fn(scores.view(R, L * D), 0 if aggregate == "max" else 1).view(L, D)
    if aggregate == "mean" and R > 1:  # finite scores whose float32 sum overflows
        _checks.require_finite("the mean scores over requests", agg, "scale the scores down")
    n = L * D
    a, b = _backends.kernel("order_statistics", backend, device)[1](agg.reshape(n),
                                                                    percentile_rank(n, percentile)).tolist()
    thr = numpy_percentile(a, b, n, percentile)
    mask, counts = _backends.kernel("threshold_mask", backend, device)[1](agg, thr, positive_only)
    cols = mask.nonzero()[:, 1]
    indices = list(torch.split(cols, counts.tolist()))
    return EnsembleSelection(mask=mask, threshold=thr, counts=counts, indices=indices, aggregated=agg)
