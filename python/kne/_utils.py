"""Small shared helpers: frozen parameters, eval mode, the edit-local dropout, timing."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ._exclusive import own_thread


def training_flags(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """Every module's own ``training`` flag, for :func:`restore_training`."""
    return [(m, m.training) for m in model.modules()]


def restore_training(flags: List[Tuple[nn.Module, bool]]) -> None:
    """Put back the flags :func:`training_flags` saved, module by module (``model.train(flag)``
    would set one flag on every submodule)."""
    for m, t in flags:
        m.training = t


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside; on exit every module gets back its own ``training`` flag (a model in
    ``train()`` with one submodule in ``eval()`` comes back exactly so), whatever happens."""
    flags = training_flags(model)
    try:
        model.eval()
        yield
    finally:
        restore_training(flags)


@contextlib.contextmanager
def new_folder(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to fill; when the block ends without an exception
    it replaces ``target`` whole (a reader never sees half a folder), else it is removed and
    ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter ``requires_grad=False`` inside (so no weight gradient is ever formed),
    the model in eval mode; both restored on exit (each parameter's flag and each module's own
    ``training`` flag), whatever happens."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with eval_mode(model):
            for p, _ in flags:
                p.requires_grad_(False)
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class EditDropout:
    """Dropout on an edit's delta path, drawn from generators that belong to the edit.

    ``x * bernoulli(1 - p) / (1 - p)``, the mask drawn as ``torch.empty_like(x).bernoulli_(1 - p,
    generator=g)`` from one ``torch.Generator`` per device, each seeded with ``seed`` when the edit
    first draws on that device. That is how torch's CPU ``F.dropout`` draws its mask from the
    global generator, so on CPU the masks are bit for bit those of ``torch.manual_seed(seed)``
    followed by ``F.dropout`` (what kne 0.2.0 did) -- without touching torch's process-wide
    generators: an edit in one thread neither moves nor is moved by any other thread's RNG stream.
    (On CUDA, ``F.dropout`` uses a fused Philox kernel; the masks here come from ``bernoulli_`` on
    the edit's own CUDA generator instead.) ``kne.fast_edit`` and ``kne.reference.edit`` draw one
    mask per hooked module per forward, in the same order, so they see the same masks.
    """

    def __init__(self, p: float, seed: int):
        self.p = float(p)
        self.seed = int(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty_like(x).bernoulli_(keep, generator=self.generator(x.device))
        return x * noise.div_(keep)


def forward_logits(model: nn.Module, batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


_KEEP: dict = {}


def _takes_logits_to_keep(model: nn.Module) -> bool:
    cls = type(model)
    if cls not in _KEEP:
        import inspect

        try:
            _KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            _KEEP[cls] = False
    return _KEEP[cls]


def answer_logits(model: nn.Module, batch) -> torch.Tensor:
    """Logits at the positions that predict the answer tokens, ``[n_answer_tokens, vocab]``.

    The output projection runs only on those positions (``logits_to_keep``, which Hugging Face
    causal LMs take): the prompt positions' logits are never used, and over a 49k vocabulary they
    are a fifth of a small model's forward and backward."""
    return logits_at(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols - 1)


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              pos: torch.Tensor, *, gather: bool = False) -> torch.Tensor:
    """Logits of sequence ``rows[i]`` at position ``pos[i]`` (``[n, vocab]``), the output projection
    run only at the positions asked for (``logits_to_keep``) where the model takes it.

    ``logits_to_keep`` keeps the same positions in every sequence of the batch. With ``gather``
    (many sequences that each need few, different positions, such as neighbour prompts' last
    tokens) the output projection instead gets exactly the ``n`` hidden states asked for: a
    forward pre-hook on the model's output embeddings replaces its input by them."""
    if gather and _takes_logits_to_keep(model) and model.get_output_embeddings() is not None:
        head = model.get_output_embeddings()

        def pick(module, args):
            h = args[0]
            return (h[rows.to(h.device), pos.to(h.device)].unsqueeze(0),) + tuple(args[1:])

        handle = head.register_forward_pre_hook(own_thread(pick))
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=0).logits
        finally:
            handle.remove()
        return logits[0]
    if _takes_logits_to_keep(model):
        keep = torch.unique(pos)  # sorted
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=keep).logits
        return logits[rows, torch.searchsorted(keep, pos)]
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[rows, pos]


def as_int(value, what: str, lo: Optional[int] = None) -> int:
    """``value`` as an int: any integer (Python's, numpy's), never a bool or a float; ``>= lo``."""
    import numbers

    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (lo is not None and value < lo):
        raise ValueError(f"{what}={value!r} is invalid: use an integer" + (f" >= {lo}" if lo is not None else ""))
    return int(value)


def as_float(value, what: str, *, lo: Optional[float] = None, lo_open: bool = False, fix: str = "") -> float:
    """``value`` as a float: any finite real number (Python's, numpy's), never a bool; ``>= lo``
    (``> lo`` with ``lo_open``)."""
    import math
    import numbers

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if not ok:
        raise ValueError(f"{what}={value!r} is invalid: use {fix or 'a finite number'}")
    return float(value)


_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def max_positions(model: nn.Module) -> Optional[Tuple[int, str]]:
    """``(limit, config field)``: the most tokens the model takes in one sequence, read from its
    config (``max_position_embeddings``; GPT-2 and GPT-J: ``n_positions``), or ``None``."""
    cfg = getattr(model, "config", None)
    for field in _POSITION_FIELDS:
        v = getattr(cfg, field, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, getattr(cfg, "attribute_map", {}).get(field, field)  # GPT-2: n_positions
    return None


def input_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings (where input ids must go)."""
    try:
        emb = model.get_input_embeddings()
        return emb.weight.device
    except Exception:  # pragma: no cover - models without input embeddings
        return next(model.parameters()).device


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def kernel_backend(config, device: torch.device):
    """The ``kne_kernels`` backend for ops on the model's tensors on ``device`` under
    ``config.backend``: ``None`` (auto) for ``"auto"``, ``"torch"`` for the torch-only path, or the
    kernel backend named -- which must be live for those tensors: if it is not (``"cuda"`` without a
    GPU, ``"triton"`` on CPU without its interpreter, ``"cpu"`` without the C++ extension), the
    ``RuntimeError`` ``kne_kernels`` raises for it (with the reason) is raised here, before any work;
    a named backend is never silently replaced by another."""
    name = config.backend
    if name == "auto":
        return None
    if name == "torch":
        return "torch"
    from kne_kernels._backends import resolve

    resolve(name, torch.device(device))  # raises kne_kernels' RuntimeError when the backend is not live here
    return name


def selection_backend(config):
    """The backend of the ensemble selection, whose scores kne always keeps on the CPU (whatever
    device the model is on): the named backend where it runs CPU tensors (``cpu``, ``torch``,
    ``triton`` under its interpreter), else auto -- a ``"cuda"`` setting names the kernels of a
    CUDA model's attribution and edit, not of this CPU reduction."""
    import kne_kernels

    name = config.backend
    if name == "auto":
        return None
    return name if kne_kernels.status(name, "cpu")[0] else None


def require_backend(config, devices) -> None:
    """Raise now (``kne_kernels``' error) if ``config.backend`` names a backend that cannot run on
    one of ``devices`` (the devices the model's target modules compute on)."""
    for d in sorted({torch.device(d) for d in devices}, key=str):
        kernel_backend(config, d)
