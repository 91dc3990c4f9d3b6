"""pytest-benchmark suite: each kne_kernels op beside its torch expression, same inputs.

    python -m pytest benchmarks/speed/test_bench_kernels.py --benchmark-only --benchmark-group-by=param:case

Not part of the test suite (testpaths = tests); shapes are moderate so a run takes about a minute.
"""

import pytest
import torch

import kne_kernels

torch.set_num_threads(1)
G = torch.Generator().manual_seed(0)


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G).to(dtype)


A, GR = _r(2048, 2048, dtype=torch.bfloat16), _r(2048, 2048, dtype=torch.bfloat16)
W, GW = _r(4096, 2048), _r(4096, 2048)
S = _r(1, 32, 11008)
IDX = torch.randperm(4096, generator=G)[:64].sort().values
WB = _r(4096, 2048, dtype=torch.bfloat16)
BASE = WB[IDX].clone()
DG = _r(64, 2048)


def _adamw_kne():
    state = [torch.zeros(64, 2048) for _ in range(3)]
    return lambda: kne_kernels.ensemble_adamw_step_(WB, IDX, DG, *state, BASE, step=1, lr=1e-3, scale=0.1)


def _adamw_torch():
    p = torch.zeros(64, 2048, requires_grad=True)
    p.grad = DG.clone()
    opt = torch.optim.AdamW([p], lr=1e-3)

    def f():
        opt.step()
        with torch.no_grad():
            WB.index_copy_(0, IDX, (BASE.float() + 0.1 * p).to(WB.dtype))
    return f


CASES = {
    "neuron_attribution bf16 [2048,2048]": (lambda: kne_kernels.neuron_attribution(A, GR),
                                            lambda: (A.float() * GR.float()).sum(0)),
    "weight_attribution fp32 [4096,2048]": (lambda: kne_kernels.weight_attribution(W, GW),
                                            lambda: (W * GW).sum(1)),
    "ensemble_select [1,32,11008]": (lambda: kne_kernels.ensemble_select(S),
                                     lambda: [r.nonzero() for r in (S[0] > torch.quantile(S[0].flatten(), 0.99))]),
    "ensemble_adamw_step_ [64,2048] bf16": (_adamw_kne, _adamw_torch),
}


@pytest.mark.parametrize("provider", ["kne_kernels", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_op(benchmark, case, provider):
    cand, base = CASES[case]
    fn = cand if provider == "kne_kernels" else base
    if case.startswith("ensemble_adamw"):
        fn = fn()
    benchmark.group = case
    benchmark(fn)
