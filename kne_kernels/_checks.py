"""Argument rules of the public ops (``kne_kernels.ops.<op>``), checked before any backend runs, so
every backend accepts and refuses the same inputs with the same message:

* tensors have an accepted dtype and rank and are contiguous (nothing is copied or cast silently),
  and all of one call's tensors are on one device;
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
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

# The float dtypes every op takes (inputs, weights); results and optimizer state are float32.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, t, dtypes: Optional[Sequence[torch.dtype]] = None, dim: Optional[int] = None) -> torch.Tensor:
    """``t`` if it is a contiguous tensor of one of ``dtypes`` with ``dim`` dimensions; ``TypeError``
    (not a tensor, wrong dtype) or ``ValueError`` (rank, strides) naming ``name`` and the fix."""
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


def same_device(**tensors) -> torch.device:
    """The one device of the given tensors (``None`` values skipped); ``ValueError`` listing them otherwise."""
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        raise ValueError("all tensors must be on one device; got " + ", ".join(f"{k} on {d}" for k, d in devs.items()))
    return first


def finite_number(name: str, value) -> float:
    """``value`` as a float: an int or float (not a bool) that is finite; ``ValueError`` otherwise."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


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
    """Bytes ``[start, end)`` from the first to the last element of ``t`` (strides are >= 0), or
    ``None`` for an empty tensor or one on the meta device (no memory)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    start = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.device, start, start + (last + 1) * t.element_size()


def _spans_meet(a, b) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory: their byte spans intersect (exact for the contiguous
    tensors the ops take; for strided views, interleaved but disjoint ones count as sharing)."""
    return _spans_meet(_span(a), _span(b))


def no_overlap(op: str, written: Dict[str, Optional[torch.Tensor]], read: Dict[str, Optional[torch.Tensor]]) -> None:
    """``ValueError`` when a tensor ``op`` writes in place shares memory with another argument: the
    backends read and write in different orders, so aliased arguments give backend-dependent results."""
    w = [(k, _span(v)) for k, v in written.items() if v is not None]
    r = [(k, _span(v)) for k, v in read.items() if v is not None]
    for i, (a, sa) in enumerate(w):
        for b, sb in w[i + 1:] + r:
            if _spans_meet(sa, sb):
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
