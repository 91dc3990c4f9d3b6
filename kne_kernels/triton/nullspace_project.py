"""``kne::nullspace_project_`` in Triton: a compact row delta projected off the preserved key space,
then the ensemble rows of the weight rewritten.

Two launches, both tiled ``tl.dot`` in full fp32 (``input_precision="ieee"``: TF32 would leave a
component of about 1e-3 of the delta inside the preserved space):

1. ``_coef_kernel``: ``coef[K, r] = delta[K, in] @ basis[in, r]`` (fp32 scratch);
2. ``_project_kernel``: per ``[BLOCK_K, BLOCK_N]`` tile of the delta,
   ``delta -= coef @ basis^T`` (the tile's ``basis`` rows, all ``r`` columns), then
   ``weight[index[k], n] = rne(base + scale * delta)``.

Only the ensemble rows of the weight are written.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import triton
import triton.language as tl

from ._common import DTYPES, round_to

CONFIGS: Dict[str, dict] = {
    "coef": dict(BLOCK_K=16, BLOCK_R=64, BLOCK_N=32, num_warps=4),
    "project": dict(BLOCK_K=16, BLOCK_N=64, BLOCK_R=32, num_warps=4),
}


@triton.jit
def _coef_kernel(delta_ptr, basis_ptr, coef_ptr, K, n, r,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    j = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    kmask = k < K
    jmask = j < r
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N).to(tl.int64)
        imask = i < n
        d = tl.load(delta_ptr + k[:, None] * n + i[None, :], mask=kmask[:, None] & imask[None, :], other=0.0)
        b = tl.load(basis_ptr + i[:, None] * r + j[None, :], mask=imask[:, None] & jmask[None, :], other=0.0)
        acc += tl.dot(d, b, input_precision="ieee")
    tl.store(coef_ptr + k[:, None] * r + j[None, :], acc, mask=kmask[:, None] & jmask[None, :])


@triton.jit
def _project_kernel(weight_ptr, index_ptr, delta_ptr, basis_ptr, coef_ptr, base_ptr, K, n, r, scale,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    i = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = k < K
    imask = i < n
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for start in range(0, r, BLOCK_R):
        j = start + tl.arange(0, BLOCK_R).to(tl.int64)
        jmask = j < r
        c = tl.load(coef_ptr + k[:, None] * r + j[None, :], mask=kmask[:, None] & jmask[None, :], other=0.0)
        bt = tl.load(basis_ptr + i[None, :] * r + j[:, None], mask=jmask[:, None] & imask[None, :], other=0.0)
        acc += tl.dot(c, bt, input_precision="ieee")
    m2 = kmask[:, None] & imask[None, :]
    offs = k[:, None] * n + i[None, :]
    d = tl.load(delta_ptr + offs, mask=m2, other=0.0) - acc
    tl.store(delta_ptr + offs, d, mask=m2)
    b = tl.load(base_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    rows = tl.load(index_ptr + k, mask=kmask, other=0)
    tl.store(weight_ptr + rows[:, None] * n + i[None, :], round_to(b + scale * d, weight_ptr.dtype.element_ty),
             mask=m2)


def nullspace_project_triton(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, basis: torch.Tensor,
                             base: torch.Tensor, scale: float) -> None:
    K, n = delta.shape
    r = basis.shape[1]
    if K == 0 or n == 0:
        return
    coef = torch.empty((K, r), dtype=torch.float32, device=delta.device)
    if r:
        c = CONFIGS["coef"]
        _coef_kernel[(triton.cdiv(K, c["BLOCK_K"]), triton.cdiv(r, c["BLOCK_R"]))](
            delta, basis, coef, K, n, r, BLOCK_K=c["BLOCK_K"], BLOCK_R=c["BLOCK_R"], BLOCK_N=c["BLOCK_N"],
            num_warps=c["num_warps"])
    p = CONFIGS["project"]
    _project_kernel[(triton.cdiv(K, p["BLOCK_K"]), triton.cdiv(n, p["BLOCK_N"]))](
        weight, index, delta, basis, coef, base, K, n, r, float(scale),
        BLOCK_K=p["BLOCK_K"], BLOCK_N=p["BLOCK_N"], BLOCK_R=p["BLOCK_R"], num_warps=p["num_warps"])


def aot_specs() -> List[dict]:
    c, p = CONFIGS["coef"], CONFIGS["project"]
    specs = [dict(kernel=_coef_kernel, tag="fp32 coef",
                  signature={"delta_ptr": "*fp32", "basis_ptr": "*fp32", "coef_ptr": "*fp32", "K": "i32",
                             "n": "i32", "r": "i32"},
                  constexprs={"BLOCK_K": c["BLOCK_K"], "BLOCK_R": c["BLOCK_R"], "BLOCK_N": c["BLOCK_N"]},
                  options={"num_warps": c["num_warps"]})]
    for dname in DTYPES.values():
        specs.append(dict(kernel=_project_kernel, tag=f"{dname} project",
                          signature={"weight_ptr": f"*{dname}", "index_ptr": "*i64", "delta_ptr": "*fp32",
                                     "basis_ptr": "*fp32", "coef_ptr": "*fp32", "base_ptr": f"*{dname}",
                                     "K": "i32", "n": "i32", "r": "i32", "scale": "fp32"},
                          constexprs={"BLOCK_K": p["BLOCK_K"], "BLOCK_N": p["BLOCK_N"], "BLOCK_R": p["BLOCK_R"]},
                          options={"num_warps": p["num_warps"]}))
    return specs
