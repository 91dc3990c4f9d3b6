"""Small shared helpers: frozen parameters, eval mode, seeded RNG, timing."""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, List, Tuple

import torch
from torch import nn


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


def model_devices(model: nn.Module) -> List[torch.device]:
    return sorted({p.device for p in model.parameters()}, key=str)


@contextlib.contextmanager
def seeded(seed: int, devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Seed torch's RNGs inside the block; the caller's RNG state is restored afterwards."""
    cuda = [d.index if d.index is not None else 0 for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=sorted(set(cuda)), enabled=True):
        torch.manual_seed(seed)
        yield


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
              pos: torch.Tensor) -> torch.Tensor:
    """Logits of sequence ``rows[i]`` at position ``pos[i]`` (``[n, vocab]``), the output projection
    run only at the positions asked for (``logits_to_keep``) where the model takes it."""
    if _takes_logits_to_keep(model):
        keep = torch.unique(pos)  # sorted
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=keep).logits
        return logits[rows, torch.searchsorted(keep, pos)]
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[rows, pos]


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
    """The ``kne_kernels`` backend for ops on ``device`` under ``config.backend``: ``None`` (auto)
    for ``"auto"``; ``"torch"`` for the torch-only path; a named kernel backend for the tensors it
    serves (``cpu`` on CPU, ``triton``/``cuda`` on CUDA, ``triton`` also on CPU under its
    interpreter), auto elsewhere (scores, for instance, are reduced on the CPU)."""
    name = config.backend
    if name == "auto":
        return None
    if name == "torch":
        return "torch"
    import kne_kernels

    return name if kne_kernels.status(name, device.type)[0] else None
