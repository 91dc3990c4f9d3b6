"""``weight_attribution`` (``kne::weight_attribution_``) on every backend: the kernels against the
torch kernel and float64, the public function's rules, the backend-specific properties, opcheck,
the first-use case and hypothesis fuzzing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import kne_kernels
from kne_kernels.ops.weight_attribution import OPS, weight_attribution_torch
from .kernel_testing import (FLOATS, SIZES, U, WIDE, assert_kernel_refuses, assert_sum, assert_within, fuzz_dtypes,
                             fuzz_tests, kernel, maybe_strided, misaligned, opcheck, over_backends, rand,
                             refused_if_strided, require, threads, values)

OP = "weight_attribution_"

# (R, C): 1, primes, long rows and columns; the large ones on the native backends only.
SHAPES = [(1, 1), (7, 129), (300, 33), (3, 3000), (65, 4097)]
CPU_SHAPES = [(7, 1), (1, 7), (7, 4097), (4097, 7), (257, 1031), (2, 70001)]
CUDA_SHAPES = [(7, 4097), (4097, 7), (64, 4096), (33, 8192), (5, 4104)]


def _check_kernel(backend, w, g, dim, absolute, out0, dtype, what):
    got, ref = out0.clone(), out0.clone()
    kernel(OP, backend)(got, w, g, dim, absolute)
    weight_attribution_torch(ref, w, g, dim, absolute)
    p = w.double() * g.double()
    if absolute:
        p = p.abs()
    assert_sum(got, out0.double() + p.sum(dim), ref, out0.double().abs() + p.abs().sum(dim), dtype, backend, what)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("backend,shape", over_backends(SHAPES, torch=CPU_SHAPES, cpu=CPU_SHAPES, cuda=CUDA_SHAPES))
def test_kernel(backend, shape, dtype, dim, absolute, gen):
    """Accumulated into a random ``out``, against float64 (and the torch kernel's own error)."""
    dev = require(backend)
    w, g = rand(shape, dtype, gen, dev), rand(shape, dtype, gen, dev)
    _check_kernel(backend, w, g, dim, absolute, rand((shape[1 - dim],), torch.float32, gen, dev), dtype,
                  f"{backend} {shape} {dtype} dim={dim} absolute={absolute}")


@pytest.mark.parametrize("dim", [0, 1])
def test_misaligned_inputs(backend, dev, dim, gen):
    w, g = misaligned(rand((33, 4096), torch.float16, gen, dev)), misaligned(rand((33, 4096), torch.float16, gen, dev))
    _check_kernel(backend, w, g, dim, False, torch.zeros(w.shape[1 - dim], device=dev), torch.float16,
                  f"misaligned {backend} dim={dim}")


# ---------------------------------------------------------------------------------------------- the public function
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 7), (33, 4097)], ids=str)
def test_dims_and_absolute(backend, dev, shape, dtype, gen, poisoned):
    """Every ``dim`` spelling and ``absolute`` against float64 (results NaN-poisoned first); ``out=``
    accumulates."""
    w, g = rand(shape, dtype, gen, dev), rand(shape, dtype, gen, dev)
    w64, g64 = w.double(), g.double()
    for dim in (0, 1, -1):
        for absolute in (False, True):
            prod = w64 * g64
            if absolute:
                prod = prod.abs()
            got = kne_kernels.weight_attribution(w, g, dim=dim, absolute=absolute, backend=backend)
            assert got.dtype == torch.float32 and got.shape == prod.sum(dim).shape
            assert_within(got, prod.sum(dim).cpu(), 64 * U * prod.abs().sum(dim).cpu() + 1e-30,
                          f"{backend} dim={dim} absolute={absolute}")
            if absolute:
                assert (got >= 0).all()
    signed = kne_kernels.weight_attribution(w, g, backend=backend)
    if shape[1] > 1:
        assert not torch.equal(signed, kne_kernels.weight_attribution(w, g, absolute=True, backend=backend))
    base = rand((shape[0],), torch.float32, gen, dev)
    out = base.clone()
    assert kne_kernels.weight_attribution(w, g, dim=1, out=out, backend=backend) is out
    assert torch.allclose(out, base + signed, rtol=0, atol=1e-4)


