"""``nullspace_project_`` (``kne::nullspace_project_``) on every backend against a float64 oracle
(the projector ``I - B B^T`` formed explicitly, written out below), the public function's rules,
opcheck and the first-use case.

Tolerances: the delta is float32 whatever the weight, so its error bound is the float32 GEMM bound
``(in + r) * eps32`` relative to the delta's magnitude; the written rows are the float32
``base + scale * delta`` rounded to the weight dtype, within the ``rows`` tolerance of that dtype
(one unit in its last place) of the float64 rows."""

from __future__ import annotations

import pytest
import torch

import kne_kernels
from kne_kernels.ops.nullspace_project import OPS
from helpers import rel_err, worst
from .kernel_testing import EPS32, FLOATS, TOL, kernel, opcheck, require

OP = "nullspace_project_"


def project_float64(weight, index, delta, basis, base, scale) -> None:
    """The oracle: ``delta = delta @ (I - B B^T)`` in float64, then the rows as the op writes them."""
    B = basis.double()
    P = torch.eye(B.shape[0], dtype=torch.float64, device=B.device) - B @ B.t()
    delta.copy_((delta.double() @ P).float())
    weight.index_copy_(0, index, (base.float() + scale * delta).to(weight.dtype))


def _case(K, n, r, dtype, device, gen):
    basis = torch.linalg.qr(torch.randn(n, max(r, 1), generator=gen, dtype=torch.float64)).Q[:, :r]
    basis = basis.float().contiguous()
    out = 2 * K + 3
    weight = torch.randn(out, n, generator=gen).to(dtype)
    index = torch.randperm(out, generator=gen)[:K]
    delta = torch.randn(K, n, generator=gen)
    base = weight[index].clone()
    return [t.to(device) for t in (weight, index, delta, basis, base)]


