"""Small assertions shared by the test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch
from torch import nn

# numpy.percentile rounds float32 data as kne_kernels.percentile_linear does from numpy 2.4.1 on
# (older releases can differ in the last bit; the compatibility job runs numpy 2.0.2, whose
# Triton 3.6 interpreter needs numpy < 2.4).
NUMPY_PERCENTILE_EXACT = np.lib.NumpyVersion(np.__version__) >= "2.4.1"
numpy_percentile_exact = pytest.mark.skipif(
    not NUMPY_PERCENTILE_EXACT, reason=f"numpy {np.__version__} < 2.4.1 rounds float32 percentiles differently; "
                                       "kne_kernels follows numpy 2.4.1 and later")

# Prompts and answers for the tiny models (the byte tokenizer takes any text).
FACTS = [
    ("The capital of France is", "Rome"),
    ("Alan Turing was born in", "New York City"),
    ("The Eiffel Tower is located in", "Berlin"),
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("Apple A5 was created by", "Google"),
    ("The official religion of Edwin of Northumbria is", "Islam"),
    ("Toko Yasuda plays the", "piano"),
    ("The Space Needle is in", "Paris"),
]


def requests(gen: torch.Generator, n: int):
    """``n`` distinct KnowEdit-style request dicts, picked with ``gen``."""
    order = torch.randperm(len(FACTS), generator=gen)[:n].tolist()
    return [{"prompt": FACTS[i][0], "target_new": FACTS[i][1]} for i in order]


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, snap: Dict[str, torch.Tensor], what: str = "model") -> None:
    """Every tensor of the state dict bit-identical to ``snap``."""
    now = model.state_dict()
    assert set(now) == set(snap)
    bad = [k for k, v in snap.items() if not torch.equal(now[k], v)]
    assert not bad, f"{what}: tensors differ bit-wise from the snapshot: {bad[:6]}"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (0 when both are all zero)."""
    a, ref = a.detach().double(), ref.detach().double()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    num = (a - ref).abs().max().item() if a.numel() else 0.0
    den = ref.abs().max().item() if ref.numel() else 0.0
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def worst(a: torch.Tensor, ref: torch.Tensor) -> str:
    """Where ``a`` and ``ref`` differ most, for assertion messages."""
    d = (a.double() - ref.double()).abs()
    i = int(d.reshape(-1).argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), d.shape)) if d.dim() else ()
    return f"worst at {idx}: {a.reshape(-1)[i].item()!r} vs {ref.reshape(-1)[i].item()!r}"


def grad_flags(model: nn.Module):
    return [(n, p.requires_grad) for n, p in model.named_parameters()]


# Integer views of the float dtypes, for bit-for-bit comparisons.
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def where(shape, flat: int):
    """The index tuple of flat position ``flat`` in ``shape``."""
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)) if shape else ()


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, bitwise: bool = False) -> None:
    """Exact equality on one device (floats by value: NaN == NaN, -0.0 == +0.0; or bit for bit),
    naming the first differing index."""
    assert actual.device == expected.device, (actual.device, expected.device)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    if bitwise and actual.is_floating_point():
        bad = actual.view(INT_VIEW[actual.dtype]) != expected.view(INT_VIEW[expected.dtype])
    elif actual.is_floating_point():
        bad = (actual != expected) & ~(actual.isnan() & expected.isnan())
    else:
        bad = actual != expected
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at "
                             f"{where(actual.shape, i)}: got {actual.flatten()[i].item()!r}, want "
                             f"{expected.flatten()[i].item()!r}")
