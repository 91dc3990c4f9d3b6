"""``kne::weight_attribution_`` in Triton: ``out += sum over dim of weight * grad`` (``|weight * grad|``).

``weight``/``grad`` ``[R, C]`` (fp32/fp16/bf16), products and sums in fp32.

* ``dim=0`` (one score per column, ``out [C]``): grid ``(C blocks, R chunks)``; a program
  accumulates a ``[BLOCK_R, BLOCK_C]`` tile over its chunk of rows, reduces it over rows and adds
  it with one atomic per column.
* ``dim=1`` (one score per row, ``out [R]``): grid ``(R blocks, C chunks)``; a program
  accumulates a ``[BLOCK_R, BLOCK_C]`` tile along its chunk of columns of ``BLOCK_R`` rows,
  reduces it over columns and adds it with one atomic per row (a single chunk, hence one writer,
  unless the rows are few and long).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import triton
import triton.language as tl

from ._common import DTYPES, chunk, products, target_programs

# dim -> config (the only ones the launcher picks; aot.py compiles each).
CONFIGS: Dict[str, dict] = {
    "cols": dict(BLOCK_R=16, BLOCK_C=256, num_warps=8),  # dim=0: reduce over rows
    "rows": dict(BLOCK_R=4, BLOCK_C=512, num_warps=4),   # dim=1: reduce over columns
}
# Passed to every launch (and to the AOT compile): FP contraction of a*b+acc into fma is wanted.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)
PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 8


@triton.jit
def _weight_attribution_cols_kernel(out_ptr, w_ptr, g_ptr, R, C, rows_per_prog,
                                    ABSOLUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row_begin = pid_r.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, R)
    tile = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(row_begin, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        m2 = (rows < row_end)[:, None] & cmask[None, :]
        p = products(w_ptr, g_ptr, rows[:, None] * C + cols[None, :], m2)
        if ABSOLUTE:
            p = tl.abs(p)
        tile += p
    tl.atomic_add(out_ptr + cols, tl.sum(tile, axis=0), mask=cmask, sem="relaxed")


@triton.jit
def _weight_attribution_rows_kernel(out_ptr, w_ptr, g_ptr, R, C, cols_per_prog,
                                    ABSOLUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    col_begin = pid_c.to(tl.int64) * cols_per_prog
    col_end = tl.minimum(col_begin + cols_per_prog, C)
    tile = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(col_begin, col_end, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        m2 = rmask[:, None] & (cols < col_end)[None, :]
        p = products(w_ptr, g_ptr, rows[:, None] * C + cols[None, :], m2)
        if ABSOLUTE:
            p = tl.abs(p)
        tile += p
    tl.atomic_add(out_ptr + rows, tl.sum(tile, axis=1), mask=rmask, sem="relaxed")


def weight_attribution_triton(out: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dim: int,
                              absolute: bool) -> None:
    R, C = weight.shape
    if R == 0 or C == 0:
        return
    target = target_programs(weight.device, PROGRAMS_PER_SM, INTERPRETER_PROGRAMS)
    if dim == 0:  # grid (column blocks, row chunks)
        cfg = CONFIGS["cols"]
        br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
        blocks = triton.cdiv(C, bc)
        per = chunk(R, br, target // blocks)
        grid, kernel = (blocks, triton.cdiv(R, per)), _weight_attribution_cols_kernel
    else:  # grid (row blocks, column chunks)
        cfg = CONFIGS["rows"]
        br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
        blocks = triton.cdiv(R, br)
        per = chunk(C, bc, target // blocks)
        grid, kernel = (blocks, triton.cdiv(C, per)), _weight_attribution_rows_kernel
    kernel[grid](out, weight, grad, R, C, per, ABSOLUTE=bool(absolute), BLOCK_R=br, BLOCK_C=bc,
                 num_warps=cfg["num_warps"], **LAUNCH_OPTIONS)


def aot_specs() -> List[dict]:
    specs = []
    for dname in DTYPES.values():
        for cname, kernel in (("cols", _weight_attribution_cols_kernel), ("rows", _weight_attribution_rows_kernel)):
            cfg = CONFIGS[cname]
            last = "rows_per_prog" if cname == "cols" else "cols_per_prog"
            for absolute in (False, True):
                specs.append(dict(
                    kernel=kernel, tag=f"{dname} {cname} abs={int(absolute)}",
                    signature={"out_ptr": "*fp32", "w_ptr": f"*{dname}", "g_ptr": f"*{dname}",
                               "R": "i32", "C": "i32", last: "i32"},
                    constexprs={"ABSOLUTE": absolute, "BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]},
                    options={"num_warps": cfg["num_warps"], **LAUNCH_OPTIONS}))
    return specs
