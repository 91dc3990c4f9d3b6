"""``ensemble_adamw_step_`` (``kne::ensemble_adamw_step_``) and ``adamw_update_`` on every backend:
the kernels against the torch kernel step by step, against ``torch.optim.AdamW`` over several steps,
the bit-exact claims of the docstring (torch: the default step; cpu: the moments, and delta as the
fused step; cuda: torch's CUDA arithmetic), the public function's rules (unique index, no aliasing),
opcheck, the first-use case and hypothesis fuzzing."""

from __future__ import annotations

import math
import platform

import pytest
import torch

import kne_kernels
from kne_kernels.ops.ensemble_adamw_step import OPS, ensemble_adamw_step_torch
from .kernel_testing import (FLOATS, SIZES, TOL, U, WIDE, assert_close, assert_equal, assert_kernel_refuses,
                             assert_within, fuzz_dtypes, fuzz_tests, kernel, maybe_strided, misaligned, opcheck,
                             over_backends, rand, refused_if_strided, require, threads, values)

OP = "ensemble_adamw_step_"
EPS32 = torch.finfo(torch.float32).eps
# ATen's float32 vector loops and the CPU kernel's fused AdamW agree bit for bit on x86-64 with AVX2.
X86_AVX2 = platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _state(out_f, in_f, K, dim, wdtype, gen, dev):
    """weight, index, grad, delta, exp_avg, exp_avg_sq, base (random state, a valid exp_avg_sq)."""
    weight = rand((out_f, in_f), wdtype, gen, dev)
    index = torch.randperm(out_f if dim == 0 else in_f, generator=gen)[:K].to(dev)
    shape = (K, in_f) if dim == 0 else (out_f, K)
    grad = rand(shape, torch.float32, gen, dev)
    delta = rand(shape, torch.float32, gen, dev, scale=0.01)
    exp_avg = rand(shape, torch.float32, gen, dev, scale=0.1)
    exp_avg_sq = rand(shape, torch.float32, gen, dev, scale=0.1).abs()
    base = weight.index_select(dim, index).contiguous()
    return [weight, index, grad, delta, exp_avg, exp_avg_sq, base]


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


# ---------------------------------------------------------------------------------------------- the kernels
# (dim, out, in, K): rows and columns, K = 1, primes, narrow and wide compact states.
CASES = [(0, 41, 19, 3), (0, 9, 300, 1), (0, 17, 1100, 17), (1, 41, 19, 3), (1, 300, 9, 1), (1, 33, 129, 40)]
CPU_CASES = [(1, 41, 19, 5), (0, 64, 256, 16), (1, 256, 64, 16), (0, 7, 4097, 1), (1, 4097, 7, 1),
             (0, 300, 500, 37), (1, 500, 300, 37)]
HYPER = [  # lr, scale, beta1, beta2, eps, weight_decay
    (1e-2, 0.7, 0.9, 0.999, 1e-8, 0.0),
    (1e-2, 0.7, 0.9, 0.999, 1e-8, 0.01),
    (1e-2, 0.7, 0.3, 0.999, 1e-8, 0.01),  # 1 - beta1 >= 0.5: the other branch of lerp
    (3e-3, 1.0, 0.9, 0.95, 1e-6, 0.01),
    (1e-1, 2.5, 0.3, 0.5, 1e-8, 0.1),
]


