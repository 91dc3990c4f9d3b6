"""The public kne_kernels API: backend routing, validation, the op registry, the first-use check."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import kne_kernels
from kne_kernels import _backends, _extension, _ops, _selfcheck
from kne_kernels import reference as ref
from helpers import NUMPY_PERCENTILE_EXACT, numpy_percentile_exact

CPU = torch.device("cpu")


def live_cpu_backends():
    return [b for b in ("torch", "cpu", "triton") if _backends.status(b, "cpu")[0]]


# ---------------------------------------------------------------------------------------------- registry
def test_every_schema_defined_once_with_default_and_fake():
    for name, schema in _ops.SCHEMAS.items():
        dump = torch._C._dispatch_dump(f"kne::{name}")
        assert f"kne::{name}{schema}".replace(" ", "") in dump.replace(" ", ""), dump
        keys = _extension.registered_keys(name)
        assert "CompositeExplicitAutograd" in keys and "Meta" in keys, keys


def test_cpu_extension_is_live_in_ci():
    """CI builds the C++ library: its CPU kernels must be registered for every op (a skip would hide a
    broken build)."""
    live, why = _backends.status("cpu", "cpu")
    assert live, why
    for name in _ops.SCHEMAS:
        assert "CPU" in _extension.registered_keys(name), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(_ops.SCHEMAS))
def test_opcheck_torch_and_triton_kernels(name, backend, gen):
    """opcheck with the torch kernel (the default) and, under Triton's interpreter, the Triton
    launcher registered as the op's CPU kernel (the C++ kernels: tests/test_kernels_cpu.py)."""
    if backend == "triton":
        live, why = _backends.status("triton", "cpu")
        assert live, why
        from kne_kernels.triton.kernels import KERNELS as impls
    else:
        impls = _ops.TORCH_KERNELS
    args = {
        "neuron_attribution_": lambda: (torch.zeros(2, 9), torch.randn(7, 9, generator=gen), torch.randn(7, 9, generator=gen),
                                        torch.randint(0, 2, (7,), generator=gen), torch.rand(7, generator=gen), 0.5),
        "weight_attribution_": lambda: (torch.zeros(5), torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen),
                                        1, True),
        "ensemble_aggregate": lambda: (torch.randn(3, 11, generator=gen), 1),
        "order_statistics": lambda: (torch.randn(40, generator=gen), 7),
        "threshold_mask": lambda: (torch.randn(4, 6, generator=gen), 0.2, True),
        "ensemble_adamw_step_": lambda: (torch.randn(9, 4, generator=gen), torch.tensor([1, 5]), torch.randn(2, 4, generator=gen),
                                         torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4),
                                         torch.randn(2, 4, generator=gen), 1, 1e-3, 0.5, 0, 0.9, 0.999, 1e-8, 0.0),
        "nullspace_project_": lambda: (torch.randn(9, 6, generator=gen), torch.tensor([2, 7]), torch.randn(2, 6, generator=gen),
                                       torch.linalg.qr(torch.randn(6, 2, generator=gen)).Q.contiguous(),
                                       torch.randn(2, 6, generator=gen), 0.5),
    }[name]()
    lib = torch.library.Library("kne", "IMPL")
    try:  # route CPU tensors to this kernel even where the C++ one is registered
        lib.impl(name, impls[name], "CPU")
        torch.library.opcheck(_ops.op(name), args)
    finally:
        lib._destroy()


def test_torch_compile_traces_the_ops(gen):
    scores = torch.randn(3, 50, generator=gen)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(s):
        agg = torch.ops.kne.ensemble_aggregate(s, 0)
        mask, counts = torch.ops.kne.threshold_mask(agg.view(5, 10), 0.5, True)
        return mask, counts

    mask, counts = f(scores)
    want = scores.amax(0).view(5, 10)
    assert torch.equal(mask, (want > 0.5) & (want > 0)) and torch.equal(counts, mask.sum(1))


