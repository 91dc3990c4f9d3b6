"""``kne::neuron_attribution_`` in Triton: ``out[seg[n], d] += scale_value * scale[n] * act[n, d] * grad[n, d]``.

Grid ``(D blocks, N chunks)``. Each program owns ``BLOCK_D`` columns and a contiguous chunk of
rows, read ``BLOCK_N`` rows at a time (fp32/fp16/bf16 in, products and sums in fp32):

* no segments: the program accumulates a ``[BLOCK_N, BLOCK_D]`` fp32 tile over its whole chunk,
  reduces it over rows once at the end and adds it with one atomic per column into ``out[0]``;
* segments: the program keeps a running ``[BLOCK_D]`` sum of the current segment while tiles are
  uniform (all rows one id: the common case of sorted ids, one segment per request) and adds it
  into ``out[cur]`` with one atomic per column when the id changes; a tile whose rows have
  several ids (unsorted ids, or a segment boundary) adds its products element-wise with atomics.

Results are therefore deterministic only up to the order of fp32 atomics across N chunks (one
chunk per column block when ``N`` is small).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

from ._common import DTYPES, chunk, products, target_programs

# Launch configurations, the only ones the launcher picks (``aot.py`` compiles each of them).
CONFIGS: Dict[str, dict] = {
    "wide": dict(BLOCK_N=16, BLOCK_D=256, num_warps=8),   # D >= 512
    "narrow": dict(BLOCK_N=64, BLOCK_D=64, num_warps=8),  # small D
}
# Passed to every launch (and to the AOT compile): FP contraction of a*b+acc into fma is wanted.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)
PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 8  # CPU (interpreter): few, large programs, still several N chunks


def pick_config(D: int) -> str:
    return "wide" if D >= 512 else "narrow"


@triton.jit
def _scaled_products(act_ptr, grad_ptr, scale_ptr, rows, cols, rmask, cmask, D, HAS_SCALE: tl.constexpr):
    """``act * grad`` (times ``scale[row]`` when given) of a ``[BLOCK_N, BLOCK_D]`` tile, fp32."""
    p = products(act_ptr, grad_ptr, rows[:, None] * D + cols[None, :], rmask[:, None] & cmask[None, :])
    if HAS_SCALE:
        s = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
        p = p * s[:, None]
    return p


@triton.jit
def _neuron_attribution_kernel(out_ptr, act_ptr, grad_ptr, seg_ptr, scale_ptr, scale_value,
                               N, D, rows_per_prog,
                               HAS_SEG: tl.constexpr, HAS_SCALE: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    row_begin = pid_n.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, N)
    if HAS_SEG:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        cur = tl.load(seg_ptr + row_begin)  # the grid holds only chunks with rows
        for start in range(row_begin, row_end, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            rmask = rows < row_end
            p = _scaled_products(act_ptr, grad_ptr, scale_ptr, rows, cols, rmask, cmask, D, HAS_SCALE) * scale_value
            seg = tl.load(seg_ptr + rows, mask=rmask, other=cur)  # padding rows join `cur`
            smin = tl.min(seg, axis=0)
            smax = tl.max(seg, axis=0)
            if (smin == smax) & (smin == cur):
                acc += tl.sum(p, axis=0)
            else:
                tl.atomic_add(out_ptr + cur * D + cols, acc, mask=cmask, sem="relaxed")
                if smin == smax:
                    acc = tl.sum(p, axis=0)
                    cur = smin
                else:
                    tl.atomic_add(out_ptr + seg[:, None] * D + cols[None, :], p,
                                  mask=rmask[:, None] & cmask[None, :], sem="relaxed")
                    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        tl.atomic_add(out_ptr + cur * D + cols, acc, mask=cmask, sem="relaxed")
    else:
        tile = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start in range(row_begin, row_end, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            tile += _scaled_products(act_ptr, grad_ptr, scale_ptr, rows, cols, rows < row_end, cmask, D, HAS_SCALE)
        total = tl.sum(tile, axis=0) * scale_value
        tl.atomic_add(out_ptr + cols, total, mask=cmask, sem="relaxed")


def neuron_attribution_triton(out: torch.Tensor, act: torch.Tensor, grad: torch.Tensor,
                              segments: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                              scale_value: float) -> None:
    N, D = act.shape
    if N == 0 or D == 0:
        return
    cfg = CONFIGS[pick_config(D)]
    bn, bd = cfg["BLOCK_N"], cfg["BLOCK_D"]
    d_blocks = triton.cdiv(D, bd)
    rows_per_prog = chunk(N, bn, target_programs(act.device, PROGRAMS_PER_SM, INTERPRETER_PROGRAMS) // d_blocks)
    _neuron_attribution_kernel[(d_blocks, triton.cdiv(N, rows_per_prog))](
        out, act, grad,
        segments if segments is not None else out,
        scale if scale is not None else out,
        float(scale_value), N, D, rows_per_prog,
        HAS_SEG=segments is not None, HAS_SCALE=scale is not None,
        BLOCK_N=bn, BLOCK_D=bd, num_warps=cfg["num_warps"], **LAUNCH_OPTIONS)


def aot_specs() -> List[dict]:
    """Every (kernel, signature, constexprs, options) the launcher can run."""
    specs = []
    for dname in DTYPES.values():
        for cname, cfg in CONFIGS.items():
            for has_seg in (False, True):
                for has_scale in (False, True):
                    specs.append(dict(
                        kernel=_neuron_attribution_kernel,
                        tag=f"{dname} {cname} seg={int(has_seg)} scale={int(has_scale)}",
                        signature={"out_ptr": "*fp32", "act_ptr": f"*{dname}", "grad_ptr": f"*{dname}",
                                   "seg_ptr": "*i64" if has_seg else "*fp32",
                                   "scale_ptr": "*fp32", "scale_value": "fp32",
                                   "N": "i32", "D": "i32", "rows_per_prog": "i32"},
                        constexprs={"HAS_SEG": has_seg, "HAS_SCALE": has_scale,
                                    "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]},
                        options={"num_warps": cfg["num_warps"], **LAUNCH_OPTIONS}))
    return specs