@pytest.mark.parametrize("hyper", range(len(HYPER)))
@pytest.mark.parametrize("wdtype", FLOATS, ids=str)
@pytest.mark.parametrize("backend,case", over_backends(CASES, torch=CPU_CASES, cpu=CPU_CASES))
def test_kernel(backend, case, wdtype, hyper, gen):
    """Four steps; each from the same state as the torch kernel's: the fp32 state and the weight
    within the tolerance table, the rows/columns outside the ensemble, the index and the base
    untouched. The cpu kernel, in addition: bit for bit the torch arithmetic with a correctly rounded
    sqrt where ATen's vector loops cover every element, the moments within 2 ulp of plain torch."""
    dev = require(backend)
    dim, out_f, in_f, K = case
    lr, scale, beta1, beta2, eps, wd = HYPER[hyper]
    ours = _state(out_f, in_f, K, dim, wdtype, gen, dev)
    before = [t.clone() for t in ours]
    for step in range(1, 5):
        ours[2].copy_(rand(tuple(ours[2].shape), torch.float32, gen, dev))
        pre = [t.clone() for t in ours]
        theirs = [t.clone() for t in ours]
        args = (step, lr, scale, dim, beta1, beta2, eps, wd)
        kernel(OP, backend)(*ours, *args)
        ensemble_adamw_step_torch(*theirs, *args)
        what = f"{backend} {case} {wdtype} hyper={hyper} step={step}"
        for name, i in (("delta", 3), ("exp_avg", 4), ("exp_avg_sq", 5)):
            assert_close(ours[i], theirs[i], *TOL[torch.float32]["state"], f"{what} {name}")
        rt, at = TOL[wdtype]["weight"]
        assert_close(ours[0], theirs[0], rt, at * max(1.0, scale), f"{what} weight")
        if backend == "cpu":
            ieee = [t.clone() for t in pre]
            _adamw_ieee_sqrt(*ieee, *args)
            if X86_AVX2 and ours[2].numel() % 16 == 0:
                for name, i in (("weight", 0), ("delta", 3), ("exp_avg", 4), ("exp_avg_sq", 5)):
                    assert_equal(ours[i], ieee[i], f"{what} {name} against the torch arithmetic", bitwise=True)
            for i in (4, 5):
                torch.testing.assert_close(ours[i], theirs[i], rtol=2 * EPS32, atol=0)
            # against plain torch (MKL's sqrt): within float rounding of the step
            upd = (theirs[3] - pre[3] * (1 - lr * wd)).abs()
            mag = pre[3].abs() + upd
            err = (ours[3] - theirs[3]).abs()
            bound = 4 * EPS32 * mag + 1e-30
            assert (err <= bound).all(), f"{what}: delta off by {(err / bound).max():.2f}x its tolerance"
            tol_w = TOL[wdtype]["eps"] * theirs[0].float().abs() + 4 * EPS32 * scale * mag.max() + 1e-30
            err_w = (ours[0].float() - theirs[0].float()).abs()
            assert (err_w <= tol_w).all(), f"{what}: weight off by {(err_w / tol_w).max().item():.2f}x its tolerance"
    keep = torch.ones(before[0].shape[dim], dtype=torch.bool, device=dev)
    keep[before[1]] = False
    rest = keep.nonzero()[:, 0]
    assert_equal(ours[0].index_select(dim, rest), before[0].index_select(dim, rest), "outside the ensemble",
                 bitwise=True)
    assert_equal(ours[1], before[1], "index untouched")
    assert_equal(ours[6], before[6], "base untouched", bitwise=True)


@pytest.mark.parametrize("dim", [0, 1])
def test_misaligned_inputs(backend, dev, dim, gen):
    """Every tensor starting one element past a 16-byte boundary."""
    state = [misaligned(t) for t in _state(13, 29, 5, dim, torch.float16, gen, dev)]
    ours, theirs = [t.clone() for t in state], [t.clone() for t in state]
    kernel(OP, backend)(*ours, 2, 1e-2, 0.5, dim, 0.9, 0.999, 1e-8, 0.01)
    ensemble_adamw_step_torch(*theirs, 2, 1e-2, 0.5, dim, 0.9, 0.999, 1e-8, 0.01)
    assert_close(ours[3], theirs[3], *TOL[torch.float32]["state"], f"misaligned dim={dim} delta")
    assert_close(ours[0], theirs[0], *TOL[torch.float16]["weight"], f"misaligned dim={dim} weight")


def test_bf16_rounding(backend, dev, gen):
    """The weight's cast rounds to nearest even: bit for bit the torch kernel's when the fp32 state
    is (lr = 0: delta only decays by 1.0)."""
    ours = _state(8, 300, 4, 0, torch.bfloat16, gen, dev)
    theirs = [t.clone() for t in ours]
    kernel(OP, backend)(*ours, 1, 0.0, 0.337, 0, 0.9, 0.999, 1e-8, 0.0)
    ensemble_adamw_step_torch(*theirs, 1, 0.0, 0.337, 0, 0.9, 0.999, 1e-8, 0.0)
    assert_equal(ours[3], theirs[3], "delta", bitwise=True)
    assert_equal(ours[0], theirs[0], "bf16 weight", bitwise=True)


