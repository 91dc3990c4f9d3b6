"""The CUDA C++ kernels of ``kne_kernels._C`` (dispatch key ``CUDA``) on CUDA tensors, against the
pure-torch kernels of ``kne_kernels._ops`` (the semantics) and float64 references.

Skipped as a whole, with the reason, where the CUDA kernels are not live: torch sees no GPU, or the
library was built without CUDA kernels (``kne_kernels._extension.status("cuda")``). On a GPU machine
build with ``pip install --no-build-isolation -e .`` against a CUDA torch (or ``FORCE_CUDA=1``).

Conventions (see shared/CONVENTIONS.md): fresh random inputs seeded per test, odd shapes (1, 7,
4097) and 16-byte-aligned and misaligned inputs, every accepted dtype, outputs allocated from a
CUDA cache poisoned with 0xFF bytes (NaN as float, -1 as int64, an invalid 255 as bool), in-place
arguments cloned, exact comparisons where the kernel is exact and, for the fp32 sums, the error
against float64 at most twice that of the torch kernel (or a floor of a few ulp of the absolute
sum). Reports name the worst index.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import kne_kernels
from kne_kernels import _extension, _ops, _selfcheck
from helpers import assert_equal, where

LIVE, WHY = _extension.status("cuda")
if not LIVE:
    pytest.skip(f"the CUDA C++ kernels are not live here: {WHY}", allow_module_level=True)

DEV = torch.device("cuda")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- helpers
def op(name: str):
    """The dispatcher op: CUDA tensors reach the CUDA C++ kernel (registered, see the test below)."""
    return _ops.op(name)


@pytest.fixture
def cgen(seed) -> torch.Generator:
    """A CUDA generator seeded per test (for the large inputs)."""
    return torch.Generator(device=DEV).manual_seed(seed)


def rand(shape, dtype, gen, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEV)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that starts one element past a 16-byte boundary (scalar path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def poison_cache() -> None:
    """Fill free blocks of the CUDA caching allocator with 0xFF, so that outputs the op allocates
    next start as garbage (small blocks come from 2 MiB segments, large ones are split from 64 MiB)."""
    torch.cuda.synchronize()
    blocks = [torch.empty(n, dtype=torch.uint8, device=DEV) for n in [1 << 20] * 8 + [64 << 20] * 2]
    for b in blocks:
        b.fill_(0xFF)
    del blocks
    torch.cuda.synchronize()


def assert_sum_close(actual: torch.Tensor, exact: torch.Tensor, torch_result: torch.Tensor, abs_sum: torch.Tensor,
                     what: str, floor_ulps: float = 64.0) -> None:
    """An fp32 sum against the float64 ``exact`` value: error at most twice that of the torch kernel,
    or ``floor_ulps`` fp32 ulps of the absolute sum (summation order differs from torch's)."""
    assert actual.shape == exact.shape and actual.dtype == torch.float32, (actual.shape, actual.dtype)
    err = (actual.double() - exact).abs()
    bound = torch.maximum(2 * (torch_result.double() - exact).abs(), floor_ulps * 2.0**-24 * abs_sum)
    bad = ~(err <= bound)  # NaN fails
    if bad.any():
        i = int(((err - bound).nan_to_num(float("inf")) * bad).flatten().argmax())
        at = where(actual.shape, i)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst at {at}: "
                             f"got {actual.flatten()[i].item()!r}, exact {exact.flatten()[i].item()!r}, torch "
                             f"{torch_result.flatten()[i].item()!r}, bound {bound.flatten()[i].item():.3g}")


# ---------------------------------------------------------------------------------------------- registry
def test_every_op_has_a_cuda_kernel():
    for name in _ops.SCHEMAS:
        keys = _extension.registered_keys(name)
        assert "CUDA" in keys and "CPU" in keys, f"kne::{name}: {keys}"


# ---------------------------------------------------------------------------------------------- neuron attribution
SEGMENTS = ("none", "sorted", "random", "many", "scaled")