# odd shapes: one row, primes, r = 0 (nothing preserved), r = n (everything preserved), wide r
SHAPES = [(1, 1, 0), (1, 7, 3), (3, 77, 20), (7, 130, 65), (2, 31, 31), (17, 257, 100), (5, 64, 1)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_against_float64(backend, dev, dtype, shape, gen):
    if backend == "triton" and dev.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 dot products (covered on a GPU)")
    K, n, r = shape
    weight, index, delta, basis, base = _case(K, n, r, dtype, dev, gen)
    want_w, want_d = weight.clone(), delta.clone()
    project_float64(want_w, index, want_d, basis, base, scale=0.37)
    got_w, got_d = weight.clone(), delta.clone()
    kne_kernels.nullspace_project_(got_w, index, got_d, basis, base, scale=0.37, backend=backend)
    tol = 8 * (n + r) * EPS32  # relative to the input delta's magnitude (the result may be ~0: r = n)
    err = float((got_d.double() - want_d.double()).abs().max()) / float(delta.abs().max())
    assert err <= tol, f"{backend}: delta error {err:.2e} > {tol:.2e}; {worst(got_d, want_d)}"
    if r:
        inside = float((got_d.double() @ basis.double()).abs().max())
        assert inside <= 8 * (n + r) * EPS32 * float(delta.abs().max()), \
            f"{backend}: the projected delta keeps a component of {inside:.2e} inside span(basis)"
    rows = got_w[index].double()
    diff = (rows - want_w[index].double()).abs()
    bound = TOL[dtype]["rows"] * want_w[index].double().abs().clamp_min(1.0) + tol * float(delta.abs().max())
    assert bool((diff <= bound).all()), f"{backend}: rows off by {float(diff.max()):.3g}; {worst(rows, want_w[index])}"
    others = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    others[index] = False
    assert torch.equal(got_w[others], weight[others]), f"{backend} wrote rows outside the ensemble"


def test_nan_poisoned_rows_are_overwritten(backend, dev, gen):
    """The ensemble rows of the weight start as NaN: every element must be written."""
    weight, index, delta, basis, base = _case(5, 67, 11, torch.float32, dev, gen)
    weight[index] = float("nan")
    kne_kernels.nullspace_project_(weight, index, delta, basis, base, scale=1.0, backend=backend)
    assert not weight.isnan().any(), f"{backend} left rows of the ensemble unwritten"


def test_projection_is_idempotent_and_keeps_orthogonal_part(backend, dev, gen):
    """A delta already orthogonal to the basis is unchanged (to rounding); projecting twice equals
    projecting once."""
    weight, index, delta, basis, base = _case(4, 96, 30, torch.float32, dev, gen)
    ortho = (delta.double() - (delta.double() @ basis.double()) @ basis.double().t()).float()
    d = ortho.clone()
    kne_kernels.nullspace_project_(weight, index, d, basis, base, scale=1.0, backend=backend)
    assert rel_err(d, ortho) <= 64 * EPS32
    once = d.clone()
    kne_kernels.nullspace_project_(weight, index, d, basis, base, scale=1.0, backend=backend)
    assert rel_err(d, once) <= 64 * EPS32


def test_duplicate_indices_and_aliases_are_refused(backend, dev, gen):
    """The same rules as ensemble_adamw_step_: a row index once, no in-place argument aliased."""
    w, idx, d, basis, base = _case(3, 16, 4, torch.float32, dev, gen)
    with pytest.raises(ValueError, match="more than once"):
        kne_kernels.nullspace_project_(w, torch.tensor([1, 1, 2], device=dev), d, basis, base, scale=1.0,
                                       backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        kne_kernels.nullspace_project_(w, idx, w[:3], basis, base, scale=1.0, backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        kne_kernels.nullspace_project_(w, idx, d, basis, d, scale=1.0, backend=backend)


def test_bad_inputs_name_the_argument():
    w, idx, d, basis, base = _case(2, 8, 3, torch.float32, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="basis must be"):
        kne_kernels.nullspace_project_(w, idx, d, basis[:5].contiguous(), base, scale=1.0)
    with pytest.raises(ValueError, match="delta must have"):
        kne_kernels.nullspace_project_(w, idx, d[:1], basis, base, scale=1.0)
    with pytest.raises(TypeError, match="basis has dtype"):
        kne_kernels.nullspace_project_(w, idx, d, basis.double(), base, scale=1.0)
    with pytest.raises(TypeError, match="base has dtype"):
        kne_kernels.nullspace_project_(w, idx, d, basis, base.half(), scale=1.0)
    with pytest.raises(ValueError, match="index values"):
        kne_kernels.nullspace_project_(w, torch.tensor([0, 99]), d, basis, base, scale=1.0)
    with pytest.raises(ValueError, match="not contiguous"):
        kne_kernels.nullspace_project_(w, idx, d, basis.t().contiguous().t(), base, scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        kne_kernels.nullspace_project_(w, idx, d, basis, base, scale=float("nan"))


@pytest.mark.cpu_backend
def test_cpu_kernel_refuses_aliases_itself(gen):
    require("cpu")
    w, idx, d, basis, base = _case(3, 16, 4, torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match="share memory"):
        kernel(OP, "cpu")(w, idx, d, basis, d, 1.0)


def test_opcheck(backend, dev, gen):
    wd = {"torch": torch.float32, "cpu": torch.float16, "triton": torch.float32, "cuda": torch.bfloat16}[backend]
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    opcheck(OP, backend, (r(9, 6).to(wd).to(dev), torch.tensor([2, 7], device=dev), r(2, 6).to(dev),
                          torch.linalg.qr(r(6, 2)).Q.contiguous().to(dev), r(2, 6).to(wd).to(dev), 0.5))


def test_selfcheck_case_passes(backend, dev):
    (d,) = OPS
    ok, why = d.selfcheck(kernel(OP, backend), d.torch, dev)
    assert ok, why

