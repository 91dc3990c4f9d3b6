"""kne_kernels.reference: the pure-torch ops against NumPy, float64 and torch.optim.AdamW."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import kne_kernels
from kne_kernels import reference as R
from helpers import NUMPY_PERCENTILE_EXACT, numpy_percentile_exact

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floats inside the test, so unwritten outputs show."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def test_package_exports_the_ops_and_keeps_the_reference_beside_them():
    """The package's public ops dispatch to kernels; kne_kernels.reference keeps the plain versions."""
    for name in ("neuron_attribution", "weight_attribution", "ensemble_select", "ensemble_adamw_step_"):
        assert callable(getattr(kne_kernels, name)) and callable(getattr(R, name))
        assert getattr(kne_kernels, name) is not getattr(R, name)
    assert kne_kernels.percentile_linear is R.percentile_linear


# ---------------------------------------------------------------------------------------------- percentile
def _bits(x) -> bytes:
    return np.float32(x).tobytes()


def _arrays(rng: np.random.Generator):
    for n in [1, 2, 3, 5, 7, 10, 11, 96, 100, 101, 144, 1000, 4097]:
        yield rng.standard_normal(n).astype(np.float32)
        yield (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8)).astype(np.float32)
        yield rng.integers(-3, 4, n).astype(np.float32)  # many ties
        yield np.full(n, rng.standard_normal(), dtype=np.float32)  # all equal
        yield np.concatenate([np.zeros(n // 2 + 1), rng.exponential(size=n)]).astype(np.float32)[:n]


PERCENTILES = [0, 100, 50, 90, 95, 99, 99.9, 99.99, 12.5, 33.3, 66.7, 1e-9, 100 - 1e-9, 25, 75, 60, 70, 85]


@numpy_percentile_exact
def test_percentile_linear_equals_numpy_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    checked = 0
    for arr in _arrays(rng):
        ps = PERCENTILES + rng.uniform(0, 100, 4).tolist()
        t = torch.from_numpy(arr.copy())
        for p in ps:
            got = R.percentile_linear(t, p)
            want = np.percentile(arr, p)
            assert want.dtype == np.float32
            assert isinstance(got, float)
            assert _bits(got) == _bits(want), f"n={arr.size} p={p}: {got!r} vs numpy {want!r}"
            checked += 1
        assert torch.equal(t, torch.from_numpy(arr)), "percentile_linear modified its input"
    assert checked > 1000


def test_percentile_linear_on_multidimensional_input_and_extremes(gen):
    x = torch.randn(3, 5, 7, generator=gen)
    for p in (0.0, 100.0, 42.0):
        if NUMPY_PERCENTILE_EXACT or p in (0.0, 100.0):
            assert _bits(R.percentile_linear(x, p)) == _bits(np.percentile(x.numpy().reshape(-1), p))
    assert R.percentile_linear(x, 0.0) == x.min().item()
    assert R.percentile_linear(x, 100.0) == x.max().item()
    one = torch.tensor([2.5])
    assert R.percentile_linear(one, 0.0) == R.percentile_linear(one, 99.0) == R.percentile_linear(one, 100.0) == 2.5


def test_percentile_linear_rejects_bad_input():
    with pytest.raises(TypeError, match="float32"):
        R.percentile_linear(torch.arange(5.0, dtype=torch.float64), 50)
    with pytest.raises(TypeError, match="float32"):
        R.percentile_linear(torch.arange(5), 50)
    with pytest.raises(ValueError, match="empty"):
        R.percentile_linear(torch.empty(0), 50)


# ---------------------------------------------------------------------------------------------- ensemble_select
def _select_numpy(scores: np.ndarray, percentile: float, aggregate: str, positive_only: bool):
    agg = scores.max(0) if aggregate == "max" else scores.mean(0, dtype=np.float32)
    thr = np.percentile(agg, percentile)
    keep = agg > thr
    if positive_only:
        keep &= agg > 0
    return agg, thr, keep


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("positive_only", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 7), (4, 3, 33), (2, 30, 97), (5, 1, 4097)])
def test_ensemble_select_matches_numpy(shape, aggregate, positive_only, gen):
    scores = torch.randn(*shape, generator=gen)
    for p in (0.0, 50.0, 90.0, 99.0, 100.0, float(torch.rand(1, generator=gen)) * 100):
        sel = R.ensemble_select(scores, percentile=p, aggregate=aggregate, positive_only=positive_only)
        agg, thr, keep = _select_numpy(scores.numpy(), p, aggregate, positive_only)
        assert sel.aggregated.dtype == torch.float32
        assert np.allclose(sel.aggregated.numpy(), agg, rtol=1e-6, atol=1e-7)
        if aggregate == "max":
            assert np.array_equal(sel.aggregated.numpy(), agg)
            if NUMPY_PERCENTILE_EXACT:
                assert _bits(sel.threshold) == _bits(thr)
                assert np.array_equal(sel.mask.numpy(), keep)
        # the selection is exactly "aggregated > threshold (and > 0)" on the op's own aggregate
        a = sel.aggregated
        expect = (a > sel.threshold) & ((a > 0) if positive_only else True)
        assert torch.equal(sel.mask, expect)
        assert sel.mask.dtype == torch.bool and tuple(sel.mask.shape) == shape[1:]
        assert torch.equal(sel.counts, sel.mask.sum(1))
        assert len(sel.indices) == shape[1]
        for row, idx in zip(sel.mask, sel.indices):
            assert idx.dtype == torch.long
            assert idx.tolist() == torch.nonzero(row).reshape(-1).tolist()
            assert idx.tolist() == sorted(idx.tolist())
        if p == 100.0:
            assert int(sel.counts.sum()) == 0


def test_ensemble_select_is_global_across_layers(gen):
    """One threshold over all layers: a layer of small scores gets nothing."""
    scores = torch.rand(2, 3, 50, generator=gen)
    scores[:, 1] += 10.0
    sel = R.ensemble_select(scores, percentile=70.0)
    # 150 values: the 70th percentile lies between the 105th and 106th smallest, so the 45 largest
    # (all in layer 1) are kept; a per-layer threshold would keep 15 in every layer
    assert sel.counts.tolist() == [0, 45, 0]
    assert sel.indices[1].tolist() == scores[:, 1].amax(0).argsort()[5:].sort().values.tolist()


def test_ensemble_select_ties_and_empty_results():
    # all equal: nothing is strictly above the threshold
    sel = R.ensemble_select(torch.full((2, 2, 5), 0.7), percentile=10.0)
    assert int(sel.counts.sum()) == 0 and all(i.numel() == 0 for i in sel.indices)
    assert sel.threshold == pytest.approx(0.7)
    # ties at the threshold are excluded (strict >), values above kept
    s = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 3.0, 3.0]]])
    sel = R.ensemble_select(s, percentile=50.0)
    assert sel.threshold == 2.0
    assert sel.indices[0].tolist() == [4, 5]
    # all scores negative: positive_only keeps nothing, without it the top ones are kept
    neg = -torch.arange(1.0, 21.0).reshape(1, 2, 10)
    assert int(R.ensemble_select(neg, percentile=50.0).counts.sum()) == 0
    sel = R.ensemble_select(neg, percentile=80.0, positive_only=False)
    assert sel.indices[0].tolist() == [0, 1, 2, 3] and sel.indices[1].numel() == 0
    # zeros are never positive
    z = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 1.0]]])
    assert R.ensemble_select(z, percentile=10.0).indices[0].tolist() == [4]
    assert R.ensemble_select(z, percentile=0.0).indices[0].tolist() == [4]
    # max vs mean aggregation differ: one request's spike is kept by max only
    s = torch.zeros(4, 1, 10)
    s[:, 0, :] = torch.linspace(0.1, 1.0, 10)
    s[0, 0, 0] = 2.0
    assert 0 in R.ensemble_select(s, percentile=80.0, aggregate="max").indices[0].tolist()
    assert R.ensemble_select(s, percentile=80.0, aggregate="mean").indices[0].tolist() == [8, 9]