def _neuron_case(N, D, dtype, segments, gen, align=True):
    act, grad = rand((N, D), dtype, gen), rand((N, D), dtype, gen)
    if not align:
        act, grad = misaligned(act), misaligned(grad)
    seg, scale, sv, S = None, None, 1.0, 1
    if segments == "sorted":  # requests' rows contiguous (the usual case): one flush per boundary
        S = 5
        seg = torch.sort(torch.randint(0, S, (N,), generator=gen)).values.to(DEV)
    elif segments == "random":  # any order: threads flush on every change of id
        S = 3
        seg = torch.randint(0, S, (N,), generator=gen).to(DEV)
    elif segments == "many":
        S = 300
        seg = torch.randint(0, S, (N,), generator=gen).to(DEV)
    elif segments == "scaled":  # IG step weights and a scalar
        scale, sv = torch.rand(N, generator=gen).to(DEV), 0.37
    return act, grad, seg, scale, sv, S


def _check_neuron(act, grad, seg, scale, sv, S, gen, what):
    N, D = act.shape
    out0 = torch.randn(S, D, generator=gen).to(DEV)  # accumulated into, not overwritten
    out = out0.clone()
    op("neuron_attribution_")(out, act, grad, seg, scale, sv)
    ref = out0.clone()
    _ops.neuron_attribution_torch(ref, act, grad, seg, scale, sv)
    p = act.double() * grad.double()
    if scale is not None:
        p = p * scale.double()[:, None]
    p = p * sv
    ids = seg if seg is not None else torch.zeros(N, dtype=torch.int64, device=DEV)
    exact = out0.double().index_add(0, ids, p)
    abs_sum = out0.double().abs().index_add(0, ids, p.abs())
    assert_sum_close(out, exact, ref, abs_sum, what)


@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("N,D", [(1, 1), (7, 7), (4097, 7), (7, 4097), (4097, 256), (300, 4096)])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_neuron_attribution(N, D, dtype, segments, gen):
    act, grad, seg, scale, sv, S = _neuron_case(N, D, dtype, segments, gen)
    _check_neuron(act, grad, seg, scale, sv, S, gen, f"neuron_attribution_ N={N} D={D} {dtype} {segments}")


