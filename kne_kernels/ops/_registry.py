"""The op registry, built from the op modules of this package (no list to keep in step).

Each public module ``kne_kernels/ops/<module>.py`` declares ``OPS``, a tuple of :class:`OpDef`: one
per dispatcher op ``kne::<name>`` it implements (``ensemble_select`` has three). :func:`registry`
imports every public module of the package, in name order, and collects them; :func:`define`
defines the schemas with ``torch.library`` (namespace ``kne``), registers each pure-torch kernel as
the ``CompositeExplicitAutograd`` default and each fake kernel for ``torch.compile``. The C++
library registers its ``CPU``/``CUDA`` kernels for the same names (``csrc/registration.cpp``).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

NAMESPACE = "kne"


@dataclass(frozen=True)
class OpDef:
    """One dispatcher op ``kne::<name>``.

    ``torch`` is the pure-torch kernel: the default on every device and the reference every other
    kernel is tested against. ``fake`` computes output shapes only. ``selfcheck(impl, ref, device)``
    runs one small case with ``impl`` and ``ref`` (the torch kernel) and returns ``(ok, detail)``:
    the first-use check of a GPU kernel. The Triton launcher, where there is one, is
    ``kne_kernels.triton.<module>.<name without its trailing _>_triton``; the C++ kernels are
    ``kne::cpu::<name>`` / ``kne::cuda::<name>`` in ``csrc/{cpu,cuda}/<module>.{cpp,cu}``.
    """

    name: str
    schema: str
    torch: Callable
    fake: Callable
    selfcheck: Callable
    module: str = ""  # filled in by registry(): the op module's short name

    @property
    def launcher(self) -> str:
        """Name of the Triton launcher in ``kne_kernels.triton.<module>``."""
        return self.name.rstrip("_") + "_triton"


_REGISTRY: Optional[Dict[str, OpDef]] = None
_LIB: Optional[torch.library.Library] = None


def modules() -> Tuple[str, ...]:
    """Short names of the op modules (every public module of ``kne_kernels.ops``), sorted."""
    from .. import ops

    return tuple(sorted(m.name for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith("_")))


def registry() -> Dict[str, OpDef]:
    """``{name: OpDef}`` of every op, collected from the op modules once per process."""
    global _REGISTRY
    if _REGISTRY is None:
        found: Dict[str, OpDef] = {}
        for mod_name in modules():
            mod = importlib.import_module(f"{__package__}.{mod_name}")
            for d in mod.OPS:
                if d.name in found:
                    raise RuntimeError(f"kne::{d.name} is declared by ops.{found[d.name].module} and ops.{mod_name}")
                found[d.name] = OpDef(d.name, d.schema, d.torch, d.fake, d.selfcheck, mod_name)
        _REGISTRY = found
    return _REGISTRY


def define() -> None:
    """Define every schema (once per process) with the torch kernel as the default and the fake."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library(NAMESPACE, "DEF")
    for d in registry().values():
        lib.define(d.name + d.schema)
        lib.impl(d.name, d.torch, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{d.name}", d.fake, lib=lib)
    _LIB = lib


def op(name: str):
    """The dispatcher op ``torch.ops.kne.<name>.default`` (routes by the tensors' device)."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> Tuple[bool, str]:
    """For self-check cases: same shape and dtype, and max |a - b| / max |b| <= ``tol`` (exact
    equality for bool and integer tensors)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if a.dtype == torch.bool or not a.is_floating_point():
        ok = torch.equal(a, b)
        return ok, "" if ok else "values differ"
    err = (a.double() - b.double()).abs().max().item() / max(1e-12, b.double().abs().max().item())
    return err <= tol, f"relative error {err:.2e}"


def generator(seed: int = 1234) -> torch.Generator:
    """A CPU generator for self-check inputs (the same numbers whatever the device)."""
    return torch.Generator(device="cpu").manual_seed(seed)
