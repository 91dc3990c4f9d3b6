"""``kne::ensemble_adamw_step_`` in Triton: one fused, in-place ``torch.optim.AdamW`` step on the
compact fp32 ``delta`` and its moments, then ``weight[index] = (base + scale * delta).to(dtype)``
along ``dim``. Per element (fp32, one rounding per torch op; compiled with FP contraction off so
only the explicit ``fma`` calls below fuse, where torch's own kernels are one fused multiply-add):

    delta *= 1 - lr * wd                       (a multiply by exactly 1.0 when wd == 0)
    m      = lerp(m, g, 1 - beta1)             (torch's two-branch lerp formula)
    v      = v * beta2 + (1 - beta2) * (g * g)
    denom  = sqrt_rn(v) * (1 / sqrt(bc2)) + eps
    delta  = delta - (lr / bc1) * div_rn(m, denom)
    weight[index[r], c] (dim 0) / weight[r, index[c]] (dim 1) = base + scale * delta   (rne cast)

The bias corrections are computed on the host in double (as torch's single-tensor step does) and
passed as fp32 scalars. Grid: 2-D tiles ``[BLOCK_R, BLOCK_C]`` of the compact ``[rows, cols]``
state (dim 0: ``[K, in]``; dim 1: ``[out, K]``); no division per element. Only the ensemble's
rows/columns of ``weight`` are written.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import triton
import triton.language as tl

from ._common import DTYPES, round_to

# (dim, shape class) -> config; the launcher picks only these (aot.py compiles each).
CONFIGS: Dict[str, dict] = {
    "dim0": dict(DIM=0, BLOCK_R=2, BLOCK_C=512, num_warps=4),
    "dim1_narrow": dict(DIM=1, BLOCK_R=64, BLOCK_C=16, num_warps=4),  # K <= 16
    "dim1_wide": dict(DIM=1, BLOCK_R=16, BLOCK_C=64, num_warps=4),
}
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


def pick_config(dim: int, cols: int) -> str:
    if dim == 0:
        return "dim0"
    return "dim1_narrow" if cols <= 16 else "dim1_wide"


@triton.jit
def _ensemble_adamw_step_kernel(weight_ptr, index_ptr, grad_ptr, delta_ptr, exp_avg_ptr, exp_avg_sq_ptr, base_ptr,
                           rows, cols, in_features,
                           decay, lerp_weight, one_minus_lerp, small_lerp, beta2, one_minus_beta2, addcmul_unit,
                           inv_bc2_sqrt, eps, neg_step_size, scale,
                           DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = r < rows
    cmask = c < cols
    m2 = rmask[:, None] & cmask[None, :]
    offs = r[:, None] * cols + c[None, :]
    g = tl.load(grad_ptr + offs, mask=m2, other=0.0)
    d = tl.load(delta_ptr + offs, mask=m2, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=m2, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=m2, other=0.0)
    b = tl.load(base_ptr + offs, mask=m2, other=0.0).to(tl.float32)

    d = d * decay
    diff = g - m
    m = tl.where(small_lerp != 0, tl.math.fma(diff, lerp_weight, m), tl.math.fma(-diff, one_minus_lerp, g))
    v = v * beta2
    # torch's addcmul is fma(value, g * g, v), or fma(g, g, v) when value == 1
    v = tl.where(addcmul_unit != 0, tl.math.fma(g, g, v), tl.math.fma(g * g, one_minus_beta2, v))
    denom = tl.math.sqrt_rn(v) * inv_bc2_sqrt + eps
    d = tl.math.fma(tl.math.div_rn(m, denom), neg_step_size, d)
    w = b + scale * d

    tl.store(delta_ptr + offs, d, mask=m2)
    tl.store(exp_avg_ptr + offs, m, mask=m2)
    tl.store(exp_avg_sq_ptr + offs, v, mask=m2)
    if DIM == 0:
        idx = tl.load(index_ptr + r, mask=rmask, other=0)
        woffs = idx[:, None] * in_features + c[None, :]
    else:
        idx = tl.load(index_ptr + c, mask=cmask, other=0)
        woffs = r[:, None] * in_features + idx[None, :]
    tl.store(weight_ptr + woffs, round_to(w, weight_ptr.dtype.element_ty), mask=m2)


def _scalars(step: int, lr: float, scale: float, beta1: float, beta2: float, eps: float,
             weight_decay: float) -> dict:
    """Host scalars as torch's single-tensor AdamW computes them (Python floats), as fp32 args."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bc2_sqrt = math.sqrt(bias_correction2)

    def f32(x: float) -> float:  # the float32 value a Python float becomes as a kernel argument
        return float(torch.tensor(x, dtype=torch.float32))

    lerp_weight = f32(1 - beta1)
    return dict(
        decay=f32(1 - lr * weight_decay) if weight_decay else 1.0,
        lerp_weight=lerp_weight,
        one_minus_lerp=f32(1.0 - lerp_weight),
        small_lerp=int(abs(lerp_weight) < 0.5),
        beta2=f32(beta2),
        one_minus_beta2=f32(1 - beta2),
        addcmul_unit=int(f32(1 - beta2) == 1.0),
        inv_bc2_sqrt=f32(1.0 / f32(bc2_sqrt)),
        eps=f32(eps),
        neg_step_size=f32(-step_size),
        scale=f32(scale),
    )


def ensemble_adamw_step_triton(weight: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor,
                                exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, base: torch.Tensor, step: int,
                                lr: float, scale: float, dim: int, beta1: float, beta2: float, eps: float,
                                weight_decay: float) -> None:
    rows, cols = delta.shape
    if rows == 0 or cols == 0:
        return
    cfg = CONFIGS[pick_config(dim, cols)]
    s = _scalars(step, lr, scale, beta1, beta2, eps, weight_decay)
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(cols, cfg["BLOCK_C"]))
    _ensemble_adamw_step_kernel[grid](
        weight, index, grad, delta, exp_avg, exp_avg_sq, base, rows, cols, weight.shape[1],
        s["decay"], s["lerp_weight"], s["one_minus_lerp"], s["small_lerp"], s["beta2"], s["one_minus_beta2"],
        s["addcmul_unit"], s["inv_bc2_sqrt"], s["eps"], s["neg_step_size"], s["scale"],
        DIM=cfg["DIM"], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        **LAUNCH_OPTIONS)


def aot_specs() -> List[dict]:
    specs = []
    scalars = ("decay", "lerp_weight", "one_minus_lerp", "small_lerp", "beta2", "one_minus_beta2",
               "addcmul_unit", "inv_bc2_sqrt", "eps", "neg_step_size", "scale")
    for dname in DTYPES.values():
        for cname, cfg in CONFIGS.items():
            sig = {"weight_ptr": f"*{dname}", "index_ptr": "*i64", "grad_ptr": "*fp32", "delta_ptr": "*fp32",
                   "exp_avg_ptr": "*fp32", "exp_avg_sq_ptr": "*fp32", "base_ptr": f"*{dname}",
                   "rows": "i32", "cols": "i32", "in_features": "i32"}
            sig.update({k: ("i32" if k in ("small_lerp", "addcmul_unit") else "fp32") for k in scalars})
            specs.append(dict(kernel=_ensemble_adamw_step_kernel, tag=f"{dname} {cname}", signature=sig,
                              constexprs={"DIM": cfg["DIM"], "BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]},
                              options={"num_warps": cfg["num_warps"], **LAUNCH_OPTIONS}))
    return specs