# ---------------------------------------------------------------------------------------------- backends
def test_backend_resolution_and_errors(monkeypatch):
    assert _backends.resolve("torch", CPU) == "torch"
    assert _backends.resolve("auto", CPU) == ("cpu" if _backends.status("cpu", "cpu")[0] else "torch")
    with pytest.raises(ValueError, match="not a backend"):
        _backends.resolve("rocm", CPU)
    with pytest.raises(RuntimeError, match="cuda backend runs CUDA tensors only"):
        kne_kernels.neuron_attribution(torch.ones(2, 3), torch.ones(2, 3), backend="cuda")
    monkeypatch.setenv("KNE_BACKEND", "torch")
    assert _backends.resolve(None, CPU) == "torch"
    monkeypatch.setenv("KNE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="KNE_BACKEND='bogus'"):
        _backends.resolve(None, CPU)


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "kne_kernels.info"], capture_output=True, text=True, check=True).stdout
    for b in _backends.BACKENDS:
        assert f" {b} " in out
    assert "auto picks" in out
    js = subprocess.run([sys.executable, "-m", "kne_kernels.info", "--json"], capture_output=True, text=True,
                        check=True).stdout
    assert '"backends"' in js


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_first_use_cases_pass_for_correct_kernels(backend):
    if not _backends.status(backend, "cpu")[0]:
        pytest.fail(f"{backend} backend not live: {_backends.status(backend, 'cpu')[1]}")
    for op, case in _selfcheck.CASES.items():
        ok, why = case(_backends._implementation(op, backend), _ops.TORCH_KERNELS[op], CPU)
        assert ok, f"{op}: {why}"


def test_first_use_check_catches_a_wrong_kernel_and_warns(monkeypatch):
    real = _backends._implementation

    def broken(op, backend):
        fn = real(op, "torch")
        if backend != "triton":
            return fn
        if op == "neuron_attribution_":
            return lambda out, *a: (fn(out, *a), out.mul_(1.001))
        if op == "order_statistics":
            return lambda v, k: fn(v, max(0, k - 1))
        return fn

    monkeypatch.setattr(_backends, "_implementation", broken)
    with pytest.warns(RuntimeWarning, match="disagreed with the reference"):
        assert _backends._first_use_check("neuron_attribution_", "triton", CPU) is False
    with pytest.warns(RuntimeWarning, match="order_statistics"):
        assert _backends._first_use_check("order_statistics", "triton", CPU) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends._first_use_check("threshold_mask", "triton", CPU) is True


# ---------------------------------------------------------------------------------------------- validation
def test_bad_inputs_are_named():
    a = torch.randn(4, 6)
    with pytest.raises(ValueError, match="act is not contiguous"):
        kne_kernels.neuron_attribution(a.t(), a.t().clone())
    with pytest.raises(TypeError, match="grad .* same dtype"):
        kne_kernels.neuron_attribution(a, a.half())
    with pytest.raises(TypeError, match="act has dtype int64"):
        kne_kernels.neuron_attribution(a.long(), a.long())
    with pytest.raises(ValueError, match="same shape"):
        kne_kernels.neuron_attribution(a, a[:3])
    with pytest.raises(ValueError, match="segment ids must lie"):
        kne_kernels.neuron_attribution(a, a, segments=torch.tensor([0, 1, 2, 5]), num_segments=3)
    with pytest.raises(ValueError, match="one device"):
        kne_kernels.neuron_attribution(a, torch.empty(4, 6, device="meta"))
    with pytest.raises(ValueError, match="out must have shape"):
        kne_kernels.neuron_attribution(a, a, out=torch.zeros(5))
    with pytest.raises(ValueError, match="scale must have shape"):
        kne_kernels.neuron_attribution(a, a, scale=torch.ones(3))
    with pytest.raises(ValueError, match="dim must be"):
        kne_kernels.weight_attribution(a, a, dim=2)
    s = torch.randn(1, 2, 5)
    for p in (-1, 100.5, float("nan")):
        with pytest.raises(ValueError, match="percentile"):
            kne_kernels.ensemble_select(s, percentile=p)
    with pytest.raises(ValueError, match="NaN"):
        kne_kernels.ensemble_select(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(ValueError, match="aggregate"):
        kne_kernels.ensemble_select(s, aggregate="median")
    with pytest.raises(ValueError, match="3-D"):
        kne_kernels.ensemble_select(s[0])
    w = torch.randn(8, 4)
    idx = torch.tensor([1, 3])
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="compact shape"):
        kne_kernels.ensemble_adamw_step_(w, idx, torch.zeros(3, 4), z.clone(), z.clone(), z.clone(), w[idx].clone(),
                                         step=1, lr=1e-3, scale=1.0)
    with pytest.raises(ValueError, match="index values must lie"):
        kne_kernels.ensemble_adamw_step_(w, torch.tensor([1, 8]), z.clone(), z.clone(), z.clone(), z.clone(),
                                         w[:2].clone(), step=1, lr=1e-3, scale=1.0)
    with pytest.raises(ValueError, match="step counts from 1"):
        kne_kernels.ensemble_adamw_step_(w, idx, z.clone(), z.clone(), z.clone(), z.clone(), w[idx].clone(), step=0,
                                         lr=1e-3, scale=1.0)
    with pytest.raises(TypeError, match="base has dtype"):
        kne_kernels.ensemble_adamw_step_(w, idx, z.clone(), z.clone(), z.clone(), z.clone(), w[idx].half(), step=1,
                                         lr=1e-3, scale=1.0)


