"""``neuron_attribution``: per-neuron attribution scores, ``sum_n scale[n] * act[n, d] * grad[n, d]``.

Dispatcher op ``kne::neuron_attribution_(Tensor(a!) out, Tensor act, Tensor grad, Tensor? segments,
Tensor? scale, float scale_value) -> ()``:
``out[seg[n], d] += scale_value * scale[n] * act[n, d] * grad[n, d]`` over ``n``, products and
sums in float32. ``act``/``grad`` ``[N, D]`` (fp32/fp16/bf16, one dtype), ``out`` fp32 ``[S, D]``;
``segments`` None (then ``S == 1``) or int64 ``[N]`` with ids in ``[0, S)``; ``scale`` None or
fp32 ``[N]``. Kernels: ``triton/neuron_attribution.py``, ``csrc/cpu/neuron_attribution.cpp``,
``csrc/cuda/neuron_attribution.cu``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import _backends, _checks
from ._registry import OpDef, close, generator


def neuron_attribution_torch(out: torch.Tensor, act: torch.Tensor, grad: torch.Tensor,
                             segments: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                             scale_value: float) -> None:
    """The pure-torch kernel (the default, and the reference): ``((act * grad) * scale[n]) *
    scale_value`` in float32, summed over rows into ``out`` (per segment with ``segments``)."""
    prod = act.float() * grad.float()
    if scale is not None:
        prod = prod * scale[:, None]
    if scale_value != 1.0:
        prod = prod * scale_value
    if segments is None:
        out[0].add_(prod.sum(0))
    else:
        out.index_add_(0, segments, prod)


def _fake(out, act, grad, segments, scale, scale_value) -> None:
    return None


def _selfcheck(impl, ref, device):
    g = generator()
    act = torch.randn(37, 129, generator=g).to(device)
    grad = torch.randn(37, 129, generator=g).to(device)
    seg = torch.randint(0, 3, (37,), generator=g).to(device)
    scale = torch.rand(37, generator=g).to(device)
    outs = [torch.randn(3, 129, generator=generator(7)).to(device) for _ in range(2)]
    impl(outs[0], act, grad, seg, scale, 0.5)
    ref(outs[1], act, grad, seg, scale, 0.5)
    return close(outs[0], outs[1], 1e-5)


OPS = (OpDef("neuron_attribution_",
             "(Tensor(a!) out, Tensor act, Tensor grad, Tensor? segments, Tensor? scale, float scale_value) -> ()",
             neuron_attribution_torch, _fake, _selfcheck),)


def neuron_attribution(act: torch.Tensor, grad: torch.Tensor, *, segments: Optional[torch.Tensor] = None,
                       num_segments: Optional[int] = None, scale: Union[None, float, torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Per-neuron attribution ``sum_n scale[n] * act[n, d] * grad[n, d]``, float32.

    ``act``/``grad``: ``[..., D]`` (leading dimensions are flattened to ``N``), float32, float16 or
    bfloat16, same dtype, contiguous. Returns ``[D]``, or ``[num_segments, D]`` with ``segments``
    (int64 ``[N]`` of ids; ``num_segments``, an integer >= 0, defaults to ``max + 1``). ``scale``:
    ``None``, a float, or a float32 ``[N]`` tensor (IG step weights). With ``out`` (float32, the
    result's shape, sharing no memory with the inputs) the result is added into ``out`` in place
    and ``out`` is returned. Empty inputs are valid: ``D == 0`` gives ``[0]`` (``[S, 0]``),
    ``N == 0`` zeros. ``backend``: see :mod:`kne_kernels._backends`.

    >>> a, g = torch.randn(6, 4), torch.randn(6, 4)
    >>> torch.allclose(neuron_attribution(a, g), (a * g).sum(0), atol=1e-6)
    True
    >>> neuron_attribution(a, g, segments=torch.tensor([0, 0, 1, 1, 1, 2])).shape
    torch.Size([3, 4])
    """
    _checks.tensor("act", act, _checks.FLOAT_DTYPES)
    _checks.tensor("grad", grad, _checks.FLOAT_DTYPES)
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
        _checks.tensor("scale", scale, (torch.float32,), dim=1)
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
        _checks.tensor("segments", segments, (torch.int64,), dim=1)
        if segments.shape[0] != N:
            raise ValueError(f"segments must have shape [N]=[{N}] (one id per row), got {tuple(segments.shape)}")
        lo, hi = torch.stack(torch.aminmax(segments)).tolist() if N else (0, -1)  # one sync
        S = hi + 1 if num_segments is None else _checks.count("num_segments", num_segments)
        if N and (lo < 0 or hi >= S):
            raise ValueError(f"segment ids must lie in [0, num_segments={S}), got [{lo}, {hi}]")
    device = _checks.same_device(act=act, grad=grad, segments=segments, scale=scale_t, out=out)
    want = (D,) if segments is None else (S, D)
    if out is not None:
        _checks.tensor("out", out, (torch.float32,))
        if tuple(out.shape) != want:
            raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
        _checks.no_overlap("neuron_attribution", {"out": out}, {"act": act, "grad": grad, "segments": segments,
                                                                "scale": scale_t})
        target = out.view(1, D) if segments is None else out
    else:
        target = torch.zeros((S, D), dtype=torch.float32, device=device)
    if N and D and S:
        _backends.kernel("neuron_attribution_", backend, device)[1](target, a2, g2, segments, scale_t, scale_v)
    if out is not None:
        return out
    return target[0] if segments is None else target
