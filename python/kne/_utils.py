"""Small shared helpers: frozen parameters, eval mode, seeded RNG, timing."""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, List

import torch
from torch import nn


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter ``requires_grad=False`` inside (so no weight gradient is ever formed),
    the model in eval mode; both restored on exit, whatever happens."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(training)


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
