"""``neuron_attribution`` (``kne::neuron_attribution_``) on every backend: the kernels against the
torch kernel and float64, the public function's rules, the backend-specific properties (threads,
the C++ kernels' own argument checks), opcheck, the first-use case and hypothesis fuzzing."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import kne_kernels
from kne_kernels.ops.neuron_attribution import OPS, neuron_attribution_torch
from .kernel_testing import (FLOATS, SIZES, U, WIDE, assert_kernel_refuses, assert_sum, assert_within, backend_params,
                             device_of, fuzz_dtypes, fuzz_tests, kernel, maybe_strided, misaligned, opcheck,
                             over_backends, rand, refused_if_strided, require, threads, values)

OP = "neuron_attribution_"


# ---------------------------------------------------------------------------------------------- the kernels
# (N, D): odd sizes, 1, primes, past the vector and block widths. The large ones run on the native
# backends (the Triton interpreter would take minutes; on a GPU, bench_kernels covers them).
SHAPES = [(1, 1), (7, 129), (300, 7), (37, 4097), (200, 600)]
CPU_SHAPES = [(7, 1), (1, 7), (7, 4097), (4097, 7), (33, 1031), (1000, 257), (2053, 129)]
CUDA_SHAPES = [(7, 7), (4097, 7), (7, 4097), (4097, 256), (300, 4096)]
# segments: none; sorted ids (the usual case: one flush per boundary; the last id stays empty);
# random ids (tiles with several ids); many segments; IG step weights and a scalar; combinations
VARIANTS = ["none", "sorted", "random", "many", "scaled", "sorted+scaled", "random+scaled"]


def _case(N, D, dtype, variant, gen, dev):
    act, grad = rand((N, D), dtype, gen, dev), rand((N, D), dtype, gen, dev)
    seg, scale, sv, S = None, None, 1.0, 1
    if variant.startswith("sorted"):
        S = 6
        seg = torch.sort(torch.randint(0, S - 1, (N,), generator=gen)).values.to(dev)
    elif variant.startswith("random"):
        S = 5
        seg = torch.randint(0, S, (N,), generator=gen).to(dev)
    elif variant == "many":
        S = 300
        seg = torch.randint(0, S, (N,), generator=gen).to(dev)
    if variant.endswith("scaled"):
        scale, sv = torch.rand(N, generator=gen).to(dev), 0.37
    return act, grad, seg, scale, sv, S


def _exact(out0, act, grad, seg, scale, sv):
    """float64 ``out0 + sum`` and ``|out0| + sum |terms|`` (the magnitude the error bound scales with)."""
    p = act.double() * grad.double()
    if scale is not None:
        p = p * scale.double()[:, None]
    p = p * sv
    ids = seg if seg is not None else torch.zeros(act.shape[0], dtype=torch.int64, device=act.device)
    return out0.double().index_add(0, ids, p), out0.double().abs().index_add(0, ids, p.abs())


def _check_kernel(backend, act, grad, seg, scale, sv, out0, dtype, what):
    got, ref = out0.clone(), out0.clone()
    kernel(OP, backend)(got, act, grad, seg, scale, sv)
    neuron_attribution_torch(ref, act, grad, seg, scale, sv)
    exact, abs_sum = _exact(out0, act, grad, seg, scale, sv)
    assert_sum(got, exact, ref, abs_sum, dtype, backend, what)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("backend,shape", over_backends(SHAPES, torch=CPU_SHAPES, cpu=CPU_SHAPES, cuda=CUDA_SHAPES))
def test_kernel(backend, shape, dtype, variant, gen):
    """Accumulated into a random ``out``, against float64 (and the torch kernel's own error)."""
    dev = require(backend)
    act, grad, seg, scale, sv, S = _case(*shape, dtype, variant, gen, dev)
    _check_kernel(backend, act, grad, seg, scale, sv, rand((S, shape[1]), torch.float32, gen, dev), dtype,
                  f"{backend} {shape} {dtype} {variant}")


@pytest.mark.parametrize("variant", ["none", "random", "sorted+scaled"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("backend,shape", over_backends([(300, 256), (70, 515)]))
def test_misaligned_inputs(backend, shape, dtype, variant, gen):
    """Every tensor starting one element past a 16-byte boundary (the kernels' scalar paths)."""
    dev = require(backend)
    act, grad, seg, scale, sv, S = _case(*shape, dtype, variant, gen, dev)
    act, grad = misaligned(act), misaligned(grad)
    seg = misaligned(seg) if seg is not None else None
    scale = misaligned(scale) if scale is not None else None
    out0 = misaligned(rand((S, shape[1]), torch.float32, gen, dev))
    _check_kernel(backend, act, grad, seg, scale, sv, out0, dtype, f"misaligned {backend} {dtype} {variant}")


def test_segment_runs(backend, dev, gen):
    """Sorted ids with runs shorter and longer than a tile, over several row chunks and column blocks."""
    lengths = [1, 2, 40, 3, 100, 17, 16, 154]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)
    N, D = seg.numel(), 600
    act, grad = rand((N, D), torch.float16, gen, dev), rand((N, D), torch.float16, gen, dev)
    out0 = rand((len(lengths), D), torch.float32, gen, dev)
    _check_kernel(backend, act, grad, seg, None, 1.0, out0, torch.float16, f"segment runs {backend}")


@pytest.mark.parametrize("backend", backend_params("torch", "cpu", "cuda", *(
    ["triton"] if device_of("triton").type == "cuda" else [])))  # 2^17 rows: about 20 s in the interpreter
def test_large_n_and_one_segment_per_block(backend, gen):
    """2^17 rows: many row tiles (atomics across tiles); the id changes once per 1000 rows."""
    dev = require(backend)
    N, D = 1 << 17, 96
    act, grad = rand((N, D), torch.bfloat16, gen, dev), rand((N, D), torch.bfloat16, gen, dev)
    seg = torch.arange(N, device=dev) // 1000
    out0 = rand((int(seg[-1]) + 1, D), torch.float32, gen, dev)
    _check_kernel(backend, act, grad, seg, None, 1.0, out0, torch.bfloat16, f"N=2^17 {backend}")


# ---------------------------------------------------------------------------------------------- the public function
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (7, 7), (4097, 7), (13, 4097), (0, 5)], ids=str)
def test_matches_float64(backend, dev, shape, dtype, gen, poisoned):
    """The result (allocated by the function, NaN-poisoned) against float64; for fp16/bf16 also
    flash-attention's rule: at most twice the error of the plain torch expression in that dtype."""
    N, D = shape
    act = rand((N, D), dtype, gen, dev)
    grad = rand((N, D), dtype, gen, dev, scale=1e-3)
    act_c, grad_c = act.clone(), grad.clone()
    terms = act.double() * grad.double()
    out = kne_kernels.neuron_attribution(act, grad, backend=backend)
    assert out.dtype == torch.float32 and tuple(out.shape) == (D,) and torch.isfinite(out).all()
    ref = torch.zeros(1, D, device=dev)
    neuron_attribution_torch(ref, act, grad, None, None, 1.0)
    assert_sum(out, terms.sum(0), ref[0], terms.abs().sum(0), dtype, backend, f"{backend} {shape} {dtype}")
    if dtype != torch.float32 and N > 100:  # much better than the same sum in low precision
        err = (out.double() - terms.sum(0)).abs().max().item()
        plain = ((act * grad).sum(0).double() - terms.sum(0)).abs().max().item()
        assert err <= 2 * plain + 64 * U * terms.abs().sum(0).max().item(), (err, plain)
    assert torch.equal(act, act_c) and torch.equal(grad, grad_c), "inputs modified"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_leading_dims_segments_and_scale(backend, dev, dtype, gen, poisoned):
    B, T, D, S = 3, 7, 33, 5
    act, grad = rand((B, T, D), dtype, gen, dev), rand((B, T, D), dtype, gen, dev)
    a64, g64 = act.double().reshape(-1, D), grad.double().reshape(-1, D)
    N = B * T
    full = kne_kernels.neuron_attribution(act, grad, backend=backend)  # leading dims flattened
    assert_within(full, (a64 * g64).sum(0).cpu(), 64 * U * (a64 * g64).abs().sum(0).cpu(), "leading dims")
    seg = torch.randint(0, 3, (N,), generator=gen)
    seg[seg == 2] = 4  # segment 3 unused, num_segments larger than the largest id
    seg = seg.to(dev)
    scale_t = (torch.rand(N, generator=gen) + 0.5).to(dev)
    for scale in (None, 0.25, scale_t):
        s64 = torch.ones(N, dtype=torch.float64, device=dev) if scale is None else (
            scale.double() if isinstance(scale, torch.Tensor) else torch.full((N,), scale, dtype=torch.float64,
                                                                              device=dev))
        out = kne_kernels.neuron_attribution(act, grad, segments=seg, num_segments=S, scale=scale, backend=backend)
        assert out.dtype == torch.float32 and tuple(out.shape) == (S, D)
        terms = s64[:, None] * a64 * g64
        expect = torch.zeros(S, D, dtype=torch.float64, device=dev).index_add_(0, seg, terms)
        bound = torch.zeros(S, D, dtype=torch.float64, device=dev).index_add_(0, seg, terms.abs()) * 64 * U
        assert_within(out, expect.cpu(), bound.cpu(), f"segments, scale={type(scale).__name__}")
        assert torch.equal(out[3], torch.zeros(D, device=dev)) and torch.equal(out[2], torch.zeros(D, device=dev))
        un = kne_kernels.neuron_attribution(act, grad, scale=scale, backend=backend)  # the segments sum to it
        assert torch.allclose(out.sum(0), un, rtol=1e-5, atol=1e-5 * (a64 * g64).abs().sum(0).max().item())
    with pytest.raises(TypeError, match="scale has dtype float64"):  # nothing is cast silently
        kne_kernels.neuron_attribution(act, grad, segments=seg, scale=scale_t.double(), backend=backend)
    assert tuple(kne_kernels.neuron_attribution(act, grad, segments=seg, backend=backend).shape) == (5, D)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_out_accumulates_in_place(backend, dev, dtype, gen):
    N, D, S = 7, 4097, 2
    act, grad = rand((N, D), dtype, gen, dev), rand((N, D), dtype, gen, dev)
    seg = torch.tensor([0, 1, 1, 0, 1, 0, 0], device=dev)
    base = rand((S, D), torch.float32, gen, dev)
    out = base.clone()
    kw = dict(segments=seg, num_segments=S, scale=0.5, backend=backend)
    assert kne_kernels.neuron_attribution(act, grad, out=out, **kw) is out
    fresh = kne_kernels.neuron_attribution(act, grad, **kw)
    assert torch.allclose(out, base + fresh, rtol=0, atol=1e-5)
    kne_kernels.neuron_attribution(act, grad, out=out, **kw)  # twice: accumulates again
    assert torch.allclose(out, base + 2 * fresh, rtol=0, atol=2e-5)
    poisoned = torch.full((S, D), float("nan"), device=dev)  # added to, not overwritten: NaN stays
    kne_kernels.neuron_attribution(act, grad, segments=seg, num_segments=S, out=poisoned, backend=backend)
    assert torch.isnan(poisoned).all()


