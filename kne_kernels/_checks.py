"""Argument rules shared by the public ops (``kne_kernels.api``) and the pure-torch reference
(``kne_kernels.reference``), so that both -- and through the api every backend -- accept and refuse
the same inputs with the same message:

* flags (``absolute``, ``positive_only``) are ``bool`` (or ``numpy.bool_``), never truthy objects;
* counts (``num_segments``) are integers (``int``, NumPy or 0-d torch integers; not ``bool``, not
  ``2.5``) and not negative;
* an ensemble ``index`` holds each row/column once and lies in ``[0, limit)``: checked with one
  sort and one host sync;
* a tensor an op writes in place shares no memory with any other argument of the op;
* scores are finite: NaN and +-infinity are refused, with the position of the first one.
"""

from __future__ import annotations

import operator
from typing import Dict, Optional

import numpy as np
import torch


def flag(name: str, value) -> bool:
    """``value`` as a bool; ``TypeError`` for anything but ``True``/``False`` (``numpy.bool_`` too)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def count(name: str, value) -> int:
    """``value`` as a non-negative int; ``TypeError`` for non-integers, ``ValueError`` below 0."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def percentile(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(value) <= 100.0:
        raise ValueError(f"percentile must be a number in [0, 100], got {value!r}")
    return float(value)


def unique_in_range(index: torch.Tensor, limit: int, what: str) -> None:
    """``index`` (int64 ``[K]``) lies in ``[0, limit)`` and holds every value once (``ValueError``
    otherwise). One sort of the K values and one host sync, whatever the device."""
    K = index.numel()
    if K == 0:
        return
    s = index.sort().values
    dup = (s[1:] == s[:-1]).any() if K > 1 else torch.zeros((), dtype=torch.bool, device=s.device)
    lo, hi, has_dup = torch.stack([s[0], s[-1], dup.to(s.dtype)]).tolist()
    if lo < 0 or hi >= limit:
        raise ValueError(f"index values must lie in [0, {limit}) ({what}), got [{lo}, {hi}]")
    if has_dup:
        vals, inverse, counts = torch.unique(index, return_inverse=True, return_counts=True)
        v = int(vals[counts > 1][0])
        where = (index == v).nonzero()[:, 0].tolist()
        raise ValueError(f"index holds {v} more than once (at positions {where}); ensemble indices must be unique, or the "
                         "row/column would be updated and written twice (use torch.unique(index))")


def _span(t: torch.Tensor):
    """Bytes ``[start, end)`` from the first to the last element of ``t`` (strides are >= 0)."""
    start = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory: their byte spans intersect (exact for the contiguous
    tensors the api takes; for strided views, interleaved but disjoint ones count as sharing)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def no_overlap(op: str, written: Dict[str, Optional[torch.Tensor]], read: Dict[str, Optional[torch.Tensor]]) -> None:
    """``ValueError`` when a tensor ``op`` writes in place shares memory with another argument: the
    backends read and write in different orders, so aliased arguments give backend-dependent results."""
    w = [(k, v) for k, v in written.items() if v is not None]
    r = [(k, v) for k, v in read.items() if v is not None]
    for i, (a, ta) in enumerate(w):
        for b, tb in w[i + 1:] + r:
            if overlaps(ta, tb):
                raise ValueError(f"{op}: {a} and {b} share memory; {op} writes {a} in place, so it must not alias "
                                 f"another argument (pass {b}.clone())")


def non_finite_at(t: torch.Tensor) -> str:
    """``"[i, j, k] = inf"`` for the first non-finite element of ``t`` (error messages only)."""
    flat = (~torch.isfinite(t)).reshape(-1).nonzero()
    if flat.numel() == 0:
        return ""
    i = int(flat[0])
    pos = [int(x) for x in torch.unravel_index(torch.tensor(i), t.shape)] if t.dim() else []
    return f"{pos} = {t.reshape(-1)[i].item()}"


def require_finite(name: str, t: torch.Tensor, why: str) -> None:
    """``ValueError`` naming the first NaN/infinity of ``t``; one reduction (``aminmax``) and one
    sync when every value is finite."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.reshape(-1))
    vals = torch.stack([lo, hi]).tolist()
    if all(np.isfinite(vals)):
        return
    raise ValueError(f"{name} contain NaN or infinity (first at {non_finite_at(t)}): {why}")
