"""One small case per op, run against the torch kernel the first time a GPU backend is used."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> Tuple[bool, str]:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if a.dtype == torch.bool or not a.is_floating_point():
        ok = torch.equal(a, b)
        return ok, "" if ok else "values differ"
    err = (a.double() - b.double()).abs().max().item() / max(1e-12, b.double().abs().max().item())
    return err <= tol, f"relative error {err:.2e}"


def _gen(device) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(1234)


def _neuron(impl: Callable, ref: Callable, device) -> Tuple[bool, str]:
    g = _gen(device)
    act = torch.randn(37, 129, generator=g).to(device)
    grad = torch.randn(37, 129, generator=g).to(device)
    seg = torch.randint(0, 3, (37,), generator=g).to(device)
    scale = torch.rand(37, generator=g).to(device)
    outs = [torch.randn(3, 129, generator=torch.Generator().manual_seed(7)).to(device) for _ in range(2)]
    impl(outs[0], act, grad, seg, scale, 0.5)
    ref(outs[1], act, grad, seg, scale, 0.5)
    return _close(outs[0], outs[1], 1e-5)


def _weight(impl, ref, device):
    g = _gen(device)
    w = torch.randn(65, 33, generator=g).to(device)
    gr = torch.randn(65, 33, generator=g).to(device)
    for dim in (0, 1):
        a = torch.zeros(w.shape[1 - dim], device=device)
        b = torch.zeros(w.shape[1 - dim], device=device)
        impl(a, w, gr, dim, dim == 0)
        ref(b, w, gr, dim, dim == 0)
        ok, why = _close(a, b, 1e-5)
        if not ok:
            return ok, f"dim={dim}: {why}"
    return True, ""


def _aggregate(impl, ref, device):
    """``max`` must be exact; ``mean`` is compared with a float32 sum in order r = 0..R-1 (the op's
    definition), computed on the CPU: the device's own ``torch.mean`` may reduce in another order."""
    s = torch.randn(3, 517, generator=_gen(device))
    want = {0: s.amax(0), 1: (s[0] + s[1] + s[2]) / 3}
    for mode, tol in ((0, 0.0), (1, 1e-6)):
        ok, why = _close(impl(s.to(device), mode).cpu(), want[mode], tol)
        if not ok:
            return ok, f"mode={mode}: {why}"
    return True, ""


def _order(impl, ref, device):
    v = torch.randn(5000, generator=_gen(device)).round(decimals=2).to(device)
    for k in (0, 17, 2500, 4999):
        ok, why = _close(impl(v, k), ref(v, k), 0.0)
        if not ok:
            return ok, f"k={k}: {why}"
    return True, ""


def _mask(impl, ref, device):
    v = torch.randn(7, 300, generator=_gen(device)).to(device)
    a, b = impl(v, 0.25, True), ref(v, 0.25, True)
    ok, why = _close(a[0], b[0], 0.0)
    if ok:
        ok, why = _close(a[1], b[1], 0.0)
    return ok, why


def _adamw(impl, ref, device):
    idx = torch.tensor([2, 9, 30], device=device)
    res = []
    for fn in (impl, ref):
        w = torch.randn(41, 19, generator=torch.Generator().manual_seed(3)).to(device)
        grad = torch.randn(3, 19, generator=torch.Generator().manual_seed(4)).to(device)
        state = [torch.randn(3, 19, generator=torch.Generator().manual_seed(5 + i)).to(device).abs() for i in range(3)]
        base = w[idx].clone()
        fn(w, idx, grad, state[0], state[1], state[2], base, 3, 1e-2, 0.7, 0, 0.9, 0.999, 1e-8, 0.01)
        res.append((w, state[0]))
    ok, why = _close(res[0][0], res[1][0], 1e-5)
    if ok:
        ok, why = _close(res[0][1], res[1][1], 1e-5)
    return ok, why


def _project(impl, ref, device):
    g = _gen(device)
    basis = torch.linalg.qr(torch.randn(77, 20, generator=g)).Q.contiguous().to(device)
    idx = torch.tensor([1, 5, 6], device=device)
    res = []
    for fn in (impl, ref):
        w = torch.randn(9, 77, generator=torch.Generator().manual_seed(3)).to(device)
        delta = torch.randn(3, 77, generator=torch.Generator().manual_seed(4)).to(device)
        fn(w, idx, delta, basis, w[idx].clone(), 0.3)
        res.append((w, delta))
    ok, why = _close(res[0][0], res[1][0], 1e-5)
    if ok:
        ok, why = _close(res[0][1], res[1][1], 1e-5)
    return ok, why


CASES: Dict[str, Callable] = {
    "neuron_attribution_": _neuron,
    "weight_attribution_": _weight,
    "ensemble_aggregate": _aggregate,
    "order_statistics": _order,
    "threshold_mask": _mask,
    "ensemble_adamw_step_": _adamw,
    "nullspace_project_": _project,
}