@pytest.mark.parametrize("bad, kw, match", [
    (torch.zeros(2, 3), {}, "float32 tensor"),
    (torch.zeros(1, 2, 3, 4), {}, "float32 tensor"),
    (torch.zeros(1, 2, 3, dtype=torch.float64), {}, "float32"),
    (torch.zeros(1, 2, 3, dtype=torch.float16), {}, "float32"),
    (torch.zeros(1, 2, 3, dtype=torch.int64), {}, "float32"),
    (np.zeros((1, 2, 3), dtype=np.float32), {}, "float32 tensor"),
    (torch.zeros(0, 2, 3), {}, "empty"),
    (torch.zeros(1, 0, 3), {}, "empty"),
    (torch.zeros(1, 2, 3), {"percentile": -0.1}, "percentile"),
    (torch.zeros(1, 2, 3), {"percentile": 100.5}, "percentile"),
    (torch.zeros(1, 2, 3), {"percentile": float("nan")}, "percentile"),
    (torch.zeros(1, 2, 3), {"aggregate": "sum"}, "aggregate"),
    (torch.tensor([[[1.0, float("nan"), 2.0]]]), {}, "NaN"),
    (torch.tensor([[[1.0, float("inf"), 2.0]]]), {}, "infinity"),
    (torch.tensor([[[1.0, -float("inf"), 2.0]]]), {}, "infinity"),
])
def test_ensemble_select_rejects_bad_input(bad, kw, match):
    with pytest.raises(ValueError, match=match):
        R.ensemble_select(bad, **kw)


