"""Small assertions shared by the test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch
from torch import nn

import kne

# The authors' setting: what the tests that pass their own lr, steps or percentile edit with (an edit
# given no config takes the local preset, kne.config.DEFAULT_PRESET).
AUTHORS = kne.KNEConfig.preset("authors")

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


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_state_bits(model: nn.Module, snap: Dict[str, torch.Tensor], what: str = "model") -> None:
    """Every tensor of the state dict bit for bit equal to ``snap`` (unlike ``torch.equal``, -0.0 is
    not 0.0 and a NaN's payload counts)."""
    now = model.state_dict()
    assert set(now) == set(snap)
    bad = []
    for k, v in snap.items():
        a = now[k]
        if a.shape != v.shape or a.dtype != v.dtype:
            bad.append(k)
        elif a.is_floating_point():
            if not torch.equal(a.reshape(-1).view(_BITS[a.element_size()]), v.reshape(-1).view(_BITS[v.element_size()])):
                bad.append(k)
        elif not torch.equal(a, v):
            bad.append(k)
    assert not bad, f"{what}: tensors differ bit-wise from the snapshot: {bad[:6]}"


# ---------------------------------------------------------------------------------------------- edit files
EDIT_KINDS = ("index", "new", "orig")


def edit_digest(meta: dict, tensors: Dict[str, torch.Tensor]) -> str:
    """The content digest of a kne.edit/2 or /3 file as its documentation defines it, written out here on
    its own: sha256 of the metadata without 'digest' (JSON, sorted keys, compact separators), then of
    each tensor site by site (index, new, orig) as 'name:dtype:shape' between newlines and its bytes."""
    import hashlib
    import json

    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "digest"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode())
    for s in meta["sites"]:
        for kind in EDIT_KINDS:
            name = f"{s['i']}.{kind}"
            t = tensors[name].contiguous()
            h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def rewrite_edit(src, dst, mutate=None, fmt: str = None):
    """Copy the edit file ``src`` to ``dst`` after ``mutate(meta, tensors)`` (in place), as a file of
    format ``fmt`` (default: the source's). A kne.edit/2 or /3 copy gets a digest that matches its new
    contents (a consistent file with a bad field, as a buggy writer would make it); a kne.edit/1
    copy has neither digest nor value fingerprint (what kne 0.2.0 wrote)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["kne"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if mutate is not None:
        mutate(meta, tensors)
    if isinstance(meta, dict):
        fmt = fmt or meta.get("format")
        meta["format"] = fmt
        if fmt == "kne.edit/1":
            meta.pop("values", None)
            meta.pop("digest", None)
        else:
            try:
                meta["digest"] = {"sha256": edit_digest(meta, tensors)}
            except Exception:  # sites too broken to hash: the field checks refuse the file first
                meta["digest"] = {"sha256": "0" * 64}
    save_file(tensors, str(dst), metadata={"kne": json.dumps(meta)})
    return dst


def cpu_fingerprint() -> str:
    """The CPU as far as float rounding can tell: architecture, model name, torch's kernel
    capability and a digest of the feature flags. The same code gives other last bits on another
    CPU (MKL and torch pick their kernels by it), so bit-for-bit records are kept per fingerprint
    (tests/data/golden_edits.json, tools/golden_edits.py)."""
    import hashlib
    import platform

    name, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and not name:
                    name = value
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    name = name or platform.processor() or "?"
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{platform.machine()} | {name} | {torch.backends.cpu.get_cpu_capability()} | flags {digest}"
