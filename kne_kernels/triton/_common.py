"""What the Triton launchers share: the dtypes they accept, how many programs to aim for, and how
to cut one axis of a tensor into per-program chunks."""

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