def test_every_option_against_the_torch_kernel(backend, dev, gen):
    """Leading dims, segments, num_segments, a scale tensor, a float scale with ``out=``; no
    fallback warning (a failed first-use check must not pass silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        act, grad = rand((3, 7, 33), torch.bfloat16, gen, dev), rand((3, 7, 33), torch.bfloat16, gen, dev)
        seg = torch.randint(0, 4, (21,), generator=gen).to(dev)
        sc = torch.rand(21, generator=gen).to(dev)
        got = kne_kernels.neuron_attribution(act, grad, segments=seg, num_segments=4, scale=sc, backend=backend)
        want = torch.zeros(4, 33, device=dev)
        neuron_attribution_torch(want, act.reshape(21, 33), grad.reshape(21, 33), seg, sc, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        out = rand((33,), torch.float32, gen, dev)
        exp = out + (act.float() * grad.float()).reshape(-1, 33).sum(0) * 0.25
        assert kne_kernels.neuron_attribution(act, grad, scale=0.25, out=out, backend=backend) is out
        torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)


def test_zero_width_is_an_empty_result(backend, dev):
    a = torch.randn(5, 0, device=dev)
    r = kne_kernels.neuron_attribution(a, a.clone(), backend=backend)
    assert r.shape == (0,) and r.dtype == torch.float32
    seg = torch.tensor([0, 2, 2, 1, 0], device=dev)
    r = kne_kernels.neuron_attribution(torch.randn(5, 0, device=dev), torch.randn(5, 0, device=dev), segments=seg,
                                       num_segments=4, backend=backend)
    assert r.shape == (4, 0)
    r = kne_kernels.neuron_attribution(torch.randn(2, 3, 0, device=dev), torch.randn(2, 3, 0, device=dev),
                                       out=torch.zeros(0, device=dev), backend=backend)
    assert r.shape == (0,)
    r = kne_kernels.neuron_attribution(torch.randn(0, 6, device=dev), torch.randn(0, 6, device=dev),
                                       segments=torch.zeros(0, dtype=torch.long, device=dev), num_segments=3,
                                       backend=backend)
    assert torch.equal(r, torch.zeros(3, 6, device=dev))  # no rows: zeros of the right shape


def test_num_segments_must_be_a_non_negative_integer(backend, dev):
    a, seg = torch.randn(5, 3, device=dev), torch.tensor([0, 1, 1, 0, 1], device=dev)
    for bad in (2.5, 2.0, "2", True, [3]):
        with pytest.raises(TypeError, match="num_segments must be an integer"):
            kne_kernels.neuron_attribution(a, a.clone(), segments=seg, num_segments=bad, backend=backend)
    with pytest.raises(ValueError, match="num_segments must be >= 0"):
        kne_kernels.neuron_attribution(torch.randn(0, 3, device=dev), torch.randn(0, 3, device=dev), segments=seg[:0],
                                       num_segments=-1, backend=backend)
    want = kne_kernels.neuron_attribution(a, a.clone(), segments=seg, num_segments=3, backend=backend)
    for ok in (np.int64(3), torch.tensor(3)):  # integers of other kinds are the numbers they are
        torch.testing.assert_close(kne_kernels.neuron_attribution(a, a.clone(), segments=seg, num_segments=ok,
                                                                  backend=backend), want)


def test_out_aliasing_an_input_is_refused(backend, dev, gen):
    a = rand((3, 4), torch.float32, gen, dev)
    with pytest.raises(ValueError, match="out and act share memory"):
        kne_kernels.neuron_attribution(a, a.clone(), out=a[1], backend=backend)


def test_bad_inputs_are_named():
    a = torch.randn(4, 6)
    with pytest.raises(ValueError, match="act is not contiguous"):
        kne_kernels.neuron_attribution(a.t(), a.t().clone())
    with pytest.raises(TypeError, match="grad .* same dtype"):
        kne_kernels.neuron_attribution(a, a.half())
    with pytest.raises(TypeError, match="act has dtype int64"):
        kne_kernels.neuron_attribution(a.long(), a.long())
    with pytest.raises(TypeError, match="act has dtype float64"):
        kne_kernels.neuron_attribution(a.double(), a.double())
    with pytest.raises(TypeError, match="act must be a torch.Tensor"):
        kne_kernels.neuron_attribution(a.numpy(), a)
    with pytest.raises(ValueError, match="same shape"):
        kne_kernels.neuron_attribution(a, a[:3])
    with pytest.raises(ValueError, match="at least one dimension"):
        kne_kernels.neuron_attribution(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="segment ids must lie"):
        kne_kernels.neuron_attribution(a, a, segments=torch.tensor([0, 1, 2, 5]), num_segments=3)
    with pytest.raises(ValueError, match="segment ids must lie"):
        kne_kernels.neuron_attribution(a, a, segments=torch.tensor([0, -1, 0, 0]), num_segments=3)
    with pytest.raises(TypeError, match="segments has dtype int32"):
        kne_kernels.neuron_attribution(a, a, segments=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="segments must have shape"):
        kne_kernels.neuron_attribution(a, a, segments=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_segments is only meaningful"):
        kne_kernels.neuron_attribution(a, a, num_segments=2)
    with pytest.raises(ValueError, match="one device"):
        kne_kernels.neuron_attribution(a, torch.empty(4, 6, device="meta"))
    with pytest.raises(ValueError, match="out must have shape"):
        kne_kernels.neuron_attribution(a, a, out=torch.zeros(5))
    with pytest.raises(TypeError, match="out has dtype float64"):
        kne_kernels.neuron_attribution(a, a, out=torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale must have shape"):
        kne_kernels.neuron_attribution(a, a, scale=torch.ones(3))
    with pytest.raises(TypeError, match="scale must be None, a finite float"):
        kne_kernels.neuron_attribution(a, a, scale=float("nan"))


# ---------------------------------------------------------------------------------------------- backend-specific
@pytest.mark.cpu_backend
def test_cpu_same_bits_with_one_and_two_threads(gen):
    require("cpu")
    act, grad = rand((3000, 1500), torch.bfloat16, gen, "cpu"), rand((3000, 1500), torch.bfloat16, gen, "cpu")
    seg = torch.randint(0, 3, (3000,), generator=gen)
    outs = []
    for n in (1, 2):
        with threads(n):
            out = torch.zeros(3, 1500)
            kernel(OP, "cpu")(out, act, grad, seg, None, 1.0)
            outs.append(out)
    assert torch.equal(outs[0], outs[1]), "the result depends on the thread count"


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_cpu_two_threads(dtype, gen):
    require("cpu")
    act, grad = rand((4099, 1031), dtype, gen, "cpu"), rand((4099, 1031), dtype, gen, "cpu")
    scale = torch.rand(4099, generator=gen)
    with threads(2):
        _check_kernel("cpu", act, grad, None, scale, 1.0, torch.randn(1, 1031, generator=gen), dtype,
                      f"2 threads {dtype}")


def _cpu_bad_cases():
    f = torch.randn
    a, g = f(6, 4), f(6, 4)
    K = kernel(OP, "cpu")
    return [
        ("act float64", lambda: K(torch.zeros(1, 4), a.double(), g.double(), None, None, 1.0), "act has dtype"),
        ("act/grad dtypes", lambda: K(torch.zeros(1, 4), a, g.half(), None, None, 1.0), "same dtype"),
        ("act strides", lambda: K(torch.zeros(1, 6), a.t(), g.t(), None, None, 1.0), "act is not contiguous"),
        ("out shape", lambda: K(torch.zeros(1, 5), a, g, None, None, 1.0), "out must have shape"),
        ("out dtype", lambda: K(torch.zeros(1, 4).half(), a, g, None, None, 1.0), "out has dtype"),
        ("segments range", lambda: K(torch.zeros(2, 4), a, g, torch.tensor([0, 1, 2, 0, 1, 0]), None, 1.0),
         "segments[2] = 2 is out of range"),
        ("segments negative", lambda: K(torch.zeros(2, 4), a, g, torch.tensor([0, 1, 0, -1, 1, 0]), None, 1.0),
         "segments[3] = -1 is out of range"),
        ("segments dtype", lambda: K(torch.zeros(2, 4), a, g, torch.zeros(6, dtype=torch.int32), None, 1.0),
         "segments has dtype"),
        ("segments length", lambda: K(torch.zeros(2, 4), a, g, torch.zeros(5, dtype=torch.long), None, 1.0),
         "segments must have shape"),
        ("scale length", lambda: K(torch.zeros(1, 4), a, g, None, torch.ones(5), 1.0), "scale must have shape"),
        ("scale dtype", lambda: K(torch.zeros(1, 4), a, g, None, torch.ones(6).half(), 1.0), "scale has dtype"),
        ("out aliases act", lambda: K(a[:1], a, g, None, None, 1.0), "out and act share memory"),
    ]


@pytest.mark.cpu_backend
@pytest.mark.parametrize("what", [c[0] for c in _cpu_bad_cases()])
def test_cpu_kernel_refuses_bad_inputs(what):
    """The C++ kernel checks its arguments itself (a caller of torch.ops.kne.* without the public
    function), naming the argument."""
    require("cpu")
    _, call, needle = next(c for c in _cpu_bad_cases() if c[0] == what)
    assert_kernel_refuses(call, needle, what)


@pytest.mark.cuda_backend
def test_cuda_kernel_refuses_tensors_on_two_devices():
    require("cuda")
    x = torch.zeros(4, 6, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        kernel(OP, "cuda")(torch.zeros(1, 6, device="cuda"), x, x.cpu(), None, None, 1.0)


# ---------------------------------------------------------------------------------------------- registry
def test_opcheck(backend, dev, gen):
    args = (torch.zeros(3, 33, device=dev), rand((17, 33), torch.bfloat16, gen, dev),
            rand((17, 33), torch.bfloat16, gen, dev), torch.randint(0, 3, (17,), generator=gen).to(dev),
            torch.rand(17, generator=gen).to(dev), 0.5)
    opcheck(OP, backend, args)


def test_selfcheck_case_passes(backend, dev):
    """The first-use case of the op (what a GPU kernel must pass before it runs) passes here."""
    (d,) = OPS
    ok, why = d.selfcheck(kernel(OP, backend), d.torch, dev)
    assert ok, why


# ---------------------------------------------------------------------------------------------- fuzzing
def _fuzz(backend, dev, data, seed):
    """Shapes with 0, 1 and primes, every dtype, the options, a strided input (refused by name);
    against float64 with the rigorous bound of an fp32 sum of n terms in any order,
    ``(n - 1) * 2^-24 * sum |terms|``: a missed, doubled or misplaced term fails."""
    from hypothesis import strategies as st

    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(st.sampled_from(fuzz_dtypes(backend)), label="dtype")
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
        # the terms may be added into out one by one (the torch kernel's index_add_): the partial
        # sums then include out's value
        bound = bound.reshape(out0.shape) + (N + 4) * U * out0.double().abs() + 2 * U * want.abs()
    want, bound = want.reshape(-1), bound.reshape(-1)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    a = maybe_strided(data, act.to(dev), "act")
    g = grad.to(dev)
    got = refused_if_strided(lambda: kne_kernels.neuron_attribution(a, g, backend=backend, **kw), {"act": a})
    if got is None:
        return
    if out0 is not None:
        assert got is kw["out"]
    assert got.dtype == torch.float32 and got.shape == ((D,) if S is None else (S, D)), got.shape
    assert_within(got.reshape(-1), want, bound, f"neuron_attribution {backend} {dtype} {shape} {sorted(kw)}")


fuzz_tests(_fuzz, globals(), "neuron_attribution")
