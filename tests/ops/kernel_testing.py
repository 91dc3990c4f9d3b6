"""What the per-op kernel tests share (``from .kernel_testing import ...``): the backends and the device
each runs on, the parameter lists over them, the one tolerance table, comparisons that name the
worst element, poisoned outputs, odd-layout helpers and the hypothesis strategies of the fuzz tests.

Backends: ``torch`` (CPU tensors), ``cpu`` (the C++ library), ``triton`` (CUDA tensors on a GPU,
else CPU tensors through Triton's interpreter, which tests/conftest.py switches on) and ``cuda``
(the CUDA C++ kernels). Every backend test carries the marker ``<backend>_backend``
(``pytest -m triton_backend``). A backend that is not live fails its tests -- CI must have torch,
cpu and the Triton interpreter -- except where it is truly absent here: ``cuda`` without a GPU or
without CUDA kernels in the library, ``triton`` when triton is not installed. Those skip, saying why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Dict, Iterable, Sequence

import pytest
import torch

from kne_kernels import _backends
from helpers import assert_equal, where  # noqa: F401  (assert_equal: re-exported for the op tests)

BACKENDS = ("torch", "cpu", "triton", "cuda")
MARKS = {b: getattr(pytest.mark, f"{b}_backend") for b in BACKENDS}
CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "") == "1"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
U = 2.0 ** -24  # float32 unit roundoff
EPS32 = 2.0 ** -23

# ---------------------------------------------------------------------------------------------- tolerances
# One row per dtype (the dtype of the op's float inputs or of the weight it writes; results and
# optimizer state are float32 whatever the dtype):
#   eps, tiny   spacing at 1 and the smallest subnormal of the dtype
#   sum_floor   fp32 sums against float64: |got - exact| <= 2 * |torch kernel - exact| (for the
#               other backends) + sum_floor[backend] * 2^-24 * sum |terms|; 8 for kernels that sum
#               in a fixed order, 64 where fp32 atomics reorder (and for the torch kernel, which is
#               held to the floor alone). The products are exact in fp32 for fp16/bf16 inputs, so
#               the floor is the same for every dtype.
#   state       AdamW fp32 state against the torch kernel (rtol, atol): fma against separate roundings
#   weight      a weight written in this dtype against the torch kernel (rtol, atol): one ulp of it
#   rows        rows written in this dtype against a float64 reference, relative to max(1, |row|)
_SUM_FLOOR = {"torch": 64.0, "cpu": 8.0, "triton": 64.0, "cuda": 64.0}
TOL: Dict[torch.dtype, dict] = {
    torch.float32: dict(eps=2.0 ** -23, tiny=2.0 ** -149, sum_floor=_SUM_FLOOR, state=(1e-5, 1e-7),
                        weight=(2e-6, 1e-7), rows=2.0 ** -22),
    torch.float16: dict(eps=2.0 ** -10, tiny=2.0 ** -24, sum_floor=_SUM_FLOOR, state=(1e-5, 1e-7),
                        weight=(1e-3, 1e-5), rows=2.0 ** -10),
    torch.bfloat16: dict(eps=2.0 ** -7, tiny=2.0 ** -133, sum_floor=_SUM_FLOOR, state=(1e-5, 1e-7),
                         weight=(8e-3, 1e-5), rows=2.0 ** -7),
}


# ---------------------------------------------------------------------------------------------- backends
def device_of(backend: str) -> torch.device:
    """The device a backend's tests run on."""
    if backend == "cuda" or (backend == "triton" and CUDA and not INTERPRETER):
        return torch.device("cuda")
    return torch.device("cpu")


def require(backend: str) -> torch.device:
    """The backend's device if the backend is live; else skip (truly absent here) or fail."""
    dev = device_of(backend)
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'kne[triton]')")
    live, why = _backends.status(backend, dev.type)
    if live:
        return dev
    if backend == "cuda":
        pytest.skip(f"the CUDA C++ kernels are not live here: {why}")
    pytest.fail(f"the {backend} backend is not live on {dev.type} tensors (CI must have it): {why}", pytrace=False)


def kernel(op: str, backend: str):
    """The raw kernel of ``backend`` for the dispatcher op ``op`` (the schema's signature; no
    argument checks, no first-use check): what the op's public function ends up calling."""
    return _backends.implementation(op, backend)


def _id(case) -> str:
    if isinstance(case, torch.dtype):
        return str(case).replace("torch.", "")
    return str(case).replace(" ", "")


