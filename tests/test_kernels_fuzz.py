"""Property-based fuzzing (hypothesis) of the four public kernel ops on every CPU backend against a
float64 oracle.

Each test draws shapes (0, 1, primes, and sizes that cross the kernels' vector and block widths),
a dtype (fp32/fp16/bf16; Triton under its interpreter: fp32/fp16), values over several orders of
magnitude, the op's options, and sometimes a non-contiguous view of one input. The contract of
``kne_kernels.api`` is that nothing is copied silently: a non-contiguous input is refused with a
``ValueError`` naming it, a contiguous one (a view with size-1 dimensions can be) must give the
right answer. Results are checked against float64 arithmetic on the same (rounded) inputs with
rigorous error bounds: a float32 sum of n terms in any order is within ``(n - 1) * 2^-24 * sum|x|``
of the exact sum, so a missed, doubled or misplaced term fails.

The budget is fixed (``max_examples`` per backend, ``derandomize=True``: the same examples on every
run, no example database), so the file runs in well under two minutes on one CPU thread.
``pytest tests/test_kernels_fuzz.py --hypothesis-show-statistics`` prints the counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kne_kernels
from kne_kernels import _backends

U = 2.0 ** -24  # float32 unit roundoff
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # spacing at 1
TINY = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}  # smallest subnormal

BACKENDS = ["torch", "cpu", "triton"]
# examples per test and backend: the Triton interpreter runs each kernel program in numpy, slower
EXAMPLES = {"torch": 150, "cpu": 150, "triton": 50}
SIZES = [0, 1, 2, 3, 5, 7, 13, 31, 61, 127, 257]  # 0, 1 and primes
WIDE = [521, 1031]  # past the Triton "wide" block (D >= 512) and several AVX-512 vectors


def fuzz_settings(backend: str):
    return settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def dtypes(backend: str):
    return [torch.float32, torch.float16] if backend == "triton" else [torch.float32, torch.float16, torch.bfloat16]


def require(backend: str) -> None:
    live, why = _backends.status(backend, "cpu")
    if not live:  # CI has all three; a skip would hide a broken build
        pytest.fail(f"{backend} backend not live: {why}")


def values(data, gen: torch.Generator, shape, dtype) -> torch.Tensor:
    """Random values at a drawn order of magnitude (10^-3 .. 10^3), in ``dtype``."""
    mag = 10.0 ** data.draw(st.integers(-3, 3), label="log10 magnitude")
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * mag).to(dtype)


def maybe_strided(data, t: torch.Tensor, label: str) -> torch.Tensor:
    """``t`` itself, or the same values in a strided view (every other element of a larger buffer,
    or a transposed buffer)."""
    kind = data.draw(st.sampled_from(["contiguous"] * 6 + ["step", "transposed"]), label=f"{label} layout")
    if kind == "step" and t.dim() >= 1:
        buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        view = buf[..., ::2]
    elif kind == "transposed" and t.dim() == 2:
        view = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype).t()
    else:
        return t
    view.copy_(t)
    return view


def refused_if_strided(fn, tensors: dict):
    """Run ``fn``; if one of ``tensors`` is not contiguous, it must be refused by name instead."""
    strided = [k for k, t in tensors.items() if t is not None and not t.is_contiguous()]
    if strided:
        event(f"strided {strided[0]}: refused")
        with pytest.raises(ValueError, match=f"{strided[0]} is not contiguous"):
            fn()
        return None
    event("checked against the oracle")
    return fn()


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    err = (got.double() - want).abs()
    bad = ~(err <= tol)  # NaN fails too
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        pos = [int(x) for x in torch.unravel_index(torch.tensor(i), got.shape)]
        raise AssertionError(f"{what}: at {pos} got {got.reshape(-1)[i].item()!r}, float64 oracle "
                             f"{want.reshape(-1)[i].item()!r}, error {err.reshape(-1)[i].item():.3g} > bound "
                             f"{tol.reshape(-1)[i].item():.3g} ({int(bad.sum())} of {got.numel()} elements)")


# ---------------------------------------------------------------------------------------------- neuron_attribution
def _neuron_attribution(backend, data, seed):
    if True:
        gen = torch.Generator().manual_seed(seed)
        dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
        D = data.draw(st.sampled_from(SIZES + WIDE), label="D")
        lead = data.draw(st.lists(st.sampled_from(SIZES), min_size=0, max_size=2), label="leading dims")
        if D * math.prod(lead) > 40_000:
            lead = [min(n, 40_000 // max(D, 1)) for n in lead[:1]]
        shape = (*lead, D)
        N = math.prod(lead)
        act, grad = values(data, gen, shape, dtype), values(data, gen, shape, dtype)
        terms = act.double().reshape(N, D) * grad.double().reshape(N, D)
        kw = {}
        scale_kind = data.draw(st.sampled_from(["none", "float", "tensor"]), label="scale")
        if scale_kind == "float":
            kw["scale"] = data.draw(st.sampled_from([0.5, -1.75, 1.0 / 3.0, 0.0]), label="scale value")
            terms = terms * float(np.float32(kw["scale"]))
        elif scale_kind == "tensor":
            kw["scale"] = torch.rand(N, generator=gen) * 2 - 0.5
            terms = terms * kw["scale"].double()[:, None]
        S = None
        if data.draw(st.booleans(), label="segments"):
            S = data.draw(st.integers(1, 5), label="S")
            seg = torch.randint(0, S, (N,), generator=gen)
            if data.draw(st.booleans(), label="sorted ids"):
                seg = seg.sort().values
            kw["segments"] = seg
            if data.draw(st.booleans(), label="explicit num_segments") or N == 0:
                kw["num_segments"] = S
            else:
                S = int(seg.max()) + 1
        rows = torch.zeros(1 if S is None else S, N, dtype=torch.float64)
        rows[0 if S is None else kw["segments"], torch.arange(N)] = 1.0
        want = rows @ terms  # [S, D] exact sums, up to float64 rounding
        bound = (N + 4) * U * (rows @ terms.abs())
        out0 = None
        if data.draw(st.booleans(), label="out"):
            out0 = torch.randn((D,) if S is None else (S, D), generator=gen)
            kw["out"] = out0.clone()
            want = want.reshape(out0.shape) + out0.double()
            bound = bound.reshape(out0.shape) + 2 * U * want.abs()
        want, bound = want.reshape(-1), bound.reshape(-1)
        a = maybe_strided(data, act, "act")
        got = refused_if_strided(lambda: kne_kernels.neuron_attribution(a, grad, backend=backend, **kw), {"act": a})
        if got is None:
            return
        if out0 is not None:
            assert got is kw["out"]
        assert got.dtype == torch.float32 and got.shape == ((D,) if S is None else (S, D)), got.shape
        assert_within(got.reshape(-1), want, bound, f"neuron_attribution {backend} {dtype} {shape} {sorted(kw)}")



# ---------------------------------------------------------------------------------------------- weight_attribution
def _weight_attribution(backend, data, seed):
    if True:
        gen = torch.Generator().manual_seed(seed)
        dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
        R = data.draw(st.sampled_from(SIZES + WIDE), label="R")
        C = data.draw(st.sampled_from(SIZES + WIDE), label="C")
        if R * C > 60_000:
            C = 60_000 // R
        dim = data.draw(st.sampled_from([0, 1, -1, -2]), label="dim")
        absolute = data.draw(st.booleans(), label="absolute")
        w, g = values(data, gen, (R, C), dtype), values(data, gen, (R, C), dtype)
        terms = w.double() * g.double()
        if absolute:
            terms = terms.abs()
        d = dim % 2
        want = terms.sum(d)
        bound = ((R if d == 0 else C) + 4) * U * terms.abs().sum(d)
        kw = {}
        if data.draw(st.booleans(), label="out"):
            out0 = torch.randn(want.shape, generator=gen)
            kw["out"] = out0.clone()
            want = want + out0.double()
            bound = bound + 2 * U * want.abs()
        ws = maybe_strided(data, w, "weight")
        got = refused_if_strided(lambda: kne_kernels.weight_attribution(ws, g, dim=dim, absolute=absolute,
                                                                        backend=backend, **kw), {"weight": ws})
        if got is None:
            return
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_within(got, want, bound, f"weight_attribution {backend} {dtype} [{R}, {C}] dim={dim} abs={absolute}")



# ---------------------------------------------------------------------------------------------- ensemble_select
def _ensemble_select(backend, data, seed):
    if True:
        gen = torch.Generator().manual_seed(seed)
        R = data.draw(st.sampled_from([1, 2, 3, 5]), label="R")
        L = data.draw(st.sampled_from([1, 2, 3, 7]), label="L")
        D = data.draw(st.sampled_from(SIZES + WIDE), label="D")
        scores = values(data, gen, (R, L, D), torch.float32)
        if data.draw(st.booleans(), label="ties"):
            scores = scores.round(decimals=1)
        percentile = data.draw(st.one_of(st.sampled_from([0.0, 50.0, 90.0, 99.0, 99.9, 100.0]),
                                         st.floats(0.0, 100.0), st.integers(0, 100)), label="percentile")
        aggregate = data.draw(st.sampled_from(["max", "mean"]), label="aggregate")
        positive_only = data.draw(st.booleans(), label="positive_only")
        s = maybe_strided(data, scores, "scores")

        def call():
            return kne_kernels.ensemble_select(s, percentile=percentile, aggregate=aggregate,
                                               positive_only=positive_only, backend=backend)

        if scores.numel() == 0:
            event("empty scores: refused")
            with pytest.raises(ValueError, match="empty|not contiguous"):
                call()
            return
        sel = refused_if_strided(call, {"scores": s})
        if sel is None:
            return
        agg = sel.aggregated
        assert agg.dtype == torch.float32 and agg.shape == (L, D)
        if aggregate == "max":
            assert torch.equal(agg, scores.amax(0)), "max over requests is exact"
        else:
            want = scores.double().mean(0)
            assert_within(agg, want, (R + 4) * U * scores.double().abs().sum(0) / R, f"mean over {R} requests")
        # the threshold: numpy's linear percentile of the aggregated float32 values, bit for bit
        thr = float(np.percentile(agg.reshape(-1).numpy(), percentile))
        assert sel.threshold == thr, (sel.threshold, thr)
        mask = agg > thr
        if positive_only:
            mask &= agg > 0
        assert torch.equal(sel.mask, mask)
        assert torch.equal(sel.counts, mask.sum(1))
        assert [x.tolist() for x in sel.indices] == [row.nonzero()[:, 0].tolist() for row in mask]
        # and the float64 view: nothing kept sits at or below the threshold, nothing left out above it
        assert (agg.double()[mask] > thr).all()
        assert not ((agg.double() > thr) & ((agg > 0) | (not positive_only)) & ~mask).any()



# ---------------------------------------------------------------------------------------------- ensemble_adamw_step_
def _ensemble_adamw_step(backend, data, seed):
    if True:
        gen = torch.Generator().manual_seed(seed)
        wdtype = data.draw(st.sampled_from(dtypes(backend)), label="weight dtype")
        O = data.draw(st.sampled_from(SIZES[1:] + WIDE), label="out features")
        I = data.draw(st.sampled_from(SIZES[1:] + WIDE), label="in features")
        if O * I > 60_000:
            I = max(1, 60_000 // O)
        dim = data.draw(st.sampled_from([0, 1]), label="dim")
        limit = O if dim == 0 else I
        K = data.draw(st.sampled_from([k for k in SIZES if k <= limit] + [limit]), label="K")
        index = torch.randperm(limit, generator=gen)[:K]
        if data.draw(st.booleans(), label="sorted index"):
            index = index.sort().values
        shape = (K, I) if dim == 0 else (O, K)
        weight = values(data, gen, (O, I), wdtype)
        base = weight.index_select(dim, index).contiguous()
        grad = values(data, gen, shape, torch.float32)
        delta = torch.randn(shape, generator=gen) * 0.01
        m = values(data, gen, shape, torch.float32) * 0.1
        v = values(data, gen, shape, torch.float32).square() * 0.01
        step = data.draw(st.integers(1, 6), label="step")
        lr = data.draw(st.sampled_from([1e-3, 5e-3, 0.1]), label="lr")
        scale = data.draw(st.sampled_from([1.0, 0.5, 1.0 / math.sqrt(7)]), label="scale")
        beta1 = data.draw(st.sampled_from([0.9, 0.4, 0.0]), label="beta1")  # 0.4: lerp's other branch
        beta2 = data.draw(st.sampled_from([0.999, 0.9, 0.0]), label="beta2")
        eps = data.draw(st.sampled_from([1e-8, 1e-6]), label="eps")
        wd = data.draw(st.sampled_from([0.0, 0.01]), label="weight_decay")

        # float64 oracle on the same float32 inputs
        d0, m0, v0, g = delta.double(), m.double(), v.double(), grad.double()
        d1 = d0 * (1 - lr * wd)
        m1 = m0 + (1 - beta1) * (g - m0)
        v1 = v0 * beta2 + (1 - beta2) * g * g
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = v1.sqrt() / math.sqrt(bc2) + eps
        upd = (lr / bc1) * m1 / denom
        d2 = d1 - upd
        w2 = base.double() + scale * d2
        tol_m = 4 * U * (m0.abs() + g.abs())
        tol_v = 4 * U * v1
        tol_d = 16 * U * (d0.abs() + d2.abs() + (lr / bc1) * (m0.abs() + g.abs() + m1.abs()) / denom)
        tol_w = (EPS[wdtype] / 2) * w2.abs() + TINY[wdtype] + scale * tol_d + 4 * U * (base.double().abs() + scale * d2.abs())

        args = dict(weight=weight.clone(), index=index, grad=maybe_strided(data, grad, "grad"), delta=delta.clone(),
                    exp_avg=m.clone(), exp_avg_sq=v.clone(), base=base)
        w_before = args["weight"].clone()

        def call():
            kne_kernels.ensemble_adamw_step_(*args.values(), step=step, lr=lr, scale=scale, dim=dim, beta1=beta1,
                                             beta2=beta2, eps=eps, weight_decay=wd, backend=backend)
            return True

        if refused_if_strided(call, {"grad": args["grad"]}) is None:
            assert torch.equal(args["delta"], delta) and torch.equal(args["weight"], w_before), "written on a refusal"
            return
        what = f"adamw {backend} {wdtype} [{O}, {I}] dim={dim} K={K} step={step} b1={beta1} b2={beta2} wd={wd}"
        assert_within(args["exp_avg"], m1, tol_m, what + " exp_avg")
        assert_within(args["exp_avg_sq"], v1, tol_v, what + " exp_avg_sq")
        assert_within(args["delta"], d2, tol_d, what + " delta")
        assert_within(args["weight"].index_select(dim, index), w2, tol_w, what + " weight rows")
        keep = torch.ones(limit, dtype=torch.bool)
        keep[index] = False
        rest = keep.nonzero()[:, 0]
        assert torch.equal(args["weight"].index_select(dim, rest), w_before.index_select(dim, rest)), \
            what + ": wrote outside the ensemble"



# ---------------------------------------------------------------------------------------------- the tests
# One test per op and backend (own example budget, own statistics line).
def _make(body, backend):
    @fuzz_settings(backend)
    @given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1))
    def test(data, seed):
        require(backend)
        body(backend, data, seed)

    test.__name__ = test.__qualname__ = f"test_fuzz_{body.__name__.lstrip('_')}_{backend}"
    return test


for _backend in BACKENDS:
    for _body in (_neuron_attribution, _weight_attribution, _ensemble_select, _ensemble_adamw_step):
        _t = _make(_body, _backend)
        globals()[_t.__name__] = _t
del _backend, _body, _t
