"""Ensemble selection in Triton: ``kne::ensemble_aggregate``, ``kne::order_statistics`` (radix
select) and ``kne::threshold_mask``. All fp32 in, memory bound.

``ensemble_aggregate``: one program per ``BLOCK`` outputs, a sequential loop over the ``R``
rows: ``max`` (NaN propagates, as ``torch.amax``) or a float32 sum started at ``0`` in the order
``r = 0..R-1`` and one IEEE division by ``R`` (``tl.math.div_rn``; plain ``/`` is an approximate
division on NVIDIA GPUs).

``order_statistics``: exact radix select on the order-preserving 32-bit key of each float
(``-0.0`` is first mapped to ``+0.0``; then positives get the sign bit set and negatives have all
bits inverted). Three passes resolve the keys of both wanted ranks 11 + 11 + 10 bits at a time:
pass ``p`` histograms digit ``p`` of the keys whose higher bits equal the prefix found so far
(``tl.histogram`` per program, accumulated in registers over its tiles, then one int64 atomic per
non-empty bin), and a one-program select kernel finds, with a cumulative sum over the bins, the
bucket holding each rank and narrows the prefix and rank. The second rank gets its own histogram
once its prefix differs from the first one's. Everything stays on the device (no host sync); the
last select kernel writes the two floats.

``threshold_mask``: grid ``(L, chunks of D)``; a program writes its chunk of mask bytes and adds
its count of kept elements to ``counts[row]`` with one int64 atomic.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import chunk, target_programs

AGGREGATE_CONFIG = dict(BLOCK=1024, num_warps=4)
HISTOGRAM_CONFIG = dict(BLOCK=2048, num_warps=8)
# (SHIFT, BITS) of each radix pass, most significant digit first: 11 + 11 + 10 = 32 bits.
RADIX_PASSES: Tuple[Tuple[int, int], ...] = ((21, 11), (10, 11), (0, 10))
MAX_BINS = 1 << max(bits for _, bits in RADIX_PASSES)
SELECT_CONFIG = dict(num_warps=4)
THRESHOLD_CONFIG = dict(BLOCK=2048, num_warps=8)
# Passed to every launch (and to the AOT compile): FP contraction of a*b+acc into fma is wanted.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4


def _target_programs(device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    return target_programs(device, per_sm, INTERPRETER_PROGRAMS)


# ---------------------------------------------------------------------------------------------
@triton.jit
def _ensemble_aggregate_kernel(out_ptr, scores_ptr, R, M, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # (No method calls on the integer arguments: the JIT turns an argument equal to 1 into a constant.)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    ptrs = scores_ptr + offs
    acc = tl.load(ptrs, mask=m, other=0.0)
    if MEAN:
        acc = 0.0 + acc  # the sum starts at +0.0 (so -0.0 + ... behaves as torch's sum)
    for _ in range(1, R):
        ptrs += M  # row r (64-bit pointer arithmetic: R * M may exceed 2^31)
        x = tl.load(ptrs, mask=m, other=0.0)
        if MEAN:
            acc = acc + x
        else:
            acc = tl.where((x > acc) | (x != x), x, acc)  # noqa: PLR0124 (x is NaN)
    if MEAN:
        acc = tl.math.div_rn(acc, tl.zeros_like(acc) + R)
    tl.store(out_ptr + offs, acc, mask=m)


def ensemble_aggregate_triton(scores: torch.Tensor, mode: int) -> torch.Tensor:
    R, M = scores.shape
    out = torch.empty(M, dtype=torch.float32, device=scores.device)
    if M == 0:
        return out
    if R == 0:
        return out.fill_(float("nan"))  # max/mean over nothing (the API never passes R == 0)
    block = AGGREGATE_CONFIG["BLOCK"]
    _ensemble_aggregate_kernel[(triton.cdiv(M, block),)](
        out, scores, R, M, MEAN=mode == 1, BLOCK=block, num_warps=AGGREGATE_CONFIG["num_warps"], **LAUNCH_OPTIONS)
    return out


# ---------------------------------------------------------------------------------------------
@triton.jit
def _float_key(x):
    """Order-preserving uint32 key of a float32 (-0.0 and +0.0 share the key of +0.0)."""
    u = x.to(tl.uint32, bitcast=True)
    u = tl.where((u << 1) == 0, 0, u)
    return tl.where((u >> 31) != 0, ~u, u | 0x80000000)


@triton.jit
def _radix_histogram_kernel(hist_ptr, values_ptr, state_ptr, M, tiles_per_prog,
                            SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr,
                            BLOCK: tl.constexpr):
    BINS: tl.constexpr = 1 << BITS
    HIGH: tl.constexpr = SHIFT + BITS
    pid = tl.program_id(0).to(tl.int64)
    # state: [prefix_a, rank_a, prefix_b, rank_b] (int64); the prefixes hold the digits above SHIFT.
    prefix_a = tl.load(state_ptr).to(tl.uint32)
    prefix_b = tl.load(state_ptr + 2).to(tl.uint32)
    two = prefix_a != prefix_b
    ha = tl.zeros([BINS], dtype=tl.int32)
    hb = tl.zeros([BINS], dtype=tl.int32)
    start = pid * tiles_per_prog * BLOCK  # int64: M may exceed 2^31
    for _ in range(tiles_per_prog):
        offs = start + tl.arange(0, BLOCK)
        start += BLOCK
        m = offs < M
        key = _float_key(tl.load(values_ptr + offs, mask=m, other=0.0))
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        if FIRST:
            ha += tl.histogram(digit, BINS, mask=m)
        else:
            high = key >> HIGH
            ha += tl.histogram(digit, BINS, mask=m & (high == (prefix_a >> HIGH)))
            if two:
                hb += tl.histogram(digit, BINS, mask=m & (high == (prefix_b >> HIGH)))
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, ha.to(tl.int64), mask=ha != 0, sem="relaxed")
    if not FIRST:  # noqa: SIM102 (a compile-time and a run-time condition)
        if two:
            tl.atomic_add(hist_ptr + BINS + bins, hb.to(tl.int64), mask=hb != 0, sem="relaxed")


@triton.jit
def _radix_pick(hist, prefix, rank, SHIFT: tl.constexpr, BINS: tl.constexpr):
    below = tl.cumsum(hist, axis=0) <= rank  # bins wholly below the rank
    digit = tl.minimum(tl.sum(below.to(tl.int64), axis=0), BINS - 1)
    skipped = tl.sum(tl.where(below, hist, 0), axis=0)
    return prefix | (digit << SHIFT), rank - skipped


@triton.jit
def _key_to_float(key):
    """Inverse of _float_key for an int64 holding the uint32 key."""
    u = tl.where(key >= 2147483648, key - 2147483648, 4294967295 - key)
    return u.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _radix_select_kernel(state_ptr, hist_ptr, out_ptr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                         LAST: tl.constexpr):
    BINS: tl.constexpr = 1 << BITS
    prefix_a = tl.load(state_ptr)
    rank_a = tl.load(state_ptr + 1)
    prefix_b = tl.load(state_ptr + 2)
    rank_b = tl.load(state_ptr + 3)
    two = prefix_a != prefix_b
    bins = tl.arange(0, BINS)
    prefix_a2, rank_a2 = _radix_pick(tl.load(hist_ptr + bins), prefix_a, rank_a, SHIFT, BINS)
    prefix_b2, rank_b2 = _radix_pick(tl.load(hist_ptr + two.to(tl.int64) * BINS + bins), prefix_b, rank_b,
                                     SHIFT, BINS)
    tl.store(state_ptr, prefix_a2)
    tl.store(state_ptr + 1, rank_a2)
    tl.store(state_ptr + 2, prefix_b2)
    tl.store(state_ptr + 3, rank_b2)
    if LAST:
        tl.store(out_ptr, _key_to_float(prefix_a2))
        tl.store(out_ptr + 1, _key_to_float(prefix_b2))


def order_statistics_triton(values: torch.Tensor, k: int) -> torch.Tensor:
    M = values.numel()
    device = values.device
    k1 = min(k + 1, M - 1)
    out = torch.empty(2, dtype=torch.float32, device=device)
    state = torch.tensor([0, k, 0, k1], dtype=torch.int64, device=device)
    hist = torch.zeros(len(RADIX_PASSES), 2 * MAX_BINS, dtype=torch.int64, device=device)
    block = HISTOGRAM_CONFIG["BLOCK"]
    tiles_per_prog = chunk(M, block, _target_programs(device)) // block
    programs = triton.cdiv(triton.cdiv(M, block), tiles_per_prog)
    for p, (shift, bits) in enumerate(RADIX_PASSES):
        _radix_histogram_kernel[(programs,)](
            hist[p], values, state, M, tiles_per_prog, SHIFT=shift, BITS=bits, FIRST=p == 0,
            BLOCK=block, num_warps=HISTOGRAM_CONFIG["num_warps"], **LAUNCH_OPTIONS)
        _radix_select_kernel[(1,)](state, hist[p], out, SHIFT=shift, BITS=bits, LAST=p == len(RADIX_PASSES) - 1,
                                   num_warps=SELECT_CONFIG["num_warps"], **LAUNCH_OPTIONS)
    return out


# ---------------------------------------------------------------------------------------------
@triton.jit
def _threshold_mask_kernel(mask_ptr, counts_ptr, values_ptr, threshold, D, cols_per_prog,
                           POSITIVE_ONLY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    begin = tl.program_id(1).to(tl.int64) * cols_per_prog
    end = tl.minimum(begin + cols_per_prog, D)
    row_off = row * D
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(begin, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < end
        x = tl.load(values_ptr + row_off + cols, mask=m, other=0.0)
        keep = x > threshold
        if POSITIVE_ONLY:
            keep = keep & (x > 0.0)
        tl.store(mask_ptr + row_off + cols, keep, mask=m)
        cnt += (keep & m).to(tl.int32)
    tl.atomic_add(counts_ptr + row, tl.sum(cnt, axis=0).to(tl.int64), sem="relaxed")


def threshold_mask_triton(values: torch.Tensor, threshold: float, positive_only: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    L, D = values.shape
    mask = torch.empty((L, D), dtype=torch.bool, device=values.device)
    counts = torch.zeros(L, dtype=torch.int64, device=values.device)
    if L == 0 or D == 0:
        return mask, counts
    block = THRESHOLD_CONFIG["BLOCK"]
    per = chunk(D, block, triton.cdiv(_target_programs(values.device, 8), L))
    _threshold_mask_kernel[(L, triton.cdiv(D, per))](
        mask, counts, values, float(threshold), D, per, POSITIVE_ONLY=bool(positive_only), BLOCK=block,
        num_warps=THRESHOLD_CONFIG["num_warps"], **LAUNCH_OPTIONS)
    return mask, counts


# ---------------------------------------------------------------------------------------------
def aot_specs() -> List[dict]:
    specs = []
    for mean in (False, True):
        specs.append(dict(kernel=_ensemble_aggregate_kernel, tag=f"fp32 mean={int(mean)}",
                          signature={"out_ptr": "*fp32", "scores_ptr": "*fp32", "R": "i32", "M": "i32"},
                          constexprs={"MEAN": mean, "BLOCK": AGGREGATE_CONFIG["BLOCK"]},
                          options={"num_warps": AGGREGATE_CONFIG["num_warps"], **LAUNCH_OPTIONS}))
    for p, (shift, bits) in enumerate(RADIX_PASSES):
        specs.append(dict(kernel=_radix_histogram_kernel, tag=f"fp32 pass={p} bits={bits}",
                          signature={"hist_ptr": "*i64", "values_ptr": "*fp32", "state_ptr": "*i64",
                                     "M": "i64", "tiles_per_prog": "i32"},
                          constexprs={"SHIFT": shift, "BITS": bits, "FIRST": p == 0,
                                      "BLOCK": HISTOGRAM_CONFIG["BLOCK"]},
                          options={"num_warps": HISTOGRAM_CONFIG["num_warps"], **LAUNCH_OPTIONS}))
        specs.append(dict(kernel=_radix_select_kernel, tag=f"i64 pass={p} bits={bits}",
                          signature={"state_ptr": "*i64", "hist_ptr": "*i64", "out_ptr": "*fp32"},
                          constexprs={"SHIFT": shift, "BITS": bits, "LAST": p == len(RADIX_PASSES) - 1},
                          options={"num_warps": SELECT_CONFIG["num_warps"], **LAUNCH_OPTIONS}))
    for pos in (False, True):
        specs.append(dict(kernel=_threshold_mask_kernel, tag=f"fp32 positive_only={int(pos)}",
                          signature={"mask_ptr": "*i1", "counts_ptr": "*i64", "values_ptr": "*fp32",
                                     "threshold": "fp32", "D": "i32", "cols_per_prog": "i32"},
                          constexprs={"POSITIVE_ONLY": pos, "BLOCK": THRESHOLD_CONFIG["BLOCK"]},
                          options={"num_warps": THRESHOLD_CONFIG["num_warps"], **LAUNCH_OPTIONS}))
    return specs