def over_backends(common: Iterable = (), **only: Sequence):
    """Parameters ``(backend, case)``: every case of ``common`` on every backend, plus those listed
    for one backend only (``cpu=[...]``, ``cuda=[...]``; sizes the Triton interpreter would take
    minutes for stay with the native backends). Each carries its backend's marker."""
    common = list(common)
    return [pytest.param(b, c, marks=MARKS[b], id=f"{b}-{_id(c)}") for b in BACKENDS
            for c in common + list(only.get(b, ()))]


def backend_params(*backends: str):
    """``backend`` parameters for the given backends (default: all), each with its marker."""
    return [pytest.param(b, marks=MARKS[b], id=b) for b in (backends or BACKENDS)]


# ---------------------------------------------------------------------------------------------- inputs
def rand(shape, dtype, gen: torch.Generator, device, scale: float = 1.0) -> torch.Tensor:
    """``randn * scale`` drawn on the CPU with ``gen`` (the same numbers on every device), in ``dtype``."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that starts one element past a 16-byte boundary (the scalar paths
    of the vectorised kernels; the JIT's generic specialization)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def poison_native(device: torch.device, nbytes: int) -> None:
    """Leave freed, poisoned memory of ``nbytes`` behind, so that an output a C++ kernel allocates
    (``at::empty``) and fails to write likely holds garbage: NaN-filled on the CPU (best effort: the
    allocator decides), 0xFF bytes in the CUDA caching allocator (NaN as float, -1 as int64, an
    invalid 255 as bool; small blocks come from 2 MiB segments, large ones from 64 MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        blocks = [torch.empty(n, dtype=torch.uint8, device=device) for n in [1 << 20] * 8 + [64 << 20] * 2]
        for b in blocks:
            b.fill_(0xFF)
        del blocks
        torch.cuda.synchronize()
    else:
        t = torch.full((max(1, nbytes // 4),), float("nan"))
        del t


def poison_python_empty(monkeypatch) -> None:
    """``torch.empty`` / ``torch.empty_like`` return poisoned memory (NaN floats, True bools, -7
    integers), so an output a Python-level kernel (the torch kernels, the Triton launchers)
    allocates and forgets to write shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))


# ---------------------------------------------------------------------------------------------- comparisons
def _worst(actual: torch.Tensor, bad: torch.Tensor, excess: torch.Tensor) -> int:
    return int((excess.nan_to_num(float("inf")) * bad).flatten().argmax())


def assert_sum(actual: torch.Tensor, exact: torch.Tensor, torch_result: torch.Tensor, abs_sum: torch.Tensor,
               dtype: torch.dtype, backend: str, what: str) -> None:
    """An fp32 sum against its float64 ``exact`` value, within the ``sum`` tolerance of ``dtype``
    and ``backend`` (see TOL); names the worst element. NaN fails."""
    assert actual.shape == exact.shape and actual.dtype == torch.float32, (what, actual.shape, actual.dtype)
    exact, abs_sum = exact.double().to(actual.device), abs_sum.double().to(actual.device)
    err = (actual.double() - exact).abs()
    bound = TOL[dtype]["sum_floor"][backend] * U * abs_sum + 1e-30
    if backend != "torch":
        bound = bound + 2 * (torch_result.double().to(actual.device) - exact).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = _worst(actual, bad, err - bound)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst at "
                             f"{where(actual.shape, i)}: got {actual.flatten()[i].item()!r}, exact "
                             f"{exact.flatten()[i].item()!r}, torch kernel {torch_result.flatten()[i].item()!r}, "
                             f"bound {bound.flatten()[i].item():.3g}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """|actual - expected| <= atol + rtol * |expected| element-wise (same dtype and shape); names the worst."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = ~(err <= bound)
    if bad.any():
        i = _worst(actual, bad, err - bound)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} out of tolerance; worst at "
                             f"{where(actual.shape, i)}: got {actual.flatten()[i].item()!r}, want "
                             f"{expected.flatten()[i].item()!r}")


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """|got - want| <= tol element-wise against a float64 ``want``; NaN fails; names the first bad element."""
    err = (got.double().cpu() - want).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: at {list(where(got.shape, i))} got {got.reshape(-1)[i].item()!r}, float64 "
                             f"oracle {want.reshape(-1)[i].item()!r}, error {err.reshape(-1)[i].item():.3g} > bound "
                             f"{tol.reshape(-1)[i].item():.3g} ({int(bad.sum())} of {got.numel()} elements)")


def assert_kernel_refuses(call, needle: str, what: str) -> None:
    """A C++ kernel called directly (``torch.ops.kne.*``, without the public function's checks)
    raises ``RuntimeError`` whose message holds ``needle`` (the argument's name and the rule)."""
    with pytest.raises(RuntimeError) as info:
        call()
    assert needle in str(info.value), f"{what}: message lacks {needle!r}: {info.value}"


# ---------------------------------------------------------------------------------------------- opcheck
def opcheck(op: str, backend: str, args: tuple) -> None:
    """``torch.library.opcheck`` of ``kne::<op>`` with ``backend``'s kernel: the C++ kernels as
    registered; the torch kernel and the Triton launcher registered for the device's dispatch key
    for the duration (overriding a C++ kernel there)."""
    from kne_kernels.ops import op as dispatcher_op

    if backend in ("cpu", "cuda"):
        torch.library.opcheck(dispatcher_op(op), args)
        return
    key = "CUDA" if args[0].is_cuda else "CPU"
    lib = torch.library.Library("kne", "IMPL")
    try:
        lib.impl(op, kernel(op, backend), key)
        torch.library.opcheck(dispatcher_op(op), args)
    finally:
        lib._destroy()


# ---------------------------------------------------------------------------------------------- fuzzing
# Hypothesis: a fixed, derandomized budget per test (the same examples on every run, no example
# database); the Triton interpreter runs each kernel program in numpy, so it gets fewer.
FUZZ_EXAMPLES = {"torch": 150, "cpu": 150, "triton": 50, "cuda": 150}
SIZES = [0, 1, 2, 3, 5, 7, 13, 31, 61, 127, 257]  # 0, 1 and primes
WIDE = [521, 1031]  # past the Triton "wide" block (D >= 512) and several AVX-512 vectors


def fuzz_dtypes(backend: str):
    """fp32/fp16/bf16; fp32/fp16 for Triton's interpreter."""
    return [torch.float32, torch.float16] if backend == "triton" and device_of("triton").type == "cpu" else list(FLOATS)


def fuzz_tests(body, namespace: dict, name: str) -> None:
    """Define ``test_fuzz_<name>_<backend>`` in ``namespace`` for every backend: hypothesis draws
    ``data`` and a seed, and ``body(backend, device, data, seed)`` checks one example."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st
    except ImportError:  # the GPU machine has no hypothesis; the fuzz tests are CI's
        given = None

    for backend in BACKENDS:
        if given is None:
            def test():
                pytest.skip("hypothesis is not installed (pip install 'kne[test]')")

            t = MARKS[backend](test)
            t.__name__ = t.__qualname__ = f"test_fuzz_{name}_{backend}"
            namespace[t.__name__] = t
            continue

        def make(backend=backend):
            @settings(max_examples=FUZZ_EXAMPLES[backend], deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1))
            def test(data, seed):
                body(backend, require(backend), data, seed)
            return test

        t = MARKS[backend](make())
        t.__name__ = t.__qualname__ = f"test_fuzz_{name}_{backend}"
        namespace[t.__name__] = t


def values(data, gen: torch.Generator, shape, dtype) -> torch.Tensor:
    """Random values at a drawn order of magnitude (10^-3 .. 10^3), in ``dtype``, on the CPU."""
    from hypothesis import strategies as st

    mag = 10.0 ** data.draw(st.integers(-3, 3), label="log10 magnitude")
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * mag).to(dtype)


def maybe_strided(data, t: torch.Tensor, label: str) -> torch.Tensor:
    """``t`` itself, or the same values in a strided view (every other element of a larger buffer,
    or a transposed buffer), on ``t``'s device."""
    from hypothesis import strategies as st

    kind = data.draw(st.sampled_from(["contiguous"] * 6 + ["step", "transposed"]), label=f"{label} layout")
    if kind == "step" and t.dim() >= 1:
        buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        view = buf[..., ::2]
    elif kind == "transposed" and t.dim() == 2:
        view = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device=t.device).t()
    else:
        return t
    view.copy_(t)
    return view


def refused_if_strided(fn, tensors: dict):
    """Run ``fn``; if one of ``tensors`` is not contiguous, it must be refused by name instead (the
    contract: nothing is copied silently). ``None`` when refused."""
    from hypothesis import event

    strided = [k for k, t in tensors.items() if t is not None and not t.is_contiguous()]
    if strided:
        event(f"strided {strided[0]}: refused")
        with pytest.raises(ValueError, match=f"{strided[0]} is not contiguous"):
            fn()
        return None
    event("checked against the oracle")
    return fn()