# ---------------------------------------------------------------------------------------------- neuron_attribution
def _low_precision_error(act, grad, ref64):
    """Error of the plain torch expression run in the inputs' own precision (flash-attention's rule)."""
    plain = (act * grad).sum(0)
    return (plain.double() - ref64).abs().max().item()


def _tol(dtype, act64, grad64):
    """Absolute tolerance: float32 accumulation error relative to the magnitude summed."""
    mag = (act64 * grad64).abs().sum(0).max().item()
    return 2e-6 * mag + 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, D", [(1, 1), (1, 7), (7, 1), (7, 7), (4097, 7), (13, 4097), (0, 5)])
def test_neuron_attribution_matches_float64(N, D, dtype, gen, poison_empty):
    act = torch.randn(N, D, generator=gen).to(dtype)
    grad = (torch.randn(N, D, generator=gen) * 1e-3).to(dtype)
    act_c, grad_c = act.clone(), grad.clone()
    a64, g64 = act.double(), grad.double()
    ref = (a64 * g64).sum(0)
    out = R.neuron_attribution(act, grad)
    assert out.dtype == torch.float32 and tuple(out.shape) == (D,)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item() if D else 0.0
    assert err <= _tol(dtype, a64, g64), err
    if dtype != torch.float32 and N > 100:  # much better than the same sum in low precision
        assert err <= 2 * _low_precision_error(act, grad, ref) + _tol(dtype, a64, g64)
    assert torch.equal(act, act_c) and torch.equal(grad, grad_c), "inputs modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_neuron_attribution_leading_dims_segments_and_scale(dtype, gen, poison_empty):
    B, T, D, S = 3, 7, 33, 5
    act = torch.randn(B, T, D, generator=gen).to(dtype)
    grad = torch.randn(B, T, D, generator=gen).to(dtype)
    a64, g64 = act.double().reshape(-1, D), grad.double().reshape(-1, D)
    N = B * T
    # leading dims flattened
    full = R.neuron_attribution(act, grad)
    assert (full.double() - (a64 * g64).sum(0)).abs().max() <= _tol(dtype, a64, g64)
    # segments (segment 3 unused, num_segments larger than the largest id)
    seg = torch.randint(0, 3, (N,), generator=gen)
    seg[seg == 2] = 4
    scale_t = torch.rand(N, generator=gen) + 0.5
    for scale in (None, 0.25, scale_t, scale_t.to(torch.float64)):
        s64 = torch.ones(N, dtype=torch.float64) if scale is None else (
            scale.double() if isinstance(scale, torch.Tensor) else torch.full((N,), scale, dtype=torch.float64))
        out = R.neuron_attribution(act, grad, segments=seg, num_segments=S, scale=scale)
        assert out.dtype == torch.float32 and tuple(out.shape) == (S, D)
        expect = torch.zeros(S, D, dtype=torch.float64)
        for n in range(N):
            expect[seg[n]] += s64[n] * a64[n] * g64[n]
        assert (out.double() - expect).abs().max() <= _tol(dtype, a64 * s64[:, None], g64)
        assert torch.equal(out[3], torch.zeros(D)) and torch.equal(out[2], torch.zeros(D))
        # summing the segments gives the unsegmented result
        un = R.neuron_attribution(act, grad, scale=scale)
        assert torch.allclose(out.sum(0), un, rtol=1e-5, atol=1e-5 * (a64 * g64).abs().sum(0).max().item())
    # num_segments inferred from the largest id
    assert tuple(R.neuron_attribution(act, grad, segments=seg).shape) == (5, D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neuron_attribution_out_accumulates_in_place(dtype, gen):
    N, D, S = 7, 4097, 2
    act = torch.randn(N, D, generator=gen).to(dtype)
    grad = torch.randn(N, D, generator=gen).to(dtype)
    seg = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    base = torch.randn(S, D, generator=gen)
    out = base.clone()
    res = R.neuron_attribution(act, grad, segments=seg, num_segments=S, scale=0.5, out=out)
    assert res is out
    fresh = R.neuron_attribution(act, grad, segments=seg, num_segments=S, scale=0.5)
    assert torch.allclose(out, base + fresh, rtol=0, atol=1e-5)
    # twice: accumulates again
    R.neuron_attribution(act, grad, segments=seg, num_segments=S, scale=0.5, out=out)
    assert torch.allclose(out, base + 2 * fresh, rtol=0, atol=2e-5)
    # NaN in out stays NaN (it is added to, not overwritten)
    poisoned = torch.full((S, D), float("nan"))
    R.neuron_attribution(act, grad, segments=seg, num_segments=S, out=poisoned)
    assert torch.isnan(poisoned).all()


def test_neuron_attribution_rejects_bad_input():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        R.neuron_attribution(a, torch.randn(4, 2))
    with pytest.raises(TypeError, match="dtype"):
        R.neuron_attribution(a.double(), a.double())
    with pytest.raises(TypeError, match="dtype"):
        R.neuron_attribution(a, torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        R.neuron_attribution(a.numpy(), a)
    with pytest.raises(ValueError, match="at least one dimension"):
        R.neuron_attribution(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="scale"):
        R.neuron_attribution(a, a, scale=torch.ones(3))
    with pytest.raises(ValueError, match="num_segments"):
        R.neuron_attribution(a, a, num_segments=2)
    with pytest.raises(ValueError, match="segments"):
        R.neuron_attribution(a, a, segments=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="segments"):
        R.neuron_attribution(a, a, segments=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="segment ids"):
        R.neuron_attribution(a, a, segments=torch.tensor([0, 1, 2, 3]), num_segments=3)
    with pytest.raises(ValueError, match="segment ids"):
        R.neuron_attribution(a, a, segments=torch.tensor([0, -1, 0, 0]), num_segments=3)
    with pytest.raises(ValueError, match="out"):
        R.neuron_attribution(a, a, out=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        R.neuron_attribution(a, a, out=torch.zeros(4))


# ---------------------------------------------------------------------------------------------- weight_attribution
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 7), (33, 4097)])
def test_weight_attribution_dims_and_absolute(shape, dtype, gen, poison_empty):
    w = torch.randn(*shape, generator=gen).to(dtype)
    g = torch.randn(*shape, generator=gen).to(dtype)
    w64, g64 = w.double(), g.double()
    for dim in (0, 1, -1):
        for absolute in (False, True):
            prod = w64 * g64
            if absolute:
                prod = prod.abs()
            expect = prod.sum(dim)
            got = R.weight_attribution(w, g, dim=dim, absolute=absolute)
            assert got.dtype == torch.float32 and got.shape == expect.shape
            tol = 2e-6 * (w64 * g64).abs().sum(dim).max().item() + 1e-12
            assert (got.double() - expect).abs().max().item() <= tol, (dim, absolute)
            if absolute:
                assert (got >= 0).all()
    signed, absval = R.weight_attribution(w, g), R.weight_attribution(w, g, absolute=True)
    if shape[1] > 1:
        assert not torch.equal(signed, absval)
    # out= accumulates
    base = torch.randn(shape[0], generator=gen)
    out = base.clone()
    assert R.weight_attribution(w, g, dim=1, out=out) is out
    assert torch.allclose(out, base + signed, rtol=0, atol=1e-4)