@pytest.mark.parametrize("segments", ["none", "random"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_neuron_attribution_misaligned_inputs(dtype, segments, gen):
    act, grad, seg, scale, sv, S = _neuron_case(300, 256, dtype, segments, gen, align=False)
    _check_neuron(act, grad, seg, scale, sv, S, gen, f"misaligned {dtype} {segments}")


def test_neuron_attribution_large_n_and_one_segment_per_block(gen, cgen):
    # 2^17 rows: many row tiles (atomics across tiles); ids change once per 1000 rows.
    N, D = 1 << 17, 96
    act = torch.randn(N, D, device=DEV, generator=cgen).to(torch.bfloat16)
    grad = torch.randn(N, D, device=DEV, generator=cgen).to(torch.bfloat16)
    seg = torch.arange(N, device=DEV) // 1000
    _check_neuron(act, grad, seg, None, 1.0, int(seg[-1]) + 1, gen, "N=2^17 bf16 blocks of 1000 rows")


# ---------------------------------------------------------------------------------------------- weight attribution
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("R,C", [(1, 1), (7, 4097), (4097, 7), (64, 4096), (33, 8192), (5, 4104)])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_weight_attribution(R, C, dtype, dim, absolute, gen):
    w, g = rand((R, C), dtype, gen), rand((R, C), dtype, gen)
    out0 = torch.randn(C if dim == 0 else R, generator=gen).to(DEV)
    out = out0.clone()
    op("weight_attribution_")(out, w, g, dim, absolute)
    ref = out0.clone()
    _ops.weight_attribution_torch(ref, w, g, dim, absolute)
    p = w.double() * g.double()
    if absolute:
        p = p.abs()
    exact = out0.double() + p.sum(dim)
    abs_sum = out0.double().abs() + p.abs().sum(dim)
    assert_sum_close(out, exact, ref, abs_sum, f"weight_attribution_ [{R},{C}] {dtype} dim={dim} abs={absolute}")


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_attribution_misaligned_inputs(dim, gen):
    w, g = misaligned(rand((33, 4096), torch.float16, gen)), misaligned(rand((33, 4096), torch.float16, gen))
    out = torch.zeros(w.shape[1 - dim], device=DEV)
    op("weight_attribution_")(out, w, g, dim, False)
    ref = torch.zeros_like(out)
    _ops.weight_attribution_torch(ref, w, g, dim, False)
    p = w.double() * g.double()
    assert_sum_close(out, p.sum(dim), ref, p.abs().sum(dim), f"misaligned dim={dim}")


# ---------------------------------------------------------------------------------------------- ensemble aggregate
AGG_SHAPES = [(1, 1), (2, 7), (7, 4097), (33, 4096), (3, 517)]


@pytest.mark.parametrize("R,M", AGG_SHAPES)
def test_ensemble_aggregate_max(R, M, gen):
    s = rand((R, M), torch.float32, gen)
    poison_cache()
    got = op("ensemble_aggregate")(s, 0)
    assert_equal(got, s.amax(0), f"max [{R},{M}]")


@pytest.mark.parametrize("R,M", AGG_SHAPES)
def test_ensemble_aggregate_mean_is_the_sequential_fp32_sum_over_r(R, M, gen):
    """mean = (((0 + s[0]) + s[1]) + ... + s[R-1]) / R in float32, bit for bit (the specification).
    torch.mean is that only for small R (on CPU for R <= 4); on CUDA it reduces in another order and
    multiplies by a float reciprocal of R, so it is only compared with a tolerance."""
    s = rand((R, M), torch.float32, gen)
    poison_cache()
    got = op("ensemble_aggregate")(s, 1)
    sc = s.cpu()
    acc = torch.zeros(M)
    for r in range(R):
        acc = acc + sc[r]
    want = (acc / R).to(DEV)  # CPU division: correctly rounded
    assert_equal(got, want, f"mean [{R},{M}]", bitwise=True)
    torch.testing.assert_close(got, _ops.ensemble_aggregate_torch(s, 1), rtol=1e-5, atol=1e-6)


def test_ensemble_aggregate_misaligned_and_nan(gen):
    s = rand((3, 4096), torch.float32, gen)
    s[1, 5] = float("nan")
    s[0, 4095] = float("nan")
    for x in (s, misaligned(s)):
        got_max, got_mean = op("ensemble_aggregate")(x, 0), op("ensemble_aggregate")(x, 1)
        assert_equal(got_max, x.amax(0), "max with NaN (propagates, as torch.amax)")
        assert got_mean.isnan().nonzero().flatten().tolist() == [5, 4095]
        torch.testing.assert_close(got_mean, x.mean(0), rtol=1e-5, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------------------------------------- order statistics
def _values(kind: str, M: int, gen) -> torch.Tensor:
    v = torch.randn(M, generator=gen)
    if kind == "ties":
        v = v.round(decimals=1)
    elif kind == "zeros":  # mostly exact zeros (parameters without gradient), some -0.0
        z = torch.rand(M, generator=gen)
        v = torch.where(z < 0.7, torch.zeros(()), v)
        v = torch.where(z < 0.1, torch.tensor(-0.0), v)
    elif kind == "wide":  # magnitudes over the whole float32 range, subnormals and infinities included
        e = torch.randint(-44, 38, (M,), generator=gen).float()
        v = (v * torch.pow(10.0, e)).clamp(-3e38, 3e38)
        special = torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 0.0, -0.0])
        n = min(M, special.numel())
        v[torch.randperm(M, generator=gen)[:n]] = special[:n]
    elif kind == "constant":
        v = torch.full((M,), -2.5)
    return v.to(DEV)


def _ranks(M: int, gen):
    ks = {0, M - 1, M // 2, (M - 1) * 99 // 100, M // 100}
    ks |= set(torch.randint(0, M, (3,), generator=gen).tolist())
    return sorted(ks)


@pytest.mark.parametrize("kind", ["randn", "ties", "zeros", "wide", "constant"])
@pytest.mark.parametrize("M", [1, 2, 7, 4097, 100_003])
def test_order_statistics(M, kind, gen):
    v = _values(kind, M, gen)
    for x in (v, misaligned(v)):
        for k in _ranks(M, gen):
            poison_cache()
            got = op("order_statistics")(x, k)
            want = _ops.order_statistics_torch(x.cpu(), k).to(DEV)
            assert_equal(got, want, f"order_statistics M={M} {kind} k={k}")


def test_order_statistics_over_2_pow_24_values(cgen):
    """torch.quantile refuses more than 2^24 values; the radix select is exact at any size."""
    M = (1 << 24) + 1001
    v = torch.randn(M, device=DEV, generator=cgen).round(decimals=3)  # heavy ties
    v[::7] = 0.0
    srt = torch.sort(v).values
    for k in (0, 1, M // 100, M // 2, M - M // 100 - 1, M - 2, M - 1):
        got = op("order_statistics")(v, k).tolist()
        want = [srt[k].item(), srt[min(k + 1, M - 1)].item()]
        assert got == want, f"k={k}: got {got}, want {want}"


def test_order_statistics_over_2_pow_31_values():
    """64-bit indexing: 2^31 + 12345 values (8.6 GB), a pattern whose order statistics are known."""
    M = (1 << 31) + 12345
    if torch.cuda.get_device_properties(DEV).total_memory < 3 * M * 4:
        pytest.skip("needs a GPU with at least 26 GB")
    base = torch.arange(1000, dtype=torch.float32, device=DEV) - 500.0  # value j - 500, j = 0..999
    v = base.repeat(M // 1000 + 1)[:M]
    q, r = divmod(M, 1000)
    counts = [q + (1 if j < r else 0) for j in range(1000)]
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)

    def kth(k):  # the value of rank k: j with cum[j] <= k < cum[j+1]
        lo, hi = 0, 1000
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cum[mid] <= k else (lo, mid)
        return float(lo - 500)

    try:
        for k in (0, cum[1] - 1, cum[1], M // 2, (1 << 31) + 7, M - 2, M - 1):
            got = op("order_statistics")(v, k).tolist()
            assert got == [kth(k), kth(min(k + 1, M - 1))], f"k={k}: {got}"
    finally:
        del v
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- threshold mask
@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.25])
@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("L,D", [(1, 1), (7, 4097), (3, 4096), (2, 300_001), (1000, 7)])
def test_threshold_mask(L, D, positive_only, threshold, gen):
    v = torch.randn(L, D, generator=gen).round(decimals=2).to(DEV)  # ties with the threshold
    for x in (v, misaligned(v)):
        poison_cache()
        mask, counts = op("threshold_mask")(x, threshold, positive_only)
        assert int(mask.view(torch.uint8).max()) <= 1, "mask bytes other than 0 and 1 (unwritten?)"
        want_mask, want_counts = _ops.threshold_mask_torch(x, threshold, positive_only)
        assert_equal(mask, want_mask, f"mask [{L},{D}] thr={threshold} pos={positive_only}")
        assert_equal(counts, want_counts, f"counts [{L},{D}]")


# ---------------------------------------------------------------------------------------------- AdamW
HYPER = [dict(step=1, weight_decay=0.0, beta1=0.9, beta2=0.999),  # lerp weight 0.1: self + w * (end - self)
         dict(step=5, weight_decay=0.01, beta1=0.9, beta2=0.999),
         dict(step=3, weight_decay=0.1, beta1=0.3, beta2=0.99),    # lerp weight 0.7: end - (end - self) * (1 - w)
         dict(step=2, weight_decay=0.0, beta1=0.0, beta2=0.0)]     # addcmul with value 1: fma(g, g, v)


def _adamw_case(shape, K, dim, wdtype, gen):
    weight = rand(shape, wdtype, gen)
    index = torch.randperm(shape[dim], generator=gen)[:K].to(DEV)
    compact = (K, shape[1]) if dim == 0 else (shape[0], K)
    grad = rand(compact, torch.float32, gen)
    delta = rand(compact, torch.float32, gen, 0.01)
    exp_avg = rand(compact, torch.float32, gen, 0.1)
    exp_avg_sq = rand(compact, torch.float32, gen, 0.01).abs()
    base = weight.index_select(dim, index).clone()
    return weight, index, grad, delta, exp_avg, exp_avg_sq, base


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "step{step}-wd{weight_decay}-b{beta1}-{beta2}".format(**h))
@pytest.mark.parametrize("shape,K", [((7, 4097), 3), ((4097, 7), 5), ((33, 130), 1), ((1, 1), 1)])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("wdtype", FLOATS, ids=str)
def test_ensemble_adamw_step_matches_torch_bit_for_bit(wdtype, dim, shape, K, hyper, gen):
    args = _adamw_case(shape, K, dim, wdtype, gen)
    weight0 = args[0].clone()
    mine = [a.clone() for a in args]
    theirs = [a.clone() for a in args]
    scalars = (hyper["step"], 1e-2, 0.7, dim, hyper["beta1"], hyper["beta2"], 1e-8, hyper["weight_decay"])
    op("ensemble_adamw_step_")(*mine, *scalars)
    _ops.ensemble_adamw_step_torch(*theirs, *scalars)
    for i, name in ((3, "delta"), (4, "exp_avg"), (5, "exp_avg_sq"), (0, "weight")):
        assert_equal(mine[i], theirs[i], f"{name} {wdtype} dim={dim} {shape} {hyper}", bitwise=True)
    # Nothing outside the ensemble rows/columns changed.
    keep = torch.ones(shape[dim], dtype=torch.bool, device=DEV)
    keep[args[1]] = False
    assert_equal(mine[0].index_select(dim, keep.nonzero().flatten()),
                 weight0.index_select(dim, keep.nonzero().flatten()), "weight outside the ensemble", bitwise=True)


def test_ensemble_adamw_step_matches_torch_optim_adamw(gen):
    """Three steps against torch.optim.AdamW (single-tensor implementation) on the delta itself."""
    weight, index, _, delta, exp_avg, exp_avg_sq, base = _adamw_case((64, 96), 9, 0, torch.bfloat16, gen)
    exp_avg.zero_()
    exp_avg_sq.zero_()
    p = torch.nn.Parameter(delta.clone())
    opt = torch.optim.AdamW([p], lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, foreach=False,
                            fused=False)
    for step in (1, 2, 3):
        g = rand(tuple(delta.shape), torch.float32, gen)
        p.grad = g.clone()
        opt.step()
        op("ensemble_adamw_step_")(weight, index, g, delta, exp_avg, exp_avg_sq, base, step, 3e-3, 1.0, 0, 0.9,
                                   0.999, 1e-8, 0.05)
        torch.testing.assert_close(delta, p.detach(), rtol=1e-6, atol=1e-9)
    want = (base.float() + delta).to(torch.bfloat16)
    assert_equal(weight[index], want, "weight rows", bitwise=True)


# ---------------------------------------------------------------------------------------------- opcheck, API
def _opcheck_args(name, gen):
    return {
        "neuron_attribution_": lambda: (torch.zeros(2, 9, device=DEV), rand((7, 9), torch.bfloat16, gen),
                                        rand((7, 9), torch.bfloat16, gen), torch.randint(0, 2, (7,), generator=gen).to(DEV),
                                        torch.rand(7, generator=gen).to(DEV), 0.5),
        "weight_attribution_": lambda: (torch.zeros(5, device=DEV), rand((5, 3), torch.float16, gen),
                                        rand((5, 3), torch.float16, gen), 1, True),
        "ensemble_aggregate": lambda: (rand((3, 11), torch.float32, gen), 1),
        "order_statistics": lambda: (rand((40,), torch.float32, gen), 7),
        "threshold_mask": lambda: (rand((4, 6), torch.float32, gen), 0.2, True),
        "ensemble_adamw_step_": lambda: (rand((9, 4), torch.float16, gen), torch.tensor([1, 5], device=DEV),
                                         rand((2, 4), torch.float32, gen), torch.zeros(2, 4, device=DEV),
                                         torch.zeros(2, 4, device=DEV), torch.zeros(2, 4, device=DEV),
                                         rand((2, 4), torch.float16, gen), 1, 1e-3, 0.5, 0, 0.9, 0.999, 1e-8, 0.0),
        "nullspace_project_": lambda: (rand((9, 6), torch.bfloat16, gen), torch.tensor([2, 7], device=DEV),
                                       rand((2, 6), torch.float32, gen),
                                       torch.linalg.qr(torch.randn(6, 2, generator=gen)).Q.contiguous().to(DEV),
                                       rand((2, 6), torch.bfloat16, gen), 0.5),
    }[name]()


@pytest.mark.parametrize("name", list(_ops.SCHEMAS))
def test_opcheck_cuda_kernels(name, gen):
    torch.library.opcheck(_ops.op(name), _opcheck_args(name, gen))


@pytest.mark.parametrize("name", list(_ops.SCHEMAS))
def test_first_use_selfcheck_passes(name):
    """kne_kernels._backends runs this case before the first use of the cuda backend and falls back
    to another backend when it fails: a failure here means the CUDA kernel would never run."""
    ok, detail = _selfcheck.CASES[name](_ops.op(name), _ops.TORCH_KERNELS[name], DEV)
    assert ok, f"{name}: {detail}"


def test_public_api_with_the_cuda_backend(gen):
    """The public functions with backend='cuda' against backend='torch' (no fallback warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed first-use check must not pass silently
        act, grad = rand((2, 5, 33), torch.bfloat16, gen), rand((2, 5, 33), torch.bfloat16, gen)
        seg = torch.tensor([0] * 4 + [1] * 6, device=DEV)
        a = kne_kernels.neuron_attribution(act, grad, segments=seg, scale=0.5, backend="cuda")
        b = kne_kernels.neuron_attribution(act, grad, segments=seg, scale=0.5, backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        w, g = rand((9, 17), torch.float16, gen), rand((9, 17), torch.float16, gen)
        torch.testing.assert_close(kne_kernels.weight_attribution(w, g, dim=0, absolute=True, backend="cuda"),
                                   kne_kernels.weight_attribution(w, g, dim=0, absolute=True, backend="torch"),
                                   rtol=1e-5, atol=1e-5)
        scores = rand((3, 4, 257), torch.float32, gen)
        sel = kne_kernels.ensemble_select(scores, percentile=90.0, aggregate="max", backend="cuda")
        ref = kne_kernels.ensemble_select(scores.cpu(), percentile=90.0, aggregate="max", backend="torch")
        assert sel.threshold == ref.threshold
        assert torch.equal(sel.mask.cpu(), ref.mask) and torch.equal(sel.counts.cpu(), ref.counts)
        assert all(torch.equal(x.cpu(), y) for x, y in zip(sel.indices, ref.indices))


def test_errors_name_the_argument():
    x = torch.zeros(4, 6, device=DEV)
    with pytest.raises(RuntimeError, match="values must be float32"):
        op("threshold_mask")(x.double(), 0.0, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op("ensemble_aggregate")(x.t(), 0)
    with pytest.raises(RuntimeError, match="k must lie in"):
        op("order_statistics")(x.flatten(), 24)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        op("neuron_attribution_")(torch.zeros(1, 6, device=DEV), x, x.cpu(), None, None, 1.0)
    assert math.isfinite(float(op("order_statistics")(x.flatten(), 0)[0]))