def test_matches_torch_optim_adamw_over_steps(backend, dev, gen):
    """Three steps from zero state against torch.optim.AdamW (single-tensor) on the compact delta,
    on the backend's device (the moments bit for bit where the docstring says so); the written rows
    are base + delta rounded to bf16, bit for bit."""
    weight = rand((64, 96), torch.bfloat16, gen, dev)
    index = torch.randperm(64, generator=gen)[:9].to(dev)
    base = weight[index].clone()
    p = torch.nn.Parameter(torch.zeros(9, 96, device=dev))
    opt = torch.optim.AdamW([p], lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, foreach=False,
                            fused=False)
    d, m, v = (torch.zeros(9, 96, device=dev) for _ in range(3))
    for step in (1, 2, 3):
        g = rand((9, 96), torch.float32, gen, dev)
        p.grad = g.clone()
        opt.step()
        kne_kernels.ensemble_adamw_step_(weight, index, g, d, m, v, base, step=step, lr=3e-3, scale=1.0,
                                         weight_decay=0.05, backend=backend)
        tight = backend != "cpu"  # the cpu kernel's sqrt is correctly rounded, ATen's vectorised one is not
        torch.testing.assert_close(d, p.detach(), rtol=1e-6 if tight else 1e-5, atol=1e-9 if tight else 1e-7)
        exact = 0 if backend == "torch" or (backend == "cpu" and X86_AVX2) else None  # the moments, bit for bit
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=exact, atol=exact)
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=exact, atol=exact)
    want = (base.float() + d).to(torch.bfloat16)
    assert_equal(weight[index], want, "weight rows", bitwise=True)


@pytest.mark.cpu_backend
@pytest.mark.skipif(not X86_AVX2, reason="the bit-exact claims are measured on x86-64 with AVX2 or AVX-512")
@pytest.mark.parametrize("K, I", [(110, 576), (64, 1536)])
def test_cpu_exactness_against_torch_optim(K, I, gen):
    """What the docstring of kne_kernels.ensemble_adamw_step_ claims, over 30 steps from zero state:
    delta and moments equal torch.optim.AdamW(fused=True) bit for bit; the moments equal the default
    (single-tensor) step bit for bit, and delta stays within a few ulp of it (ATen's vectorised sqrt
    is not correctly rounded)."""
    require("cpu")
    weight = torch.randn(200, I, generator=gen)
    index = torch.randperm(200, generator=gen)[:K]
    base = weight.index_select(0, index).clone()
    d, m, v = torch.zeros(K, I), torch.zeros(K, I), torch.zeros(K, I)
    opts = {}
    for name, kw in (("fused", dict(fused=True)), ("default", dict(foreach=False))):
        p = torch.nn.Parameter(torch.zeros(K, I))
        opts[name] = (p, torch.optim.AdamW([p], lr=5e-3, weight_decay=0.01, **kw))
    differ = 0
    for step in range(1, 31):
        g = torch.randn(K, I, generator=gen)
        d_before = d.clone()
        kernel(OP, "cpu")(weight, index, g, d, m, v, base, step, 5e-3, 1.0, 0, 0.9, 0.999, 1e-8, 0.01)
        for p, opt in opts.values():
            p.grad = g.clone()
            opt.step()
        fused, default = opts["fused"], opts["default"]
        for ours, theirs, what in ((d, fused[0].detach(), "delta"), (m, fused[1].state[fused[0]]["exp_avg"], "exp_avg"),
                                   (v, fused[1].state[fused[0]]["exp_avg_sq"], "exp_avg_sq"),
                                   (m, default[1].state[default[0]]["exp_avg"], "exp_avg (default)"),
                                   (v, default[1].state[default[0]]["exp_avg_sq"], "exp_avg_sq (default)")):
            assert_equal(ours, theirs, f"step {step}: {what}", bitwise=True)
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


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dim", [0, 1])
def test_cpu_two_threads(dim, gen):
    require("cpu")
    state = _state(512, 384, 48, dim, torch.bfloat16, gen, "cpu")
    runs = []
    for n in (1, 2):
        s = [t.clone() for t in state]
        with threads(n):
            kernel(OP, "cpu")(*s, 2, 1e-3, 1.0, dim, 0.9, 0.999, 1e-8, 0.0)
        runs.append(s)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