def test_weight_attribution_rejects_bad_input():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        R.weight_attribution(w, w.t())
    with pytest.raises(TypeError, match="dtype"):
        R.weight_attribution(w.double(), w.double())
    with pytest.raises(ValueError, match="out"):
        R.weight_attribution(w, w, dim=0, out=torch.zeros(3))


# ---------------------------------------------------------------------------------------------- ensemble_adamw_step_
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_ensemble_adamw_step_equals_torch_adamw(dim, dtype, weight_decay, gen):
    out_f, in_f = 37, 29
    K = 5
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    n = out_f if dim == 0 else in_f
    index = torch.randperm(n, generator=gen)[:K].sort().values
    shape = (K, in_f) if dim == 0 else (out_f, K)
    base = weight.index_select(dim, index).clone()
    delta0 = torch.randn(shape, generator=gen) * 0.01
    scale, lr = 0.7, 3e-2
    # the op's state
    w = weight.clone()
    delta, m1, m2 = delta0.clone(), torch.zeros(shape), torch.zeros(shape)
    # torch.optim.AdamW on the same delta
    p = torch.nn.Parameter(delta0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay)
    w_ref = weight.clone()
    for step in range(1, 5):
        g = torch.randn(shape, generator=gen)
        if step == 3:
            g[0] = 0.0  # a zero-gradient row: moments decay, the step still moves it
        R.ensemble_adamw_step_(w, index, g.clone(), delta, m1, m2, base, step=step, lr=lr, scale=scale, dim=dim,
                               weight_decay=weight_decay)
        p.grad = g.clone()
        opt.step()
        w_ref.index_copy_(dim, index, (base.float() + scale * p.detach()).to(dtype))
        assert torch.equal(delta, p.detach()), f"step {step}: delta differs from torch.optim.AdamW"
        st = opt.state[p]
        assert torch.equal(m1, st["exp_avg"]) and torch.equal(m2, st["exp_avg_sq"])
        assert torch.equal(w, w_ref), f"step {step}: weight differs"
    # rows (columns) outside the index untouched, bit for bit
    keep = torch.ones(n, dtype=torch.bool)
    keep[index] = False
    if dim == 0:
        assert torch.equal(w[keep], weight[keep])
        assert not torch.equal(w[index], weight[index])
    else:
        assert torch.equal(w[:, keep], weight[:, keep])
        assert not torch.equal(w[:, index], weight[:, index])
    assert w.dtype == dtype


