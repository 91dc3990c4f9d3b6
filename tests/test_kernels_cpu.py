"""The CPU C++ kernels (``kne_kernels._C``, csrc/cpu/) against the pure-torch kernels of
``kne_kernels._ops`` and float64 references, through ``torch.ops.kne.<op>`` on CPU tensors.

The extension must be live: CI builds it, so a missing or broken build fails here with its reason
(nothing is skipped). Tolerances (one table, per dtype): the attribution ops multiply fp16/bf16
inputs exactly in float32 and accumulate in float32, so the baseline for every dtype is the torch
kernel (float32 from the low-precision inputs); flash-attention's rule then asks the kernel's max
error against float64 to be at most twice the baseline's, plus a small absolute floor.
"""

from __future__ import annotations

import contextlib
import math
import platform

import pytest
import torch

import kne_kernels  # noqa: F401  (defines the schemas, loads the library)
from kne_kernels import _extension, _ops

K = torch.ops.kne
T = _ops.TORCH_KERNELS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps
# Tolerance table: (factor on the baseline's error, absolute floor in units of eps32 * magnitude).
TOL = {torch.float32: (2.0, 4.0), torch.float16: (2.0, 4.0), torch.bfloat16: (2.0, 4.0)}
# ATen's float32 vector loops (and the kernels' fused AdamW) agree bit for bit on x86-64 with AVX2.
X86_AVX2 = platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture(autouse=True)
def _cpu_kernels_live():
    live, why = _extension.status("cpu")
    assert live, f"the CPU C++ kernels are not live (CI must build them): {why}"


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def poison_heap(nbytes: int) -> None:
    """Leave freed NaN-filled memory of the output's size behind, so that an output the C++ kernel
    allocates (at::empty) and fails to write likely holds NaN (best effort: the allocator decides)."""
    t = torch.full((max(1, nbytes // 4),), float("nan"))
    del t


def randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def assert_flash_rule(got: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype, what: str):
    """max |got - ref| <= factor * max |base - ref| + floor * eps32 * max(mag), naming the worst index."""
    factor, floor = TOL[dtype]
    err = (got.double() - ref).abs()
    base_err = (base.double() - ref).abs().max().item()
    bound = factor * base_err + floor * EPS32 * mag.max().item()
    worst = int(err.argmax())
    assert err.max().item() <= bound, (
        f"{what}: max error {err.max().item():.3e} at flat index {worst} (got {got.reshape(-1)[worst].item()!r}, "
        f"float64 {ref.reshape(-1)[worst].item()!r}) exceeds {bound:.3e} (torch kernel's error {base_err:.3e})")


def test_extension_is_live_and_registered_for_every_op():
    live, why = _extension.status("cpu")
    assert live, why
    for name in _ops.SCHEMAS:
        assert "CPU" in _extension.registered_keys(name), f"kne::{name} has no CPU kernel"


# ---------------------------------------------------------------------------------------------- neuron_attribution_
SHAPES_ND = [(1, 1), (7, 1), (1, 7), (7, 4097), (4097, 7), (33, 1031), (1000, 257), (2053, 129)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_ND, ids=str)
@pytest.mark.parametrize("variant", ["plain", "segments", "scale", "all"])
def test_neuron_attribution(dtype, shape, variant, gen):
    N, D = shape
    act, grad = randn((N, D), dtype, gen), randn((N, D), dtype, gen)
    S = 5 if variant in ("segments", "all") else 1
    seg = torch.randint(0, S, (N,), generator=gen) if S > 1 else None
    scale = torch.rand(N, generator=gen) if variant in ("scale", "all") else None
    sv = 0.37 if variant == "all" else 1.0
    out0 = torch.randn(S, D, generator=gen)  # accumulate into a random non-zero out
    got, base = out0.clone(), out0.clone()
    K.neuron_attribution_(got, act, grad, seg, scale, sv)
    T["neuron_attribution_"](base, act, grad, seg, scale, sv)
    prod = act.double() * grad.double() * sv
    if scale is not None:
        prod = prod * scale.double()[:, None]
    ref, mag = out0.double().clone(), out0.double().abs()
    if seg is None:
        ref[0] += prod.sum(0)
        mag = mag + prod.abs().sum(0)
    else:
        ref.index_add_(0, seg, prod)
        mag = mag.index_add(0, seg, prod.abs())
    assert_flash_rule(got, base, ref, mag, dtype, f"neuron_attribution_ {dtype} {shape} {variant}")


def test_neuron_attribution_same_bits_with_one_and_two_threads(gen):
    act, grad = randn((3000, 1500), torch.bfloat16, gen), randn((3000, 1500), torch.bfloat16, gen)
    seg = torch.randint(0, 3, (3000,), generator=gen)
    outs = []
    for n in (1, 2):
        with threads(n):
            out = torch.zeros(3, 1500)
            K.neuron_attribution_(out, act, grad, seg, None, 1.0)
            outs.append(out)
    assert torch.equal(outs[0], outs[1]), "the result depends on the thread count"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neuron_attribution_two_threads(dtype, gen):
    act, grad = randn((4099, 1031), dtype, gen), randn((4099, 1031), dtype, gen)
    scale = torch.rand(4099, generator=gen)
    out0 = torch.randn(1, 1031, generator=gen)
    got, base = out0.clone(), out0.clone()
    with threads(2):
        K.neuron_attribution_(got, act, grad, None, scale, 1.0)
    T["neuron_attribution_"](base, act, grad, None, scale, 1.0)
    prod = act.double() * grad.double() * scale.double()[:, None]
    assert_flash_rule(got, base, out0.double() + prod.sum(0), out0.double().abs() + prod.abs().sum(0), dtype,
                      f"neuron_attribution_ 2 threads {dtype}")


# ---------------------------------------------------------------------------------------------- weight_attribution_
SHAPES_RC = [(1, 1), (7, 1), (1, 7), (7, 4097), (4097, 7), (257, 1031), (2, 70001)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_RC, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("absolute", [False, True])
def test_weight_attribution(dtype, shape, dim, absolute, gen):
    w, g = randn(shape, dtype, gen), randn(shape, dtype, gen)
    out0 = torch.randn(shape[1 - dim], generator=gen)
    got, base = out0.clone(), out0.clone()
    K.weight_attribution_(got, w, g, dim, absolute)
    T["weight_attribution_"](base, w, g, dim, absolute)
    prod = w.double() * g.double()
    if absolute:
        prod = prod.abs()
    assert_flash_rule(got, base, out0.double() + prod.sum(dim), out0.double().abs() + prod.abs().sum(dim), dtype,
                      f"weight_attribution_ {dtype} {shape} dim={dim} absolute={absolute}")


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_attribution_two_threads(dim, gen):
    w, g = randn((3001, 517), torch.float16, gen), randn((3001, 517), torch.float16, gen)
    out0 = torch.randn(w.shape[1 - dim], generator=gen)
    got, base = out0.clone(), out0.clone()
    with threads(2):
        K.weight_attribution_(got, w, g, dim, True)
    T["weight_attribution_"](base, w, g, dim, True)
    prod = (w.double() * g.double()).abs()
    assert_flash_rule(got, base, out0.double() + prod.sum(dim), out0.double().abs() + prod.sum(dim), torch.float16,
                      f"weight_attribution_ 2 threads dim={dim}")


# ---------------------------------------------------------------------------------------------- ensemble_aggregate
@pytest.mark.parametrize("R", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("M", [1, 7, 31, 100, 4097, 40000])
def test_ensemble_aggregate_equals_torch_bit_for_bit(R, M, gen):
    scores = torch.randn(R, M, generator=gen) * torch.randn(R, M, generator=gen).mul(3).exp()
    poison_heap(4 * M)
    mean = K.ensemble_aggregate(scores, 1)
    assert mean.dtype == torch.float32 and mean.shape == (M,)
    want = T["ensemble_aggregate"](scores, 1)
    diff = (mean.view(torch.int32) != want.view(torch.int32)).nonzero()
    assert diff.numel() == 0, f"mean [{R}, {M}] differs from torch.mean at columns {diff[:5].flatten().tolist()}"
    # and it is the mean (float64 reference, loose)
    torch.testing.assert_close(mean.double(), scores.double().mean(0), rtol=1e-5, atol=1e-6 * scores.abs().max().item())
    poison_heap(4 * M)
    mx = K.ensemble_aggregate(scores, 0)
    assert torch.equal(mx, T["ensemble_aggregate"](scores, 0))


def test_ensemble_aggregate_edge_values(gen):
    s = torch.randn(4, 50, generator=gen)
    s[2, 7] = float("nan")
    s[:, 9] = -0.0
    s[1, 11] = float("inf")
    mx = K.ensemble_aggregate(s, 0)
    assert math.isnan(mx[7]) and mx[11] == float("inf")
    torch.testing.assert_close(mx, s.amax(0), rtol=0, atol=0, equal_nan=True)
    mean = K.ensemble_aggregate(s, 1)
    assert mean.view(torch.int32).equal(s.mean(0).view(torch.int32)), "NaN, inf and -0.0 columns"


def test_ensemble_aggregate_two_threads_same_bits_as_torch(gen):
    scores = torch.randn(7, 100003, generator=gen)
    want = {m: T["ensemble_aggregate"](scores, m) for m in (0, 1)}  # torch with one thread
    with threads(2):
        got = {m: K.ensemble_aggregate(scores, m) for m in (0, 1)}
    assert torch.equal(got[0], want[0])
    assert got[1].view(torch.int32).equal(want[1].view(torch.int32))


# ---------------------------------------------------------------------------------------------- order_statistics
def _check_order(values: torch.Tensor, k: int, what: str):
    got = K.order_statistics(values, k)
    want = T["order_statistics"](values, k)
    assert got.dtype == torch.float32 and got.shape == (2,)
    ok = torch.equal(got, want) or (torch.isnan(got) == torch.isnan(want)).all() and torch.equal(
        got[~torch.isnan(got)], want[~torch.isnan(want)])
    assert ok, f"order_statistics {what} M={values.numel()} k={k}: got {got.tolist()}, torch.kthvalue {want.tolist()}"
    # a zero order statistic is returned as +0.0 (torch treats -0.0 and +0.0 as equal)
    assert not any(v == 0 and math.copysign(1.0, v) < 0 for v in got.tolist()), f"{what}: -0.0 returned"


def _distributions(M: int, gen: torch.Generator):
    return {
        "randn": torch.randn(M, generator=gen),
        "wide": torch.randn(M, generator=gen) * torch.randn(M, generator=gen).mul(10).exp(),
        "ties": torch.randint(-3, 4, (M,), generator=gen).float(),
        "all equal": torch.full((M,), 0.75),
        "signed zeros": torch.where(torch.rand(M, generator=gen) < 0.5, torch.zeros(M), -torch.zeros(M)),
        "zeros and positives": torch.cat([-torch.zeros(M // 2), torch.rand(M - M // 2, generator=gen)]),
        "one dense bucket": 1.0 + torch.rand(M, generator=gen) * 1e-3,
    }


@pytest.mark.parametrize("M", [1, 2, 7, 4097, 8193, 100003, 352256])
def test_order_statistics(M, gen):
    for what, v in _distributions(M, gen).items():
        for k in sorted({0, 1, M // 3, M // 2, (99 * M) // 100, M - 2, M - 1}):
            if 0 <= k < M:
                _check_order(v, k, what)


def test_order_statistics_infinities_and_nan(gen):
    v = torch.randn(20001, generator=gen)
    v[3], v[4], v[5] = float("inf"), float("-inf"), float("nan")
    for k in (0, 1, 2, 19998, 19999, 20000):
        _check_order(v, k, "inf/nan")


def test_order_statistics_beyond_2_pow_24(gen):
    """Exact past torch.quantile's 2^24 limit (one size, kept small enough for a unit test)."""
    M = (1 << 24) + 12345
    v = torch.randn(M, generator=gen).round(decimals=3)  # many ties across the whole range
    k = (99 * (M - 1)) // 100
    got = K.order_statistics(v, k).tolist()
    assert got == T["order_statistics"](v, k).tolist()
    for rank, value in ((k, got[0]), (k + 1, got[1])):  # independent check by counting
        assert int((v < value).sum()) <= rank < int((v <= value).sum()), (rank, value)
    last = K.order_statistics(v, M - 1).tolist()
    assert last == [v.max().item()] * 2


@pytest.mark.parametrize("what", ["randn", "ties", "signed zeros"])
def test_order_statistics_two_threads(what, gen):
    v = _distributions(1_200_007, gen)[what]
    with threads(2):
        for k in (0, 600_000, 1_188_000, 1_200_006):
            _check_order(v, k, what + " (2 threads)")


# ---------------------------------------------------------------------------------------------- threshold_mask
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (7, 4097), (64, 100), (2, 70001), (0, 5), (5, 0)], ids=str)
@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.3, 100.0])
@pytest.mark.parametrize("positive_only", [False, True])
def test_threshold_mask(shape, threshold, positive_only, gen):
    v = torch.randn(shape, generator=gen)
    poison_heap(v.numel() + 8 * shape[0])
    mask, counts = K.threshold_mask(v, threshold, positive_only)
    want_mask, want_counts = T["threshold_mask"](v, threshold, positive_only)
    assert mask.dtype == torch.bool and counts.dtype == torch.int64
    assert torch.equal(mask, want_mask) and torch.equal(counts, want_counts)
    if threshold == 100.0:  # empty result
        assert not mask.any() and int(counts.sum()) == 0


def test_threshold_mask_compares_in_float32():
    v = torch.full((1, 4), 0.1)
    mask, counts = K.threshold_mask(v, 0.1, False)  # 0.1 rounds to 0.1f: 0.1f > 0.1f is False
    assert torch.equal(mask, T["threshold_mask"](v, 0.1, False)[0]) and int(counts[0]) == 0


def test_threshold_mask_two_threads(gen):
    v = torch.randn(33, 50001, generator=gen)
    with threads(2):
        mask, counts = K.threshold_mask(v, 0.5, True)
    want_mask, want_counts = T["threshold_mask"](v, 0.5, True)
    assert torch.equal(mask, want_mask) and torch.equal(counts, want_counts)


# ---------------------------------------------------------------------------------------------- ensemble_adamw_step_
def _adamw_ieee_sqrt(weight, index, grad, delta, exp_avg, exp_avg_sq, base, step, lr, scale, dim, beta1, beta2, eps,
                     weight_decay):
    """The torch kernel with a correctly rounded square root (ATen's float32 sqrt goes through MKL
    VML, which is not; the C++ kernel's is), so that every other operation compares bit for bit."""
    if weight_decay:
        delta.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.double().sqrt().float() / math.sqrt(1 - beta2**step)).add_(eps)
    delta.addcdiv_(exp_avg, denom, value=-step_size)
    weight.index_copy_(dim, index, (base.float() + scale * delta).to(weight.dtype))


def _adamw_case(dtype, O, I, K_, dim, gen, weight_decay=0.01):
    limit = O if dim == 0 else I
    index = torch.randperm(limit, generator=gen)[:K_]
    shape = (K_, I) if dim == 0 else (O, K_)
    weight = torch.randn(O, I, generator=gen).to(dtype)
    base = weight.index_select(dim, index).contiguous()
    grad = torch.randn(shape, generator=gen)
    state = [torch.randn(shape, generator=gen) * 0.01, torch.randn(shape, generator=gen) * 0.1,
             torch.rand(shape, generator=gen) * 0.01]
    return weight, index, grad, state, base


ADAMW_SHAPES = [(41, 19, 3, 0), (41, 19, 5, 1), (64, 256, 16, 0), (256, 64, 16, 1), (7, 4097, 1, 0),
                (4097, 7, 1, 1), (300, 500, 37, 0), (500, 300, 37, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ADAMW_SHAPES, ids=str)
@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_ensemble_adamw_step(dtype, case, beta1, gen):
    O, I, K_, dim = case
    weight, index, grad, state, base = _adamw_case(dtype, O, I, K_, dim, gen)
    args = dict(step=3, lr=1e-2, scale=0.7, dim=dim, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.01)
    runs = {}
    for name, fn in (("kernel", K.ensemble_adamw_step_), ("torch", T["ensemble_adamw_step_"]),
                     ("ieee", _adamw_ieee_sqrt)):
        w, st = weight.clone(), [s.clone() for s in state]
        fn(w, index, grad, st[0], st[1], st[2], base, *args.values())
        runs[name] = [w] + st
    names = ["weight", "delta", "exp_avg", "exp_avg_sq"]
    got, plain, ieee = runs["kernel"], runs["torch"], runs["ieee"]
    # bit for bit where ATen's float32 vector loop covers every element (x86 AVX2, sizes % 16 == 0)
    exact = X86_AVX2 and grad.numel() % 16 == 0
    for i, n in enumerate(names):
        if exact:
            bad = (got[i].reshape(-1).view(torch.int16 if got[i].element_size() == 2 else torch.int32)
                   != ieee[i].reshape(-1).view(torch.int16 if got[i].element_size() == 2 else torch.int32)).nonzero()
            assert bad.numel() == 0, f"{n} differs from the torch arithmetic at flat indices {bad[:5].flatten().tolist()}"
        if n in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[i], plain[i], rtol=2 * EPS32, atol=0)
    # against the plain torch kernel (MKL's sqrt): within float rounding
    upd = (plain[1] - state[0] * (1 - 1e-2 * 0.01)).abs()
    tol_delta = 4 * EPS32 * (state[0].abs() + upd) + 1e-30
    err = (got[1] - plain[1]).abs()
    assert (err <= tol_delta).all(), f"delta off by {(err / tol_delta).max().item():.2f}x its tolerance"
    w_ulp = {torch.float32: EPS32, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    tol_w = w_ulp * plain[0].float().abs() + 4 * EPS32 * 0.7 * (state[0].abs() + upd).max() + 1e-30
    err_w = (got[0].float() - plain[0].float()).abs()
    assert (err_w <= tol_w).all(), f"weight off by {(err_w / tol_w).max().item():.2f}x its tolerance"
    # nothing outside the ensemble changed
    keep = torch.ones(weight.shape[dim], dtype=torch.bool)
    keep[index] = False
    outside = (lambda t: t[keep]) if dim == 0 else (lambda t: t[:, keep])
    assert torch.equal(outside(got[0]), outside(weight))


def test_ensemble_adamw_step_matches_torch_optim_adamw_over_steps(gen):
    """Three steps against torch.optim.AdamW on the compact delta (its single-tensor path)."""
    O, I, K_ = 64, 96, 8
    weight, index, _, _, base = _adamw_case(torch.bfloat16, O, I, K_, 0, gen)
    p = torch.nn.Parameter(torch.zeros(K_, I))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    d, m, v = torch.zeros(K_, I), torch.zeros(K_, I), torch.zeros(K_, I)
    w = weight.clone()
    for step in (1, 2, 3):
        g = torch.randn(K_, I, generator=gen)
        p.grad = g.clone()
        opt.step()
        K.ensemble_adamw_step_(w, index, g, d, m, v, base, step, 1e-2, 0.5, 0, 0.9, 0.999, 1e-8, 0.01)
        torch.testing.assert_close(d, p.detach(), rtol=1e-5, atol=1e-7)
        exact = 0 if X86_AVX2 else None  # bit for bit where ATen's vector loops are the kernel's
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=exact, atol=exact)
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=exact, atol=exact)
    want = weight.clone()
    want.index_copy_(0, index, (base.float() + 0.5 * p.detach()).to(torch.bfloat16))
    assert (w.float() - want.float()).abs().max() <= 2.0**-7 * want.float().abs().max()


@pytest.mark.skipif(not X86_AVX2, reason="the bit-exact claims are measured on x86-64 with AVX2 or AVX-512")
@pytest.mark.parametrize("K_, I", [(110, 576), (64, 1536)])
def test_ensemble_adamw_step_exactness_against_torch_optim(K_, I, gen):
    """What the docstring of kne_kernels.ensemble_adamw_step_ claims, over 30 steps from zero state:
    delta and moments equal torch.optim.AdamW(fused=True) bit for bit; the moments equal the default
    (single-tensor) step bit for bit, and delta stays within a few ulp of it (ATen's vectorised sqrt
    is not correctly rounded)."""
    weight = torch.randn(200, I, generator=gen)
    index = torch.randperm(200, generator=gen)[:K_]
    base = weight.index_select(0, index).clone()
    d, m, v = torch.zeros(K_, I), torch.zeros(K_, I), torch.zeros(K_, I)
    opts = {}
    for name, kw in (("fused", dict(fused=True)), ("default", dict(foreach=False))):
        p = torch.nn.Parameter(torch.zeros(K_, I))
        opts[name] = (p, torch.optim.AdamW([p], lr=5e-3, weight_decay=0.01, **kw))
    differ = 0
    for step in range(1, 31):
        g = torch.randn(K_, I, generator=gen)
        d_before = d.clone()
        K.ensemble_adamw_step_(weight, index, g, d, m, v, base, step, 5e-3, 1.0, 0, 0.9, 0.999, 1e-8, 0.01)
        for p, opt in opts.values():
            p.grad = g.clone()
            opt.step()
        fused, default = opts["fused"], opts["default"]
        for ours, theirs, what in ((d, fused[0].detach(), "delta"), (m, fused[1].state[fused[0]]["exp_avg"], "exp_avg"),
                                   (v, fused[1].state[fused[0]]["exp_avg_sq"], "exp_avg_sq"),
                                   (m, default[1].state[default[0]]["exp_avg"], "exp_avg (default)"),
                                   (v, default[1].state[default[0]]["exp_avg_sq"], "exp_avg_sq (default)")):
            assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), f"step {step}: {what} differs"
        p = default[0].detach()
        differ += int((d != p).sum())
        # within the rounding of this step: 4 ulp of max(|delta before|, |update|, |delta after|)
        mag = torch.maximum(torch.maximum(d_before.abs(), p.abs()), (p - d_before).abs())
        ulp = torch.nextafter(mag, torch.full_like(mag, math.inf)) - mag
        assert ((d - p).abs() <= 4 * ulp).all(), f"step {step}: delta off the default step by more than rounding"
        d.copy_(p)  # resynchronise to the default step, so each step is measured on its own
        m.copy_(default[1].state[default[0]]["exp_avg"])
        v.copy_(default[1].state[default[0]]["exp_avg_sq"])
        fused[0].data.copy_(p)
    assert differ > 0, "delta equals the default step everywhere: the docstring's difference is gone, update it"


@pytest.mark.parametrize("dim", [0, 1])
def test_ensemble_adamw_step_two_threads(dim, gen):
    weight, index, grad, state, base = _adamw_case(torch.bfloat16, 512, 384, 48, dim, gen)
    runs = []
    for n in (1, 2):
        w, st = weight.clone(), [s.clone() for s in state]
        with threads(n):
            K.ensemble_adamw_step_(w, index, grad, st[0], st[1], st[2], base, 2, 1e-3, 1.0, dim, 0.9, 0.999, 1e-8, 0.0)
        runs.append([w] + st)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- bad inputs
def _bad_cases():
    f = torch.randn
    a, g = f(6, 4), f(6, 4)
    w, idx = f(10, 4), torch.tensor([1, 5])
    c = torch.zeros(2, 4)

    def adamw(**kw):
        args = dict(weight=w.clone(), index=idx, grad=f(2, 4), delta=c.clone(), exp_avg=c.clone(),
                    exp_avg_sq=c.clone(), base=f(2, 4), step=1, lr=1e-3, scale=1.0, dim=0, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.0)
        args.update(kw)
        return lambda: K.ensemble_adamw_step_(*args.values())

    return [
        ("act float64", lambda: K.neuron_attribution_(torch.zeros(1, 4), a.double(), g.double(), None, None, 1.0),
         "act has dtype"),
        ("act/grad dtypes", lambda: K.neuron_attribution_(torch.zeros(1, 4), a, g.half(), None, None, 1.0),
         "same dtype"),
        ("act strides", lambda: K.neuron_attribution_(torch.zeros(1, 6), a.t(), g.t(), None, None, 1.0),
         "act is not contiguous"),
        ("out shape", lambda: K.neuron_attribution_(torch.zeros(1, 5), a, g, None, None, 1.0), "out must have shape"),
        ("out dtype", lambda: K.neuron_attribution_(torch.zeros(1, 4).half(), a, g, None, None, 1.0), "out has dtype"),
        ("segments range", lambda: K.neuron_attribution_(torch.zeros(2, 4), a, g, torch.tensor([0, 1, 2, 0, 1, 0]),
                                                         None, 1.0), "segments[2] = 2 is out of range"),
        ("segments negative", lambda: K.neuron_attribution_(torch.zeros(2, 4), a, g,
                                                            torch.tensor([0, 1, 0, -1, 1, 0]), None, 1.0),
         "segments[3] = -1 is out of range"),
        ("segments dtype", lambda: K.neuron_attribution_(torch.zeros(2, 4), a, g, torch.zeros(6, dtype=torch.int32),
                                                         None, 1.0), "segments has dtype"),
        ("segments length", lambda: K.neuron_attribution_(torch.zeros(2, 4), a, g, torch.zeros(5, dtype=torch.long),
                                                          None, 1.0), "segments must have shape"),
        ("scale length", lambda: K.neuron_attribution_(torch.zeros(1, 4), a, g, None, torch.ones(5), 1.0),
         "scale must have shape"),
        ("scale dtype", lambda: K.neuron_attribution_(torch.zeros(1, 4), a, g, None, torch.ones(6).half(), 1.0),
         "scale has dtype"),
        ("weight_attribution out", lambda: K.weight_attribution_(torch.zeros(3), f(5, 3), f(5, 3), 1, False),
         "out must have shape [5]"),
        ("weight_attribution dim", lambda: K.weight_attribution_(torch.zeros(3), f(5, 3), f(5, 3), 2, False),
         "dim must be"),
        ("weight_attribution 1-D", lambda: K.weight_attribution_(torch.zeros(5), f(5), f(5), 1, False),
         "weight must be 2-D"),
        ("weight_attribution grad dtype", lambda: K.weight_attribution_(torch.zeros(5), f(5, 3), f(5, 3).bfloat16(),
                                                                       1, False), "same dtype"),
        ("aggregate mode", lambda: K.ensemble_aggregate(f(2, 3), 2), "mode must be"),
        ("aggregate dtype", lambda: K.ensemble_aggregate(f(2, 3).double(), 0), "scores has dtype"),
        ("aggregate strides", lambda: K.ensemble_aggregate(f(3, 2).t(), 0), "scores is not contiguous"),
        ("order k", lambda: K.order_statistics(f(5), 5), "k must lie in [0, 5)"),
        ("order empty", lambda: K.order_statistics(f(0), 0), "values is empty"),
        ("order 2-D", lambda: K.order_statistics(f(5, 2), 0), "values must be 1-D"),
        ("order dtype", lambda: K.order_statistics(f(5).half(), 0), "values has dtype"),
        ("mask 1-D", lambda: K.threshold_mask(f(5), 0.0, False), "values must be 2-D"),
        ("mask strides", lambda: K.threshold_mask(f(4, 3).t(), 0.0, False), "values is not contiguous"),
        ("adamw index range", adamw(index=torch.tensor([1, 10])), "index[1] = 10 is out of range"),
        ("adamw index duplicate", adamw(index=torch.tensor([5, 5])), "twice"),
        ("adamw index dtype", adamw(index=idx.int()), "index has dtype"),
        ("adamw grad shape", adamw(grad=f(3, 4)), "grad must have shape"),
        ("adamw delta dtype", adamw(delta=c.half()), "delta has dtype"),
        ("adamw delta strides", adamw(delta=torch.zeros(4, 2).t()), "delta is not contiguous"),
        ("adamw base dtype", adamw(base=f(2, 4).bfloat16()), "base has dtype"),
        ("adamw dim", adamw(dim=2), "dim must be"),
        ("adamw step", adamw(step=0), "step counts from 1"),
    ]


@pytest.mark.parametrize("what,call,needle", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_naming_the_argument(what, call, needle):
    with pytest.raises(RuntimeError) as info:
        call()
    assert needle in str(info.value), f"{what}: message lacks {needle!r}: {info.value}"


# ---------------------------------------------------------------------------------------------- opcheck
def _opcheck_args(name: str, gen: torch.Generator):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "neuron_attribution_": (r(3, 33), r(17, 33).bfloat16(), r(17, 33).bfloat16(),
                                torch.randint(0, 3, (17,), generator=gen), torch.rand(17, generator=gen), 0.5),
        "weight_attribution_": (r(9), r(9, 5).half(), r(9, 5).half(), 1, True),
        "ensemble_aggregate": (r(3, 41), 1),
        "order_statistics": (r(20000), 123),
        "threshold_mask": (r(4, 33), 0.2, True),
        "ensemble_adamw_step_": (r(9, 4).bfloat16(), torch.tensor([1, 5]), r(2, 4), torch.zeros(2, 4),
                                 torch.zeros(2, 4), torch.zeros(2, 4), r(2, 4).bfloat16(), 1, 1e-3, 0.5, 0, 0.9, 0.999,
                                 1e-8, 0.0),
        "nullspace_project_": (r(9, 6).half(), torch.tensor([2, 7]), r(2, 6), torch.linalg.qr(r(6, 2)).Q.contiguous(),
                               r(2, 6).half(), 0.5),
    }[name]


@pytest.mark.parametrize("name", list(_ops.SCHEMAS))
def test_opcheck_cpu_kernels(name, gen):
    assert "CPU" in _extension.registered_keys(name)
    torch.library.opcheck(_ops.op(name), _opcheck_args(name, gen))