HYPER_CUDA = [dict(step=1, weight_decay=0.0, beta1=0.9, beta2=0.999),  # lerp weight 0.1: self + w * (end - self)
              dict(step=5, weight_decay=0.01, beta1=0.9, beta2=0.999),
              dict(step=3, weight_decay=0.1, beta1=0.3, beta2=0.99),  # lerp weight 0.7: end - (end - self) * (1 - w)
              dict(step=2, weight_decay=0.0, beta1=0.0, beta2=0.0)]  # addcmul with value 1: fma(g, g, v)


@pytest.mark.cuda_backend
@pytest.mark.parametrize("hyper", HYPER_CUDA, ids=lambda h: "step{step}-wd{weight_decay}-b{beta1}-{beta2}".format(**h))
@pytest.mark.parametrize("shape,K", [((7, 4097), 3), ((4097, 7), 5), ((33, 130), 1), ((1, 1), 1)])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("wdtype", FLOATS, ids=str)
def test_cuda_matches_torch_on_cuda_bit_for_bit(wdtype, dim, shape, K, hyper, gen):
    """The CUDA kernel is torch's CUDA arithmetic of the single-tensor step, rounding for rounding."""
    dev = require("cuda")
    state = _state(*shape, K, dim, wdtype, gen, dev)
    weight0 = state[0].clone()
    mine, theirs = [a.clone() for a in state], [a.clone() for a in state]
    scalars = (hyper["step"], 1e-2, 0.7, dim, hyper["beta1"], hyper["beta2"], 1e-8, hyper["weight_decay"])
    kernel(OP, "cuda")(*mine, *scalars)
    ensemble_adamw_step_torch(*theirs, *scalars)
    for i, name in ((3, "delta"), (4, "exp_avg"), (5, "exp_avg_sq"), (0, "weight")):
        assert_equal(mine[i], theirs[i], f"{name} {wdtype} dim={dim} {shape} {hyper}", bitwise=True)
    keep = torch.ones(shape[dim], dtype=torch.bool, device=dev)
    keep[state[1]] = False
    rest = keep.nonzero().flatten()
    assert_equal(mine[0].index_select(dim, rest), weight0.index_select(dim, rest), "outside the ensemble", bitwise=True)


# ---------------------------------------------------------------------------------------------- the public function
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
def test_equals_torch_adamw(backend, dev, dim, dtype, weight_decay, gen):
    """Four steps through the public function against torch.optim.AdamW (CPU, default step): bit for
    bit with the torch backend, within the tolerance table with the others; a zero-gradient row."""
    out_f, in_f, K = 37, 29, 5
    weight = rand((out_f, in_f), dtype, gen, "cpu")
    n = out_f if dim == 0 else in_f
    index = torch.randperm(n, generator=gen)[:K].sort().values
    shape = (K, in_f) if dim == 0 else (out_f, K)
    base = weight.index_select(dim, index).clone()
    delta0 = torch.randn(shape, generator=gen) * 0.01
    scale, lr = 0.7, 3e-2
    w, delta = weight.clone().to(dev), delta0.clone().to(dev)
    m1, m2 = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    p = torch.nn.Parameter(delta0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay)
    w_ref = weight.clone()
    for step in range(1, 5):
        g = torch.randn(shape, generator=gen)
        if step == 3:
            g[0] = 0.0  # a zero-gradient row: moments decay, the step still moves it
        kne_kernels.ensemble_adamw_step_(w, index.to(dev), g.to(dev), delta, m1, m2, base.to(dev), step=step, lr=lr,
                                         scale=scale, dim=dim, weight_decay=weight_decay, backend=backend)
        p.grad = g.clone()
        opt.step()
        w_ref.index_copy_(dim, index, (base.float() + scale * p.detach()).to(dtype))
        st = opt.state[p]
        if backend == "torch":
            assert torch.equal(delta, p.detach()), f"step {step}: delta differs from torch.optim.AdamW"
            assert torch.equal(m1, st["exp_avg"]) and torch.equal(m2, st["exp_avg_sq"])
            assert torch.equal(w, w_ref), f"step {step}: weight differs"
        else:
            for got, want, name in ((delta, p.detach(), "delta"), (m1, st["exp_avg"], "exp_avg"),
                                    (m2, st["exp_avg_sq"], "exp_avg_sq")):
                assert_close(got.cpu(), want, *TOL[torch.float32]["state"], f"step {step} {name}")
            assert_close(w.cpu(), w_ref, TOL[dtype]["weight"][0], TOL[dtype]["weight"][1] * max(1.0, scale),
                         f"step {step} weight")
    keep = torch.ones(n, dtype=torch.bool)
    keep[index] = False
    w = w.cpu()
    if dim == 0:  # rows (columns) outside the index untouched, bit for bit
        assert torch.equal(w[keep], weight[keep]) and not torch.equal(w[index], weight[index])
    else:
        assert torch.equal(w[:, keep], weight[:, keep]) and not torch.equal(w[:, index], weight[:, index])
    assert w.dtype == dtype


