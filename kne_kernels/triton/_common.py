"""What the Triton launchers share: the dtypes they accept, how many programs to aim for, how to
cut one axis of a tensor into per-program chunks, fp32 products of two inputs, and the
round-to-nearest-even cast of fp32 results to a weight's dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# torch dtype -> Triton pointer element name (launch signatures and the AOT specs).
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def target_programs(device: torch.device, per_sm: int, interpreter: int) -> int:
    """About how many programs a launch should have: ``per_sm`` per multiprocessor on a GPU; under
    the interpreter (CPU tensors) a few large programs, ``interpreter``."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return interpreter


def chunk(extent: int, block: int, programs: int) -> int:
    """Elements per program along an axis of ``extent`` read ``block`` at a time, shared by about
    ``programs`` programs (at least one, each with whole blocks); the grid along it is
    ``triton.cdiv(extent, chunk)``."""
    tiles = triton.cdiv(extent, block)
    return triton.cdiv(tiles, max(1, min(tiles, programs))) * block


@triton.jit
def products(x_ptr, y_ptr, offs, mask):
    """``x[offs] * y[offs]`` in fp32 (0 where ``mask`` is off), whatever the inputs' float dtype."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x * y


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> ``dtype``, round to nearest even. bf16 is rounded with integer ops (as c10::BFloat16
    does; the GPU's cvt.rn gives the same bits, but Triton's interpreter truncates), NaN -> 0x7FC0."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # noqa: PLR0124 (x is NaN)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