# ---------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_public_ops_match_reference(backend, gen):
    if backend not in live_cpu_backends():
        pytest.fail(_backends.status(backend, "cpu")[1])
    act, grad = torch.randn(3, 7, 33, generator=gen), torch.randn(3, 7, 33, generator=gen)
    seg = torch.randint(0, 4, (21,), generator=gen)
    sc = torch.rand(21, generator=gen)
    got = kne_kernels.neuron_attribution(act, grad, segments=seg, num_segments=4, scale=sc, backend=backend)
    want = ref.neuron_attribution(act, grad, segments=seg, num_segments=4, scale=sc)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = torch.randn(33, generator=gen)
    exp = out + (act * grad).reshape(-1, 33).sum(0) * 0.25
    assert kne_kernels.neuron_attribution(act, grad, scale=0.25, out=out, backend=backend) is out
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    w, g = torch.randn(17, 9, generator=gen), torch.randn(17, 9, generator=gen)
    for dim in (0, 1):
        for absolute in (False, True):
            torch.testing.assert_close(kne_kernels.weight_attribution(w, g, dim=dim, absolute=absolute, backend=backend),
                                       ref.weight_attribution(w, g, dim=dim, absolute=absolute), rtol=1e-5, atol=1e-5)
    for agg in ("max", "mean"):
        for positive_only in (True, False):
            scores = torch.randn(3, 5, 41, generator=gen).round(decimals=1)  # many ties
            a = kne_kernels.ensemble_select(scores, percentile=90.0, aggregate=agg, positive_only=positive_only,
                                            backend=backend)
            b = ref.ensemble_select(scores, percentile=90.0, aggregate=agg, positive_only=positive_only)
            assert a.threshold == b.threshold
            if NUMPY_PERCENTILE_EXACT:
                assert a.threshold == float(np.percentile(b.aggregated.numpy(), 90.0))
            assert torch.equal(a.mask, b.mask) and torch.equal(a.counts, b.counts)
            assert [x.tolist() for x in a.indices] == [x.tolist() for x in b.indices]
    empty = kne_kernels.ensemble_select(-torch.rand(1, 3, 8, generator=gen), backend=backend)
    assert empty.mask.sum() == 0 and [x.numel() for x in empty.indices] == [0, 0, 0]


@numpy_percentile_exact
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_ensemble_select_thresholds_are_numpy_exact(n, gen):
    for p in (0.0, 37.5, 90.0, 99.0, 99.9, 100.0):
        s = torch.randn(1, 1, n, generator=gen)
        sel = kne_kernels.ensemble_select(s, percentile=p, positive_only=False)
        assert sel.threshold == float(np.percentile(s.view(-1).numpy(), p))
        assert torch.equal(sel.mask[0], s[0, 0] > sel.threshold)


# ---------------------------------------------------------------------------------------------- edge rules
# One rule per edge case, the same through every backend and in the reference (issue 10, item 8).
EDGE_IMPLS = ["torch", "cpu", "triton", "reference"]