def test_adamw_update_matches_torch_adamw_over_many_steps(gen):
    p0 = torch.randn(17, 3, generator=gen)
    p, m1, m2 = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    q = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([q], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    for step in range(1, 31):
        g = torch.randn(17, 3, generator=gen)
        kne_kernels.adamw_update_(p, g, m1, m2, step=step, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.3)
        q.grad = g
        opt.step()
    assert torch.equal(p, q.detach())


def _args(gen, index, dev, K=None, rows=8, cols=4):
    K = index.numel() if K is None else K
    z = torch.zeros(K, cols, device=dev)
    return dict(weight=rand((rows, cols), torch.float32, gen, dev), index=index.to(dev),
                grad=rand((K, cols), torch.float32, gen, dev), delta=z.clone(), exp_avg=z.clone(), exp_avg_sq=z.clone(),
                base=rand((K, cols), torch.float32, gen, dev))


def test_duplicate_indices_raise_and_write_nothing(backend, dev, gen):
    for index in (torch.tensor([1, 1]), torch.tensor([3, 0, 5, 0, 2])):
        args = _args(gen, index, dev)
        before = {k: v.clone() for k, v in args.items()}
        with pytest.raises(ValueError, match=r"index holds \d+ more than once"):
            kne_kernels.ensemble_adamw_step_(*args.values(), step=1, lr=1e-2, scale=1.0, backend=backend)
        for k, v in args.items():
            assert torch.equal(v, before[k]), f"{k} written before the refusal"


def test_index_out_of_range_is_a_value_error(backend, dev, gen):
    for index in (torch.tensor([1, 8]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match=r"index values must lie in \[0, 8\)"):
            kne_kernels.ensemble_adamw_step_(*_args(gen, index, dev).values(), step=1, lr=1e-2, scale=1.0,
                                             backend=backend)


@pytest.mark.parametrize("alias", ["exp_avg=exp_avg_sq", "delta=exp_avg", "delta=grad", "exp_avg_sq=base",
                                   "weight=base", "exp_avg=delta[partial]"])
def test_aliased_state_is_refused(backend, dev, alias, gen):
    args = _args(gen, torch.tensor([1, 4]), dev)
    a, b = alias.split("=")
    if b.endswith("[partial]"):  # two views of one buffer that overlap in part
        buf = torch.zeros(3 * 4, device=dev)
        args["exp_avg"], args["delta"] = buf[:8].view(2, 4), buf[4:].view(2, 4)
    elif (a, b) == ("weight", "base"):
        args["base"] = args["weight"][2:4]  # the base rows are rows of the weight being written
    else:
        args[a] = args[b]
    with pytest.raises(ValueError, match="share memory"):
        kne_kernels.ensemble_adamw_step_(*args.values(), step=1, lr=1e-2, scale=1.0, backend=backend)
    buf = torch.zeros(2 * 8, device=dev)  # disjoint views of one buffer are fine
    args = _args(gen, torch.tensor([1, 4]), dev)
    args["exp_avg"], args["exp_avg_sq"] = buf[:8].view(2, 4), buf[8:].view(2, 4)
    kne_kernels.ensemble_adamw_step_(*args.values(), step=1, lr=1e-2, scale=1.0, backend=backend)


def test_bad_inputs_are_named():
    w = torch.randn(6, 4)
    idx = torch.tensor([1, 3])
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    ok = dict(weight=w, index=idx, grad=z(2, 4), delta=z(2, 4), exp_avg=z(2, 4), exp_avg_sq=z(2, 4),
              base=w[idx].clone())

    def call(**over):
        a = dict(ok, **over)
        kw = {k: a.pop(k) for k in list(a) if k in ("step", "lr", "scale", "dim", "beta1", "beta2", "eps")}
        kw.setdefault("step", 1), kw.setdefault("lr", 1e-3), kw.setdefault("scale", 1.0)
        kne_kernels.ensemble_adamw_step_(*a.values(), **kw)

    for over, error, match in [
            (dict(weight=torch.randn(6, 4, 1)), ValueError, "weight must be 2-D"),
            (dict(weight=w.double()), TypeError, "weight has dtype float64"),
            (dict(dim=2), ValueError, "dim must be"),
            (dict(index=idx.int()), TypeError, "index has dtype int32"),
            (dict(index=idx[None]), ValueError, "index must be 1-D"),
            (dict(grad=z(3, 4)), ValueError, "grad must have the compact shape"),
            (dict(delta=z(2, 4).double()), TypeError, "delta has dtype float64"),
            (dict(exp_avg_sq=z(4, 2)), ValueError, "exp_avg_sq must have the compact shape"),
            (dict(base=w[idx].half()), TypeError, "base has dtype float16"),
            (dict(base=z(3, 4)), ValueError, "base must have the compact shape"),
            (dict(step=0), ValueError, "step counts from 1"),
            (dict(step=True), ValueError, "step counts from 1"),
            (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
            (dict(beta1=1.0), ValueError, "beta1 and beta2 must lie in"),
            (dict(index=torch.tensor([1, 8])), ValueError, "index values must lie"),
            (dict(delta=torch.zeros(4, 2).t()), ValueError, "delta is not contiguous")]:
        with pytest.raises(error, match=match):
            call(**over)
    w0 = w.clone()
    call(grad=torch.ones(2, 4))  # the valid call works and writes only rows 1 and 3
    keep = torch.tensor([0, 2, 4, 5])
    assert torch.equal(w[keep], w0[keep]) and not torch.equal(w[idx], w0[idx])


# ---------------------------------------------------------------------------------------------- the C++ kernel's checks
def _cpu_bad_cases():
    f = torch.randn
    w, idx, c = f(10, 4), torch.tensor([1, 5]), torch.zeros(2, 4)
    K = kernel(OP, "cpu")

    def adamw(**kw):
        args = dict(weight=w.clone(), index=idx, grad=f(2, 4), delta=c.clone(), exp_avg=c.clone(),
                    exp_avg_sq=c.clone(), base=f(2, 4), step=1, lr=1e-3, scale=1.0, dim=0, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.0)
        args.update(kw)
        return lambda: K(*args.values())

    m = c.clone()
    return [
        ("index range", adamw(index=torch.tensor([1, 10])), "index[1] = 10 is out of range"),
        ("index duplicate", adamw(index=torch.tensor([5, 5])), "twice"),
        ("index dtype", adamw(index=idx.int()), "index has dtype"),
        ("grad shape", adamw(grad=f(3, 4)), "grad must have shape"),
        ("delta dtype", adamw(delta=c.half()), "delta has dtype"),
        ("delta strides", adamw(delta=torch.zeros(4, 2).t()), "delta is not contiguous"),
        ("base dtype", adamw(base=f(2, 4).bfloat16()), "base has dtype"),
        ("dim", adamw(dim=2), "dim must be"),
        ("step", adamw(step=0), "step counts from 1"),
        ("aliased moments", adamw(exp_avg=m, exp_avg_sq=m), "exp_avg and exp_avg_sq share memory"),
    ]


@pytest.mark.cpu_backend
@pytest.mark.parametrize("what", [c[0] for c in _cpu_bad_cases()])
def test_cpu_kernel_refuses_bad_inputs(what):
    """The C++ kernel checks its arguments itself (index range and uniqueness, aliasing), naming
    the argument."""
    require("cpu")
    _, call, needle = next(c for c in _cpu_bad_cases() if c[0] == what)
    assert_kernel_refuses(call, needle, what)


# ---------------------------------------------------------------------------------------------- registry
def test_opcheck(backend, dev, gen):
    wd = torch.bfloat16 if backend != "cuda" else torch.float16
    state = [torch.zeros(2, 4, device=dev) for _ in range(3)]
    opcheck(OP, backend, (rand((9, 4), wd, gen, dev), torch.tensor([1, 5], device=dev),
                          rand((2, 4), torch.float32, gen, dev), *state, rand((2, 4), wd, gen, dev), 1, 1e-3, 0.5, 0,
                          0.9, 0.999, 1e-8, 0.0))


def test_selfcheck_case_passes(backend, dev):
    (d,) = OPS
    ok, why = d.selfcheck(kernel(OP, backend), d.torch, dev)
    assert ok, why


# ---------------------------------------------------------------------------------------------- fuzzing
def _fuzz(backend, dev, data, seed):
    """Shapes with 1 and primes, rows and columns, every hyper-parameter branch, a strided grad
    (refused by name, nothing written); against a float64 oracle on the same float32 inputs with
    bounds of a few float32 roundings per operation."""
    from hypothesis import strategies as st

    gen = torch.Generator().manual_seed(seed)
    wdtype = data.draw(st.sampled_from(fuzz_dtypes(backend)), label="weight dtype")
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

    d0, m0, v0, g = delta.double(), m.double(), v.double(), grad.double()  # float64 oracle
    d1 = d0 * (1 - lr * wd)
    m1 = m0 + (1 - beta1) * (g - m0)
    v1 = v0 * beta2 + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = v1.sqrt() / math.sqrt(bc2) + eps
    d2 = d1 - (lr / bc1) * m1 / denom
    w2 = base.double() + scale * d2
    tol_m = 4 * U * (m0.abs() + g.abs())
    tol_v = 4 * U * v1
    tol_d = 16 * U * (d0.abs() + d2.abs() + (lr / bc1) * (m0.abs() + g.abs() + m1.abs()) / denom)
    eps_w, tiny_w = TOL[wdtype]["eps"], TOL[wdtype]["tiny"]
    tol_w = (eps_w / 2) * w2.abs() + tiny_w + scale * tol_d + 4 * U * (base.double().abs() + scale * d2.abs())

    args = dict(weight=weight.clone().to(dev), index=index.to(dev), grad=maybe_strided(data, grad.to(dev), "grad"),
                delta=delta.clone().to(dev), exp_avg=m.clone().to(dev), exp_avg_sq=v.clone().to(dev),
                base=base.to(dev))
    w_before = args["weight"].clone()

    def call():
        kne_kernels.ensemble_adamw_step_(*args.values(), step=step, lr=lr, scale=scale, dim=dim, beta1=beta1,
                                         beta2=beta2, eps=eps, weight_decay=wd, backend=backend)
        return True

    if refused_if_strided(call, {"grad": args["grad"]}) is None:
        assert torch.equal(args["delta"].cpu(), delta) and torch.equal(args["weight"], w_before), "written on a refusal"
        return
    what = f"adamw {backend} {wdtype} [{O}, {I}] dim={dim} K={K} step={step} b1={beta1} b2={beta2} wd={wd}"
    assert_within(args["exp_avg"], m1, tol_m, what + " exp_avg")
    assert_within(args["exp_avg_sq"], v1, tol_v, what + " exp_avg_sq")
    assert_within(args["delta"], d2, tol_d, what + " delta")
    # a row value past the dtype's largest (fp16: 65504) rounds to infinity (the oracle before this
    # rule expected the finite value); near that edge either is right
    rows = args["weight"].index_select(dim, index.to(dev)).double().cpu()
    over = torch.finfo(wdtype).max * (1 + eps_w / 4)  # max + half an ulp of it: where rounding overflows
    to_inf, finite = (w2.abs() - tol_w) > over, (w2.abs() + tol_w) < over
    assert torch.equal(rows[to_inf], torch.sign(w2[to_inf]) * math.inf), what + " weight rows past the dtype's max"
    assert_within(rows[finite], w2[finite], tol_w[finite], what + " weight rows")
    keep = torch.ones(limit, dtype=torch.bool)
    keep[index] = False
    rest = keep.nonzero()[:, 0].to(dev)
    assert torch.equal(args["weight"].index_select(dim, rest), w_before.index_select(dim, rest)), \
        what + ": wrote outside the ensemble"


fuzz_tests(_fuzz, globals(), "ensemble_adamw_step")
