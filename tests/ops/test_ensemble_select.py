"""``ensemble_select`` and its three dispatcher ops (``kne::ensemble_aggregate``,
``kne::order_statistics``, ``kne::threshold_mask``) on every backend, the one percentile formula
against NumPy, the public function's rules, opcheck, the first-use cases and hypothesis fuzzing.

What is exact: ``max``, the order statistics, masks and counts on every backend; the mean is
torch's CPU ``mean(0)`` bit for bit on the torch and cpu backends, and the float32 sum in order
``r = 0..R-1`` divided by ``R`` bit for bit on the GPU kernels (triton, cuda)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import kne_kernels
from kne_kernels.ops import ensemble_select as es
from helpers import NUMPY_PERCENTILE_EXACT, numpy_percentile_exact
from .kernel_testing import (SIZES, U, WIDE, assert_equal, assert_kernel_refuses, assert_within, backend_params,
                             device_of, fuzz_tests, kernel, maybe_strided, misaligned, opcheck, over_backends, rand,
                             refused_if_strided, require, threads, values)

SEQUENTIAL_MEAN = ("triton", "cuda")  # the GPU kernels' mean; torch and cpu: torch's CPU mean


def _sequential_mean(scores: torch.Tensor) -> torch.Tensor:
    """``(((0 + s[0]) + s[1]) + ... + s[R-1]) / R`` in float32, an IEEE division, on the CPU."""
    s = scores.cpu()
    acc = torch.zeros(s.shape[1])
    for r in range(s.shape[0]):
        acc = acc + s[r]
    return (acc / torch.full_like(acc, s.shape[0])).to(scores.device)


def _mean_expected(backend: str, scores: torch.Tensor) -> torch.Tensor:
    if backend in SEQUENTIAL_MEAN:
        return _sequential_mean(scores)
    return scores.cpu().mean(0).to(scores.device)


# ---------------------------------------------------------------------------------------------- ensemble_aggregate
AGG_SHAPES = [(1, 1), (2, 7), (3, 129), (3, 517), (5, 1025), (7, 4097), (17, 4097), (33, 4096)]
CPU_AGG_SHAPES = [(R, M) for R in (1, 2, 3, 7, 16, 33) for M in (1, 7, 31, 100, 4097, 40000)
                  if (R, M) not in AGG_SHAPES]


def _scores(kind, R, M, gen, dev):
    if kind == "wide":  # magnitudes over many orders
        return (torch.randn(R, M, generator=gen) * torch.randn(R, M, generator=gen).mul(3).exp()).to(dev)
    s = torch.randn(R, M, generator=gen) * 3
    if kind == "specials":
        s[:, :3] = torch.tensor([-0.0, 0.0, -1.5])[: min(3, M)]  # signed zeros, ties
        if M > 5:
            s[R - 1, 5] = float("nan")  # amax propagates NaN, from any row
    return s.to(dev)


@pytest.mark.parametrize("kind", ["randn", "wide", "specials"])
@pytest.mark.parametrize("backend,shape", over_backends(AGG_SHAPES, torch=CPU_AGG_SHAPES, cpu=CPU_AGG_SHAPES))
def test_aggregate(backend, shape, kind, gen, poisoned):
    """``max`` equals ``amax`` (NaN propagates); the mean is the backend's specified sum bit for
    bit, and the mean (float64, loosely). Outputs poisoned before the call."""
    dev = require(backend)
    R, M = shape
    s = _scores(kind, R, M, gen, dev)
    poisoned(dev, 4 * M)
    mx = kernel("ensemble_aggregate", backend)(s, 0)
    assert_equal(mx, s.amax(0), f"max {backend} [{R}, {M}] {kind}")
    poisoned(dev, 4 * M)
    mean = kernel("ensemble_aggregate", backend)(s, 1)
    assert_equal(mean, _mean_expected(backend, s), f"mean {backend} [{R}, {M}] {kind}", bitwise=True)
    exact = s.double().mean(0).cpu()  # and the mean: a float32 sum of R terms in any order
    ok = ~exact.isnan()
    assert torch.equal(mean.isnan().cpu(), ~ok)
    assert_within(mean[ok.to(dev)], exact[ok], ((R + 4) * U * s.double().abs().sum(0) / R).cpu()[ok], "mean")


def test_aggregate_edge_values(backend, dev, gen):
    """NaN, infinity and signed-zero columns: max as amax, mean bit for bit as specified."""
    s = torch.randn(4, 50, generator=gen)
    s[2, 7] = float("nan")
    s[:, 9] = -0.0
    s[1, 11] = float("inf")
    s = s.to(dev)
    mx = kernel("ensemble_aggregate", backend)(s, 0)
    assert math.isnan(mx[7]) and mx[11] == float("inf")
    torch.testing.assert_close(mx, s.amax(0), rtol=0, atol=0, equal_nan=True)
    mean = kernel("ensemble_aggregate", backend)(s, 1)
    assert_equal(mean, _mean_expected(backend, s), f"mean {backend} NaN, inf and -0.0 columns", bitwise=True)


def test_aggregate_mean_rounding(backend, dev, gen, poisoned):
    """Values whose float32 sum depends on the order (large and small magnitudes mixed)."""
    s = rand((9, 2049), torch.float32, gen, dev) * torch.logspace(-6, 6, 9)[:, None].to(dev)
    assert_equal(kernel("ensemble_aggregate", backend)(s, 1), _mean_expected(backend, s), "mean, mixed magnitudes",
                 bitwise=True)


def test_aggregate_misaligned_and_nan(backend, dev, gen):
    s = rand((3, 4096), torch.float32, gen, dev)
    s[1, 5] = float("nan")
    s[0, 4095] = float("nan")
    for x in (s, misaligned(s)):
        got_max, got_mean = kernel("ensemble_aggregate", backend)(x, 0), kernel("ensemble_aggregate", backend)(x, 1)
        assert_equal(got_max, x.amax(0), "max with NaN (propagates, as torch.amax)")
        assert got_mean.isnan().nonzero().flatten().tolist() == [5, 4095]
        torch.testing.assert_close(got_mean, x.mean(0), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.cpu_backend
def test_cpu_aggregate_two_threads_same_bits_as_torch(gen):
    require("cpu")
    scores = torch.randn(7, 100003, generator=gen)
    want = {m: es.ensemble_aggregate_torch(scores, m) for m in (0, 1)}  # torch with one thread
    with threads(2):
        got = {m: kernel("ensemble_aggregate", "cpu")(scores, m) for m in (0, 1)}
    assert torch.equal(got[0], want[0])
    assert_equal(got[1], want[1], "mean with two threads", bitwise=True)


# ---------------------------------------------------------------------------------------------- order_statistics
def _order_values(kind: str, M: int, gen) -> torch.Tensor:
    v = torch.randn(M, generator=gen)
    if kind == "wide":  # many orders of magnitude
        return v * torch.randn(M, generator=gen).mul(10).exp()
    if kind == "ties":  # few distinct values
        return torch.randint(-3, 4, (M,), generator=gen).float()
    if kind == "round1":  # many equal values across the range
        return v.round(decimals=1)
    if kind == "constant":
        return torch.full((M,), -2.5)
    if kind == "signed zeros":
        return torch.where(torch.rand(M, generator=gen) < 0.5, torch.zeros(M), -torch.zeros(M))
    if kind == "zeros and positives":
        return torch.cat([-torch.zeros(M // 2), torch.rand(M - M // 2, generator=gen)])
    if kind == "dense bucket":  # every value in one top-digit bucket
        return 1.0 + torch.rand(M, generator=gen) * 1e-3
    if kind == "mostly zeros":  # parameters without gradient: zeros, some -0.0, a few of either sign
        z = torch.zeros(M)
        z[torch.rand(M, generator=gen) < 0.3] = -0.0
        pick = torch.rand(M, generator=gen)
        z[pick < 0.05] = -torch.rand(int((pick < 0.05).sum()), generator=gen)
        z[pick > 0.95] = torch.rand(int((pick > 0.95).sum()), generator=gen)
        return z
    if kind == "sparse":  # mostly exact zeros (parameters without gradient), some -0.0, the rest randn
        z = torch.rand(M, generator=gen)
        return torch.where(z < 0.1, torch.tensor(-0.0), torch.where(z < 0.7, torch.zeros(()), v))
    if kind == "extremes":  # max/min normals, subnormals, huge ties
        base = torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.1754944e-38, -1.1754944e-38, 1.0, -1.0])
        return base[torch.randint(0, len(base), (M,), generator=gen)]
    if kind == "full range":  # magnitudes over the whole float32 range, infinities included
        e = torch.randint(-44, 38, (M,), generator=gen).float()
        v = (v * torch.pow(10.0, e)).clamp(-3e38, 3e38)
        special = torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 0.0, -0.0])
        n = min(M, special.numel())
        v[torch.randperm(M, generator=gen)[:n]] = special[:n]
        return v
    assert kind == "randn", kind
    return v


ORDER_KINDS = ["randn", "wide", "ties", "round1", "constant", "signed zeros", "zeros and positives", "dense bucket",
               "mostly zeros", "sparse", "extremes", "full range"]


def _ranks(M: int, gen) -> list:
    ks = {0, 1, M // 100, M // 3, M // 2, (M - 1) * 99 // 100, (99 * M) // 100, M - 2, M - 1}
    ks |= set(torch.randint(0, M, (3,), generator=gen).tolist())
    return sorted(k for k in ks if 0 <= k < M)


def _check_order(backend, v, k, what, poisoned=None):
    """Against the sorted values (an oracle independent of kthvalue): equal as values (-0.0 == +0.0,
    NaN == NaN); the cpu kernel returns a zero as +0.0."""
    if poisoned is not None:
        poisoned(v.device, 8)
    got = kernel("order_statistics", backend)(v, k)
    srt = torch.sort(v.cpu()).values
    want = torch.stack([srt[k], srt[min(k + 1, v.numel() - 1)]]).to(v.device)
    assert_equal(got, want, f"order_statistics {backend} {what} M={v.numel()} k={k}")
    if backend == "cpu":
        assert not any(x == 0 and math.copysign(1.0, x) < 0 for x in got.tolist()), f"{what}: -0.0 returned"


@pytest.mark.parametrize("kind", ORDER_KINDS)
@pytest.mark.parametrize("backend,M", over_backends([1, 2, 7, 5000], torch=[4097, 8193, 100003, 352256],
                                                     cpu=[4097, 8193, 100003, 352256], cuda=[4097, 100003]))
def test_order_statistics(backend, M, kind, gen, poisoned):
    dev = require(backend)
    v = _order_values(kind, M, gen).to(dev)
    for k in _ranks(M, gen):
        _check_order(backend, v, k, kind, poisoned)
    for k in (0, M // 2, M - 1):  # a view one element off a 16-byte boundary
        _check_order(backend, misaligned(v), k, kind + " misaligned", poisoned)


def test_order_statistics_infinities_and_nan(backend, dev, gen):
    v = torch.randn(20001, generator=gen)
    v[3], v[4] = float("inf"), float("-inf")
    if backend in ("torch", "cpu"):  # the GPU kernels take finite values (and infinities) only
        v[5] = float("nan")
    v = v.to(dev)
    for k in (0, 1, 2, 19998, 19999, 20000):
        _check_order(backend, v, k, "inf/nan")


def test_order_statistics_large(backend, dev, gen, poisoned):
    """M > 2^16 (several programs, many tiles each), with ties straddling the digit boundaries."""
    M = (1 << 16) + 4099
    v = (torch.randn(M, generator=gen) * 100).round()
    v[:1000] = 0.0
    v = v.to(dev)
    for k in (0, 1, M // 2, M - 2, M - 1, 77777 % M):
        _check_order(backend, v, k, "large", poisoned)


def test_order_statistics_adjacent_keys(backend, dev, gen):
    """The two ranks differ only in the last digit / the first digit (two histograms per pass)."""
    a = torch.tensor(1.0)
    nxt = torch.nextafter(a, torch.tensor(2.0))
    v = torch.cat([a.repeat(50), nxt.repeat(50), -a.repeat(3)])
    v = v[torch.randperm(v.numel(), generator=gen)].to(dev)
    for k in (2, 3, 52, 53, 101, 102):
        _check_order(backend, v, k, "adjacent")


@pytest.mark.parametrize("backend", backend_params("torch", "cpu", "cuda", *(
    ["triton"] if device_of("triton").type == "cuda" else [])))  # 2^24 values: minutes in the interpreter
def test_order_statistics_beyond_2_pow_24(backend, gen):
    """Exact past torch.quantile's 2^24 limit, checked by counting (heavy ties, many zeros)."""
    dev = require(backend)
    M = (1 << 24) + 12345
    v = torch.randn(M, generator=gen).round(decimals=3)
    v[::7] = 0.0
    v = v.to(dev)
    for k in (0, M // 100, (99 * (M - 1)) // 100, M - 2):
        got = kernel("order_statistics", backend)(v, k).tolist()
        for rank, value in ((k, got[0]), (k + 1, got[1])):
            assert int((v < value).sum()) <= rank < int((v <= value).sum()), (k, rank, value)
    assert kernel("order_statistics", backend)(v, M - 1).tolist() == [v.max().item()] * 2


@pytest.mark.cuda_backend
def test_cuda_order_statistics_beyond_2_pow_31():
    """64-bit indexing: 2^31 + 12345 values (8.6 GB), a pattern whose order statistics are known."""
    dev = require("cuda")
    M = (1 << 31) + 12345
    if torch.cuda.get_device_properties(dev).total_memory < 3 * M * 4:
        pytest.skip("needs a GPU with at least 26 GB")
    base = torch.arange(1000, dtype=torch.float32, device=dev) - 500.0  # value j - 500, j = 0..999
    v = base.repeat(M // 1000 + 1)[:M]
    q, r = divmod(M, 1000)
    cum = [0]
    for j in range(1000):
        cum.append(cum[-1] + q + (1 if j < r else 0))

    def kth(k):  # the value of rank k: j with cum[j] <= k < cum[j+1]
        lo, hi = 0, 1000
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cum[mid] <= k else (lo, mid)
        return float(lo - 500)

    try:
        for k in (0, cum[1] - 1, cum[1], M // 2, (1 << 31) + 7, M - 2, M - 1):
            got = kernel("order_statistics", "cuda")(v, k).tolist()
            assert got == [kth(k), kth(min(k + 1, M - 1))], f"k={k}: {got}"
    finally:
        del v
        torch.cuda.empty_cache()


@pytest.mark.cpu_backend
@pytest.mark.parametrize("kind", ["randn", "ties", "signed zeros"])
def test_cpu_order_statistics_two_threads(kind, gen):
    require("cpu")
    v = _order_values(kind, 1_200_007, gen)
    with threads(2):
        for k in (0, 600_000, 1_188_000, 1_200_006):
            _check_order("cpu", v, k, kind + " (2 threads)")


# ---------------------------------------------------------------------------------------------- threshold_mask
THRESHOLDS = [-0.5, 0.0, 0.25, 0.3, float(torch.tensor(0.1, dtype=torch.float32)), 100.0]
MASK_SHAPES = [(1, 1), (3, 7), (20, 33), (7, 300)]
CPU_MASK_SHAPES = [(0, 5), (5, 0), (7, 4097), (64, 100), (2, 70001)]


@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("backend,shape", over_backends(MASK_SHAPES, torch=CPU_MASK_SHAPES, cpu=CPU_MASK_SHAPES,
                                                         triton=[(3, 5000)],
                                                         cuda=[(7, 4097), (3, 4096), (2, 300_001), (1000, 7)]))
def test_threshold_mask(backend, shape, threshold, positive_only, gen, poisoned):
    """Ties at the threshold (strictly greater only), signed zeros; outputs poisoned; aligned and
    misaligned values."""
    dev = require(backend)
    v = torch.randn(shape, generator=gen).round(decimals=2)
    v.view(-1)[::7] = 0.25
    v.view(-1)[1::11] = -0.0
    v = v.to(dev)
    for x in ((v, misaligned(v)) if v.numel() else (v,)):
        poisoned(dev, x.numel() + 8 * shape[0])
        mask, counts = kernel("threshold_mask", backend)(x, threshold, positive_only)
        assert mask.dtype == torch.bool and counts.dtype == torch.int64
        if mask.numel():
            assert int(mask.view(torch.uint8).max()) <= 1, "mask bytes other than 0 and 1 (unwritten?)"
        want = x > threshold
        if positive_only:
            want &= x > 0
        assert_equal(mask, want, f"mask {backend} {shape} thr={threshold} pos={positive_only}")
        assert_equal(counts, want.sum(1), f"counts {backend} {shape}")


def test_threshold_mask_compares_in_float32(backend, dev):
    v = torch.full((1, 4), 0.1, device=dev)
    mask, counts = kernel("threshold_mask", backend)(v, 0.1, False)  # 0.1 rounds to 0.1f: 0.1f > 0.1f is False
    assert not mask.any() and int(counts[0]) == 0


@pytest.mark.cpu_backend
def test_cpu_threshold_mask_two_threads(gen):
    require("cpu")
    v = torch.randn(33, 50001, generator=gen)
    with threads(2):
        mask, counts = kernel("threshold_mask", "cpu")(v, 0.5, True)
    want_mask, want_counts = es.threshold_mask_torch(v, 0.5, True)
    assert torch.equal(mask, want_mask) and torch.equal(counts, want_counts)


# ---------------------------------------------------------------------------------------------- the C++ kernels' checks
def _native_bad_cases(dev):
    """(what, call, the message's words from the CPU kernel, from the CUDA kernel)."""
    f = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
    agg, order, mask = (kernel(n, "cpu") for n in ("ensemble_aggregate", "order_statistics", "threshold_mask"))
    return [
        ("aggregate mode", lambda: agg(f(2, 3), 2), "mode must be", "mode must be"),
        ("aggregate dtype", lambda: agg(f(2, 3).double(), 0), "scores has dtype", "scores must be float32"),
        ("aggregate strides", lambda: agg(f(3, 2).t(), 0), "scores is not contiguous", "scores must be contiguous"),
        ("order k", lambda: order(f(5), 5), "k must lie in [0, 5)", "k must lie in [0, M=5)"),
        ("order empty", lambda: order(f(0), 0), "values is empty", "values is empty"),
        ("order 2-D", lambda: order(f(5, 2), 0), "values must be 1-D", "values must be 1-D"),
        ("order dtype", lambda: order(f(5).half(), 0), "values has dtype", "values must be float32"),
        ("mask 1-D", lambda: mask(f(5), 0.0, False), "values must be 2-D", "values must be 2-D"),
        ("mask strides", lambda: mask(f(4, 3).t(), 0.0, False), "values is not contiguous",
         "values must be contiguous"),
        ("mask dtype", lambda: mask(f(4, 3).double(), 0.0, False), "values has dtype", "values must be float32"),
    ]


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
@pytest.mark.parametrize("what", [c[0] for c in _native_bad_cases("cpu")])
def test_native_kernels_refuse_bad_inputs(backend, what):
    """The C++ kernels check their arguments themselves (a caller of torch.ops.kne.* without the
    public function), naming the argument."""
    dev = require(backend)
    _, call, cpu_words, cuda_words = next(c for c in _native_bad_cases(dev) if c[0] == what)
    needle = cpu_words if backend == "cpu" else cuda_words
    assert_kernel_refuses(call, needle, what)


# ---------------------------------------------------------------------------------------------- the percentile
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
        t = torch.from_numpy(arr.copy())
        for p in PERCENTILES + rng.uniform(0, 100, 4).tolist():
            got = kne_kernels.percentile_linear(t, p)
            want = np.percentile(arr, p)
            assert want.dtype == np.float32 and isinstance(got, float)
            assert _bits(got) == _bits(want), f"n={arr.size} p={p}: {got!r} vs numpy {want!r}"
            checked += 1
        assert torch.equal(t, torch.from_numpy(arr)), "percentile_linear modified its input"
    assert checked > 1000


def test_percentile_linear_on_multidimensional_input_and_extremes(gen):
    x = torch.randn(3, 5, 7, generator=gen)
    for p in (0.0, 100.0, 42.0):
        if NUMPY_PERCENTILE_EXACT or p in (0.0, 100.0):
            assert _bits(kne_kernels.percentile_linear(x, p)) == _bits(np.percentile(x.numpy().reshape(-1), p))
    assert kne_kernels.percentile_linear(x, 0.0) == x.min().item()
    assert kne_kernels.percentile_linear(x, 100.0) == x.max().item()
    one = torch.tensor([2.5])
    assert all(kne_kernels.percentile_linear(one, p) == 2.5 for p in (0.0, 99.0, 100.0))


def test_percentile_linear_rejects_bad_input():
    with pytest.raises(TypeError, match="float32"):
        kne_kernels.percentile_linear(torch.arange(5.0, dtype=torch.float64), 50)
    with pytest.raises(TypeError, match="float32"):
        kne_kernels.percentile_linear(torch.arange(5), 50)
    with pytest.raises(ValueError, match="empty"):
        kne_kernels.percentile_linear(torch.empty(0), 50)


# ---------------------------------------------------------------------------------------------- the public function
def _select_numpy(scores: np.ndarray, percentile: float, aggregate: str, positive_only: bool):
    agg = scores.max(0) if aggregate == "max" else scores.mean(0, dtype=np.float32)
    thr = np.percentile(agg, percentile)
    keep = agg > thr
    if positive_only:
        keep &= agg > 0
    return agg, thr, keep


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("positive_only", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 7), (4, 3, 33), (2, 30, 97), (5, 1, 4097)], ids=str)
def test_matches_numpy(backend, dev, shape, aggregate, positive_only, gen):
    scores = torch.randn(*shape, generator=gen)
    for p in (0.0, 50.0, 90.0, 99.0, 100.0, float(torch.rand(1, generator=gen)) * 100):
        sel = kne_kernels.ensemble_select(scores.to(dev), percentile=p, aggregate=aggregate,
                                          positive_only=positive_only, backend=backend)
        agg, thr, keep = _select_numpy(scores.numpy(), p, aggregate, positive_only)
        a = sel.aggregated.cpu()
        assert a.dtype == torch.float32
        assert np.allclose(a.numpy(), agg, rtol=1e-6, atol=1e-7)
        if aggregate == "max":
            assert np.array_equal(a.numpy(), agg)
            if NUMPY_PERCENTILE_EXACT:
                assert _bits(sel.threshold) == _bits(thr)
                assert np.array_equal(sel.mask.cpu().numpy(), keep)
        # the selection is exactly "aggregated > threshold (and > 0)" on the op's own aggregate
        expect = (a > sel.threshold) & ((a > 0) if positive_only else True)
        assert torch.equal(sel.mask.cpu(), expect)
        assert sel.mask.dtype == torch.bool and tuple(sel.mask.shape) == shape[1:]
        assert torch.equal(sel.counts.cpu(), expect.sum(1))
        assert len(sel.indices) == shape[1]
        for row, idx in zip(expect, sel.indices):
            assert idx.dtype == torch.long
            assert idx.tolist() == torch.nonzero(row).reshape(-1).tolist()
        if p == 100.0:
            assert int(sel.counts.sum()) == 0


def test_every_option_against_the_torch_backend(backend, dev, gen):
    """Ties everywhere, both aggregates, both flags: the same threshold, mask, counts and indices
    as the torch backend (NumPy's threshold too, where NumPy rounds as the kernels do); an empty
    selection; no fallback warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for agg in ("max", "mean"):
            for positive_only in (True, False):
                scores = torch.randn(3, 5, 41, generator=gen).round(decimals=1)  # many ties
                kw = dict(percentile=90.0, aggregate=agg, positive_only=positive_only)
                a = kne_kernels.ensemble_select(scores.to(dev), backend=backend, **kw)
                b = kne_kernels.ensemble_select(scores, backend="torch", **kw)
                assert a.threshold == b.threshold
                if NUMPY_PERCENTILE_EXACT:
                    assert a.threshold == float(np.percentile(b.aggregated.numpy(), 90.0))
                assert torch.equal(a.mask.cpu(), b.mask) and torch.equal(a.counts.cpu(), b.counts)
                assert [x.tolist() for x in a.indices] == [x.tolist() for x in b.indices]
        empty = kne_kernels.ensemble_select(-torch.rand(1, 3, 8, generator=gen).to(dev), backend=backend)
        assert empty.mask.sum() == 0 and [x.numel() for x in empty.indices] == [0, 0, 0]


@numpy_percentile_exact
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_thresholds_are_numpy_exact(backend, dev, n, gen):
    for p in (0.0, 37.5, 90.0, 99.0, 99.9, 100.0):
        s = torch.randn(1, 1, n, generator=gen)
        sel = kne_kernels.ensemble_select(s.to(dev), percentile=p, positive_only=False, backend=backend)
        assert sel.threshold == float(np.percentile(s.view(-1).numpy(), p))
        assert torch.equal(sel.mask[0].cpu(), s[0, 0] > sel.threshold)


def test_is_global_across_layers(backend, dev, gen):
    """One threshold over all layers: a layer of small scores gets nothing."""
    scores = torch.rand(2, 3, 50, generator=gen)
    scores[:, 1] += 10.0
    sel = kne_kernels.ensemble_select(scores.to(dev), percentile=70.0, backend=backend)
    # 150 values: the 70th percentile lies between the 105th and 106th smallest, so the 45 largest
    # (all in layer 1) are kept; a per-layer threshold would keep 15 in every layer
    assert sel.counts.tolist() == [0, 45, 0]
    assert sel.indices[1].tolist() == scores[:, 1].amax(0).argsort()[5:].sort().values.tolist()


def test_ties_and_empty_results(backend, dev):
    def select(s, **kw):
        return kne_kernels.ensemble_select(s.to(dev), backend=backend, **kw)

    # all equal: nothing is strictly above the threshold
    sel = select(torch.full((2, 2, 5), 0.7), percentile=10.0)
    assert int(sel.counts.sum()) == 0 and all(i.numel() == 0 for i in sel.indices)
    assert sel.threshold == pytest.approx(0.7)
    # ties at the threshold are excluded (strict >), values above kept
    sel = select(torch.tensor([[[1.0, 2.0, 2.0, 2.0, 3.0, 3.0]]]), percentile=50.0)
    assert sel.threshold == 2.0 and sel.indices[0].tolist() == [4, 5]
    # all scores negative: positive_only keeps nothing, without it the top ones are kept
    neg = -torch.arange(1.0, 21.0).reshape(1, 2, 10)
    assert int(select(neg, percentile=50.0).counts.sum()) == 0
    sel = select(neg, percentile=80.0, positive_only=False)
    assert sel.indices[0].tolist() == [0, 1, 2, 3] and sel.indices[1].numel() == 0
    # zeros are never positive
    z = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 1.0]]])
    assert select(z, percentile=10.0).indices[0].tolist() == [4]
    assert select(z, percentile=0.0).indices[0].tolist() == [4]
    # max vs mean aggregation differ: one request's spike is kept by max only
    s = torch.zeros(4, 1, 10)
    s[:, 0, :] = torch.linspace(0.1, 1.0, 10)
    s[0, 0, 0] = 2.0
    assert 0 in select(s, percentile=80.0, aggregate="max").indices[0].tolist()
    assert select(s, percentile=80.0, aggregate="mean").indices[0].tolist() == [8, 9]


def test_positive_only_must_be_bool(backend, dev):
    for bad in ("no", 0, 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="positive_only must be True or False"):
            kne_kernels.ensemble_select(torch.randn(1, 2, 5, device=dev), positive_only=bad, backend=backend)
    s = torch.randn(1, 2, 5, device=dev)
    assert torch.equal(kne_kernels.ensemble_select(s, positive_only=np.bool_(True), backend=backend).mask,
                       kne_kernels.ensemble_select(s, positive_only=True, backend=backend).mask)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_non_finite_scores_are_refused(backend, dev, bad, aggregate, gen):
    scores = torch.randn(2, 3, 5, generator=gen)
    scores[1, 2, 3] = bad  # in the second request: "max" would hide a -inf, "mean" a pair of them
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at \[1, 2, 3\]"):
        kne_kernels.ensemble_select(scores.to(dev), percentile=50.0, aggregate=aggregate, backend=backend)


def test_mean_that_overflows_is_refused(backend, dev):
    scores = torch.full((2, 1, 3), 3e38, device=dev)
    with pytest.raises(ValueError, match="mean scores over requests contain NaN or infinity"):
        kne_kernels.ensemble_select(scores, aggregate="mean", backend=backend)
    assert kne_kernels.ensemble_select(scores, aggregate="max", backend=backend).threshold == pytest.approx(3e38)


@pytest.mark.parametrize("bad, kw, error, match", [
    (torch.zeros(2, 3), {}, ValueError, "scores must be 3-D"),
    (torch.zeros(1, 2, 3, 4), {}, ValueError, "scores must be 3-D"),
    (torch.zeros(1, 2, 3, dtype=torch.float64), {}, TypeError, "scores has dtype float64"),
    (torch.zeros(1, 2, 3, dtype=torch.float16), {}, TypeError, "scores has dtype float16"),
    (torch.zeros(1, 2, 3, dtype=torch.int64), {}, TypeError, "scores has dtype int64"),
    (np.zeros((1, 2, 3), dtype=np.float32), {}, TypeError, "scores must be a torch.Tensor"),
    (torch.zeros(2, 3, 1).transpose(0, 2), {}, ValueError, "scores is not contiguous"),
    (torch.zeros(0, 2, 3), {}, ValueError, "empty"),
    (torch.zeros(1, 0, 3), {}, ValueError, "empty"),
    (torch.zeros(1, 2, 3), {"percentile": -0.1}, ValueError, "percentile"),
    (torch.zeros(1, 2, 3), {"percentile": -1}, ValueError, "percentile"),
    (torch.zeros(1, 2, 3), {"percentile": 100.5}, ValueError, "percentile"),
    (torch.zeros(1, 2, 3), {"percentile": float("nan")}, ValueError, "percentile"),
    (torch.zeros(1, 2, 3), {"percentile": True}, ValueError, "percentile"),
    (torch.zeros(1, 2, 3), {"aggregate": "sum"}, ValueError, "aggregate"),
    (torch.zeros(1, 2, 3), {"aggregate": "median"}, ValueError, "aggregate"),
    (torch.tensor([[[1.0, float("nan"), 2.0]]]), {}, ValueError, "NaN"),
    (torch.tensor([[[1.0, float("inf"), 2.0]]]), {}, ValueError, "infinity"),
    (torch.tensor([[[1.0, -float("inf"), 2.0]]]), {}, ValueError, "infinity"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_inputs_are_named(bad, kw, error, match):
    with pytest.raises(error, match=match):
        kne_kernels.ensemble_select(bad, **kw)


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


# ---------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("op", [d.name for d in es.OPS])
def test_opcheck(backend, dev, op, gen):
    args = {"ensemble_aggregate": (rand((3, 41), torch.float32, gen, dev), 1),
            "order_statistics": (rand((20000,), torch.float32, gen, dev), 123),
            "threshold_mask": (rand((4, 33), torch.float32, gen, dev), 0.2, True)}[op]
    opcheck(op, backend, args)


@pytest.mark.parametrize("op", [d.name for d in es.OPS])
def test_selfcheck_case_passes(backend, dev, op):
    d = next(d for d in es.OPS if d.name == op)
    ok, why = d.selfcheck(kernel(op, backend), d.torch, dev)
    assert ok, why


# ---------------------------------------------------------------------------------------------- fuzzing
def _fuzz(backend, dev, data, seed):
    """Shapes with 1 and primes, ties, every percentile (floats and integers), both aggregates and
    flags, a strided input (refused by name); the threshold equals NumPy's on the aggregated values."""
    from hypothesis import strategies as st

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
    s = maybe_strided(data, scores.to(dev), "scores")

    def call():
        return kne_kernels.ensemble_select(s, percentile=percentile, aggregate=aggregate, positive_only=positive_only,
                                           backend=backend)

    if scores.numel() == 0:
        with pytest.raises(ValueError, match="empty|not contiguous"):
            call()
        return
    sel = refused_if_strided(call, {"scores": s})
    if sel is None:
        return
    agg = sel.aggregated.cpu()
    assert agg.dtype == torch.float32 and agg.shape == (L, D)
    if aggregate == "max":
        assert torch.equal(agg, scores.amax(0)), "max over requests is exact"
    else:
        assert_within(agg, scores.double().mean(0), (R + 4) * U * scores.double().abs().sum(0) / R,
                      f"mean over {R} requests")
    thr = float(np.percentile(agg.reshape(-1).numpy(), percentile))
    if NUMPY_PERCENTILE_EXACT:
        assert sel.threshold == thr, (sel.threshold, thr)
    thr = sel.threshold
    mask = agg > thr
    if positive_only:
        mask &= agg > 0
    assert torch.equal(sel.mask.cpu(), mask)
    assert torch.equal(sel.counts.cpu(), mask.sum(1))
    assert [x.tolist() for x in sel.indices] == [row.nonzero()[:, 0].tolist() for row in mask]
    # and the float64 view: nothing kept sits at or below the threshold, nothing left out above it
    assert (agg.double()[mask] > thr).all()
    assert not ((agg.double() > thr) & ((agg > 0) | (not positive_only)) & ~mask).any()


fuzz_tests(_fuzz, globals(), "ensemble_select")