def _call(impl, op, *args, **kw):
    if impl == "reference":
        return getattr(ref, op)(*args, **kw)
    if impl not in live_cpu_backends():
        pytest.fail(_backends.status(impl, "cpu")[1])
    return getattr(kne_kernels, op)(*args, backend=impl, **kw)


@pytest.mark.parametrize("impl", EDGE_IMPLS)
def test_zero_width_attribution_is_an_empty_result(impl, gen):
    a = torch.randn(5, 0)
    r = _call(impl, "neuron_attribution", a, a.clone())
    assert r.shape == (0,) and r.dtype == torch.float32
    seg = torch.tensor([0, 2, 2, 1, 0])
    r = _call(impl, "neuron_attribution", torch.randn(5, 0), torch.randn(5, 0), segments=seg, num_segments=4)
    assert r.shape == (4, 0)
    r = _call(impl, "neuron_attribution", torch.randn(2, 3, 0), torch.randn(2, 3, 0), out=torch.zeros(0))
    assert r.shape == (0,)
    # no rows: zeros of the right shape
    r = _call(impl, "neuron_attribution", torch.randn(0, 6), torch.randn(0, 6), segments=torch.zeros(0, dtype=torch.long),
              num_segments=3)
    assert torch.equal(r, torch.zeros(3, 6))


@pytest.mark.parametrize("impl", EDGE_IMPLS)
def test_num_segments_must_be_a_non_negative_integer(impl):
    a, seg = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    for bad in (2.5, 2.0, "2", True, [3]):
        with pytest.raises(TypeError, match="num_segments must be an integer"):
            _call(impl, "neuron_attribution", a, a.clone(), segments=seg, num_segments=bad)
    with pytest.raises(ValueError, match="num_segments must be >= 0"):
        _call(impl, "neuron_attribution", torch.randn(0, 3), torch.randn(0, 3), segments=seg[:0], num_segments=-1)
    want = _call(impl, "neuron_attribution", a, a.clone(), segments=seg, num_segments=3)
    for ok in (np.int64(3), torch.tensor(3)):  # integers of other kinds are the numbers they are
        torch.testing.assert_close(_call(impl, "neuron_attribution", a, a.clone(), segments=seg, num_segments=ok), want)


@pytest.mark.parametrize("impl", EDGE_IMPLS)
def test_flags_must_be_bool(impl):
    w = torch.randn(5, 3)
    for bad in ("no", 0, 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="absolute must be True or False"):
            _call(impl, "weight_attribution", w, w.clone(), absolute=bad)
        with pytest.raises(TypeError, match="positive_only must be True or False"):
            _call(impl, "ensemble_select", torch.randn(1, 2, 5), positive_only=bad)
    a = _call(impl, "weight_attribution", w, -w, absolute=np.bool_(True))
    assert torch.equal(a, _call(impl, "weight_attribution", w, -w, absolute=True)) and (a > 0).all()


def _adamw_args(gen, index, K=None, rows=8, cols=4):
    K = index.numel() if K is None else K
    w = torch.randn(rows, cols, generator=gen)
    z = torch.zeros(K, cols)
    return dict(weight=w, index=index, grad=torch.randn(K, cols, generator=gen), delta=z.clone(), exp_avg=z.clone(),
                exp_avg_sq=z.clone(), base=torch.randn(K, cols, generator=gen))


@pytest.mark.parametrize("impl", EDGE_IMPLS)
def test_adamw_duplicate_indices_raise_and_write_nothing(impl, gen):
    for index in (torch.tensor([1, 1]), torch.tensor([3, 0, 5, 0, 2])):
        args = _adamw_args(gen, index)
        before = {k: v.clone() for k, v in args.items()}
        with pytest.raises(ValueError, match=r"index holds \d+ more than once"):
            _call(impl, "ensemble_adamw_step_", *args.values(), step=1, lr=1e-2, scale=1.0)
        for k, v in args.items():
            assert torch.equal(v, before[k]), f"{k} written before the refusal"


@pytest.mark.parametrize("impl", EDGE_IMPLS)
def test_adamw_index_out_of_range_is_a_value_error(impl, gen):
    for index in (torch.tensor([1, 8]), torch.tensor([-1, 2])):
        args = _adamw_args(gen, index)
        with pytest.raises(ValueError, match=r"index values must lie in \[0, 8\)"):
            _call(impl, "ensemble_adamw_step_", *args.values(), step=1, lr=1e-2, scale=1.0)