def test_ensemble_adamw_step_rejects_bad_input():
    w = torch.randn(6, 4)
    idx = torch.tensor([1, 3])
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    ok = dict(grad=z(2, 4), delta=z(2, 4), exp_avg=z(2, 4), exp_avg_sq=z(2, 4), base=w[idx].clone())

    def call(**over):
        a = dict(ok, **over)
        kw = {k: a.pop(k) for k in list(a) if k in ("step", "lr", "scale", "dim")}
        kw.setdefault("step", 1), kw.setdefault("lr", 1e-3), kw.setdefault("scale", 1.0)
        R.ensemble_adamw_step_(a.pop("weight", w), a.pop("index", idx), a["grad"], a["delta"], a["exp_avg"],
                               a["exp_avg_sq"], a["base"], **kw)

    with pytest.raises(ValueError, match="2-D"):
        call(weight=torch.randn(6, 4, 1))
    with pytest.raises(TypeError, match="dtype"):
        call(weight=w.double())
    with pytest.raises(ValueError, match="dim"):
        call(dim=2)
    with pytest.raises(ValueError, match="index"):
        call(index=idx.int())
    with pytest.raises(ValueError, match="index"):
        call(index=idx[None])
    with pytest.raises(ValueError, match="grad"):
        call(grad=z(3, 4))
    with pytest.raises(ValueError, match="delta"):
        call(delta=z(2, 4).double())
    with pytest.raises(ValueError, match="exp_avg_sq"):
        call(exp_avg_sq=z(4, 2))
    with pytest.raises(ValueError, match="base"):
        call(base=w[idx].half())
    with pytest.raises(ValueError, match="step"):
        call(step=0)
    w0 = w.clone()
    call()  # the valid call works and writes only rows 1 and 3
    keep = torch.tensor([0, 2, 4, 5])
    assert torch.equal(w[keep], w0[keep])


def test_adamw_update_matches_torch_adamw_over_many_steps(gen):
    p0 = torch.randn(17, 3, generator=gen)
    p, m1, m2 = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    q = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([q], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    for step in range(1, 31):
        g = torch.randn(17, 3, generator=gen)
        R.adamw_update_(p, g, m1, m2, step=step, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.3)
        q.grad = g
        opt.step()
    assert torch.equal(p, q.detach())