def test_every_option_against_the_torch_kernel(backend, dev, gen):
    """Both dims, both signs; no fallback warning (a failed first-use check must not pass silently)."""
    w, g = rand((17, 9), torch.float16, gen, dev), rand((17, 9), torch.float16, gen, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for dim in (0, 1):
            for absolute in (False, True):
                want = torch.zeros(w.shape[1 - dim], device=dev)
                weight_attribution_torch(want, w, g, dim, absolute)
                got = kne_kernels.weight_attribution(w, g, dim=dim, absolute=absolute, backend=backend)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_absolute_must_be_bool(backend, dev):
    w = torch.randn(5, 3, device=dev)
    for bad in ("no", 0, 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="absolute must be True or False"):
            kne_kernels.weight_attribution(w, w.clone(), absolute=bad, backend=backend)
    a = kne_kernels.weight_attribution(w, -w, absolute=np.bool_(True), backend=backend)
    assert torch.equal(a, kne_kernels.weight_attribution(w, -w, absolute=True, backend=backend)) and (a > 0).all()


def test_out_aliasing_an_input_is_refused(backend, dev, gen):
    w, g = rand((4, 4), torch.float32, gen, dev), rand((4, 4), torch.float32, gen, dev)
    with pytest.raises(ValueError, match="out and grad share memory"):
        kne_kernels.weight_attribution(w, g, out=g[0], backend=backend)


def test_bad_inputs_are_named():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        kne_kernels.weight_attribution(w, w.t().contiguous())
    with pytest.raises(TypeError, match="weight has dtype float64"):
        kne_kernels.weight_attribution(w.double(), w.double())
    with pytest.raises(TypeError, match="same dtype"):
        kne_kernels.weight_attribution(w, w.half())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        kne_kernels.weight_attribution(w[0], w[0])
    with pytest.raises(ValueError, match="out must have shape"):
        kne_kernels.weight_attribution(w, w, dim=0, out=torch.zeros(3))
    with pytest.raises(ValueError, match="dim must be"):
        kne_kernels.weight_attribution(w, w, dim=2)
    with pytest.raises(ValueError, match="grad is not contiguous"):
        kne_kernels.weight_attribution(w, torch.randn(4, 3).t())


# ---------------------------------------------------------------------------------------------- backend-specific
@pytest.mark.cpu_backend
@pytest.mark.parametrize("dim", [0, 1])
def test_cpu_two_threads(dim, gen):
    require("cpu")
    w, g = rand((3001, 517), torch.float16, gen, "cpu"), rand((3001, 517), torch.float16, gen, "cpu")
    with threads(2):
        _check_kernel("cpu", w, g, dim, True, torch.randn(w.shape[1 - dim], generator=gen), torch.float16,
                      f"2 threads dim={dim}")


def _cpu_bad_cases():
    f = torch.randn
    K = kernel(OP, "cpu")
    return [
        ("out shape", lambda: K(torch.zeros(3), f(5, 3), f(5, 3), 1, False), "out must have shape [5]"),
        ("dim", lambda: K(torch.zeros(3), f(5, 3), f(5, 3), 2, False), "dim must be"),
        ("1-D weight", lambda: K(torch.zeros(5), f(5), f(5), 1, False), "weight must be 2-D"),
        ("grad dtype", lambda: K(torch.zeros(5), f(5, 3), f(5, 3).bfloat16(), 1, False), "same dtype"),
    ]


@pytest.mark.cpu_backend
@pytest.mark.parametrize("what", [c[0] for c in _cpu_bad_cases()])
def test_cpu_kernel_refuses_bad_inputs(what):
    require("cpu")
    _, call, needle = next(c for c in _cpu_bad_cases() if c[0] == what)
    assert_kernel_refuses(call, needle, what)


# ---------------------------------------------------------------------------------------------- registry
def test_opcheck(backend, dev, gen):
    opcheck(OP, backend, (torch.zeros(9, device=dev), rand((9, 5), torch.float16, gen, dev),
                          rand((9, 5), torch.float16, gen, dev), 1, True))


def test_selfcheck_case_passes(backend, dev):
    (d,) = OPS
    ok, why = d.selfcheck(kernel(OP, backend), d.torch, dev)
    assert ok, why


# ---------------------------------------------------------------------------------------------- fuzzing
def _fuzz(backend, dev, data, seed):
    """Shapes with 0, 1 and primes, every dim spelling, ``absolute``, ``out=``, a strided weight
    (refused by name); against float64 within ``(n + 4) * 2^-24 * sum |terms|``."""
    from hypothesis import strategies as st

    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(st.sampled_from(fuzz_dtypes(backend)), label="dtype")
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
        kw["out"] = out0.clone().to(dev)
        want = want + out0.double()
        bound = bound + 2 * U * want.abs()
    ws, gd = maybe_strided(data, w.to(dev), "weight"), g.to(dev)
    got = refused_if_strided(lambda: kne_kernels.weight_attribution(ws, gd, dim=dim, absolute=absolute,
                                                                    backend=backend, **kw), {"weight": ws})
    if got is None:
        return
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_within(got, want, bound, f"weight_attribution {backend} {dtype} [{R}, {C}] dim={dim} abs={absolute}")


fuzz_tests(_fuzz, globals(), "weight_attribution")