@pytest.mark.parametrize("impl", EDGE_IMPLS)
@pytest.mark.parametrize("alias", ["exp_avg=exp_avg_sq", "delta=exp_avg", "delta=grad", "exp_avg_sq=base",
                                   "weight=base", "exp_avg=delta[partial]"])
def test_adamw_aliased_state_is_refused(impl, alias, gen):
    args = _adamw_args(gen, torch.tensor([1, 4]))
    a, b = alias.split("=")
    if b.endswith("[partial]"):  # two views of one buffer that overlap in part
        buf = torch.zeros(3 * 4)
        args["exp_avg"], args["delta"] = buf[:8].view(2, 4), buf[4:].view(2, 4)
    elif (a, b) == ("weight", "base"):
        args["base"] = args["weight"][2:4]  # the base rows are rows of the weight being written
    else:
        args[a] = args[b]
    with pytest.raises(ValueError, match="share memory"):
        _call(impl, "ensemble_adamw_step_", *args.values(), step=1, lr=1e-2, scale=1.0)
    # disjoint views of one buffer are fine
    buf = torch.zeros(2 * 8)
    args = _adamw_args(gen, torch.tensor([1, 4]))
    args["exp_avg"], args["exp_avg_sq"] = buf[:8].view(2, 4), buf[8:].view(2, 4)
    _call(impl, "ensemble_adamw_step_", *args.values(), step=1, lr=1e-2, scale=1.0)


@pytest.mark.parametrize("impl", EDGE_IMPLS)
def test_attribution_out_aliasing_an_input_is_refused(impl, gen):
    a = torch.randn(3, 4, generator=gen)
    with pytest.raises(ValueError, match="out and act share memory"):
        _call(impl, "neuron_attribution", a, a.clone(), out=a[1])
    w, g = torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen)
    with pytest.raises(ValueError, match="out and grad share memory"):
        _call(impl, "weight_attribution", w, g, out=g[0])


@pytest.mark.parametrize("impl", EDGE_IMPLS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_non_finite_scores_are_refused_everywhere(impl, bad, aggregate, gen):
    scores = torch.randn(2, 3, 5, generator=gen)
    scores[1, 2, 3] = bad  # in the second request: "max" would hide a -inf, "mean" a pair of them
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at \[1, 2, 3\]"):
        _call(impl, "ensemble_select", scores, percentile=50.0, aggregate=aggregate)


@pytest.mark.parametrize("impl", EDGE_IMPLS)
def test_mean_that_overflows_is_refused(impl):
    scores = torch.full((2, 1, 3), 3e38)
    with pytest.raises(ValueError, match="mean scores over requests contain NaN or infinity"):
        _call(impl, "ensemble_select", scores, aggregate="mean")
    assert _call(impl, "ensemble_select", scores, aggregate="max").threshold == pytest.approx(3e38)


def test_cpu_extension_refuses_aliases_itself(gen):
    """The C++ kernels check aliasing too (a caller of torch.ops.kne.* without the api)."""
    w = torch.randn(8, 4, generator=gen)
    z = torch.zeros(2, 4)
    m = z.clone()
    with pytest.raises(RuntimeError, match="exp_avg and exp_avg_sq share memory"):
        _ops.op("ensemble_adamw_step_")(w, torch.tensor([1, 2]), torch.randn(2, 4), z.clone(), m, m, w[1:3].clone(),
                                       1, 1e-3, 1.0, 0, 0.9, 0.999, 1e-8, 0.0)
    out = torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="out and act share memory"):
        _ops.op("neuron_attribution_")(out, out, out.clone(), None, None, 1.0)
    with pytest.raises(RuntimeError, match="twice"):
        _ops.op("ensemble_adamw_step_")(w, torch.tensor([1, 1]), torch.randn(2, 4), z.clone(), z.clone(), z.clone(),
                                       w[1:3].clone(), 1, 1e-3, 1.0, 0, 0.9, 0.999, 1e-8, 0.0)
