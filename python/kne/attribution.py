"""Fast gradient attribution of FFN neurons (no weight gradients).

For a linear module ``y = a x W^T + b`` on the integrated-gradient path (weight scaled by ``a``),
``dP/dW = sum_t dy_t^T x_t``; hence, per output neuron (row) ``i``
``sum_j W_ij dP/dW_ij = sum_t dy_ti z_ti`` with ``z = x W^T``, and per input neuron (column) ``j``
``sum_i W_ij dP/dW_ij = sum_t x_tj (dy_t W)_j``. Every score is a reduction over tokens of an
activation times a gradient that forward and backward already hold: forward hooks keep ``z`` (or
``x``), ``torch.autograd.grad`` returns ``dy`` at the module outputs, and no parameter ever
requires a gradient. The ``m`` IG steps run as one batch of ``m`` copies, the module output of
copy ``k`` scaled by ``a_k = k/m`` (right Riemann sum, weights ``1/m``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import kne_kernels

from ._text import Batch, answer_logprobs, encode
from ._utils import Timer, forward_logits, frozen, input_device
from .adapters import ModuleSite, resolve_sites
from .config import KNEConfig, resolve_config
from .requests import EditRequest, as_requests

__all__ = ["Attribution", "attribute", "objective_value", "request_batch"]


@dataclass
class Attribution:
    """Neuron scores of one attribution run.

    ``scores[name]`` is float32 ``[n_requests, n_layers, n_neurons]`` for every target module name
    of the config (alias or suffix, as given); ``layers`` the decoder layer of each row;
    ``suffixes[name]`` the module path inside a layer (``mlp.down_proj``).
    """

    scores: Dict[str, torch.Tensor]
    layers: Tuple[int, ...]
    suffixes: Dict[str, str]
    config: KNEConfig
    requests: List[EditRequest]
    seconds: float = 0.0
    passes: int = 0

    def select(self):
        """The ensemble these scores give under the config's percentile rule."""
        from .ensemble import Ensemble

        return Ensemble.from_attribution(self)


def request_batch(tokenizer, requests: Sequence[EditRequest], config: KNEConfig, device) -> Batch:
    return encode(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                  add_special_tokens=config.add_special_tokens, device=device)


def objective_value(logprobs: torch.Tensor, objective: str) -> torch.Tensor:
    """Sum over answer tokens of ``P`` (``"prob"``) or of ``log P`` (``"logprob"``)."""
    return logprobs.exp().sum() if objective == "prob" else logprobs.sum()


class _Capture:
    """Forward hook on one module site: optional per-row output scaling, keeps what the score needs."""

    def __init__(self, site: ModuleSite, axis: str, alphas: Optional[torch.Tensor]):
        self.site, self.axis, self.alphas = site, axis, alphas
        self.act: Optional[torch.Tensor] = None  # z (axis "out") or x (axis "in")
        self.y: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        bias = self.site.bias
        x = args[0]
        z = out - bias if bias is not None else out
        self.act = (z if self.axis == "out" else x).detach()
        y = out
        if self.alphas is not None:
            # One alpha per sequence. Some models (OPT) flatten [B, T, D] to [B*T, D] around the FFN:
            # view the output sequence-major as [B, tokens, D] to scale it.
            B = self.alphas.numel()
            a = self.alphas.to(device=out.device, dtype=out.dtype).view(B, 1, 1)
            zs = (z.reshape(B, -1, z.shape[-1]) * a).reshape(z.shape)
            y = zs + bias if bias is not None else zs
        if not y.requires_grad:
            y = y.detach().requires_grad_(True)
        self.y = y
        return y

    def score(self, dy: torch.Tensor, segments: torch.Tensor, num_segments: int, weight_scale: float) -> torch.Tensor:
        """``[num_segments, D]`` float32: ``weight_scale * sum over tokens of act * dy`` per segment."""
        act = self.act
        if self.axis == "in":
            dy = dy.float() @ self.site.weight().float()
            act = act.float()
        D = act.shape[-1]
        rows = act.numel() // D  # B * T, whether the model keeps [B, T, D] or flattens to [B*T, D]
        seg = segments.to(act.device).repeat_interleave(rows // segments.numel())
        return kne_kernels.neuron_attribution(act.reshape(-1, D), dy.reshape(-1, D), segments=seg,
                                              num_segments=num_segments, scale=weight_scale)


def _run_pass(model, batch: Batch, captures: List[_Capture], objective: str) -> List[torch.Tensor]:
    handles = [c.site.module.register_forward_hook(c) for c in captures]
    try:
        logits = forward_logits(model, batch)
        obj = objective_value(answer_logprobs(logits, batch), objective)
        ys = [c.y for c in captures]
        if any(y is None for y in ys):
            raise RuntimeError("a target module did not run in the forward pass (is it used by the model?)")
        grads = torch.autograd.grad(obj, ys, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [torch.zeros_like(y) if g is None else g for y, g in zip(ys, grads)]


def attribute(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None,
              **overrides: Any) -> Attribution:
    """Score every neuron of the target modules for each request (fast path).

    Returns an :class:`Attribution` whose ``scores[name]`` is float32 ``[R, L, D]`` with ``R`` the
    number of requests, ``L`` the number of scored layers and ``D`` the neurons per module
    (``out_features`` for ``neuron_axis="out"``, ``in_features`` for ``"in"``). The score of a
    neuron is ``sum over its weights of W * (1/m) sum_k dP(x; a_k W)/dW`` -- computed without
    weight gradients (see the module docstring). The model is not modified.
    """
    cfg = resolve_config(config, overrides)
    reqs = as_requests(requests)
    timer = Timer()
    sites = resolve_sites(model, cfg.target_modules, cfg.layers)
    layers = tuple(s.layer for s in next(iter(sites.values())))
    R, m = len(reqs), cfg.ig_steps
    # Scores live on the CPU: with a model spread over devices each site reports from its own.
    scores = {name: torch.zeros(R, len(ss), ss[0].num_neurons(cfg.neuron_axis), dtype=torch.float32)
              for name, ss in sites.items()}
    flat = [(name, li, s) for name, ss in sites.items() for li, s in enumerate(ss)]
    batch = request_batch(tokenizer, reqs, cfg, input_device(model))
    seg_one = torch.arange(R)
    passes = 0
    with frozen(model):
        if m == 1:
            # a_1 = 1: the path is the model itself, layerwise and joint coincide -- one pass.
            caps = [_Capture(s, cfg.neuron_axis, None) for _, _, s in flat]
            grads = _run_pass(model, batch, caps, cfg.objective)
            passes += 1
            for (name, li, _), c, g in zip(flat, caps, grads):
                scores[name][:, li] = c.score(g, seg_one, R, 1.0).cpu()
        else:
            big = batch.repeat(m)
            alphas = torch.arange(1, m + 1, dtype=torch.float32).repeat_interleave(R) / m
            seg = seg_one.repeat(m)
            groups = [flat] if cfg.ig_path == "joint" else [[f] for f in flat]
            for group in groups:
                caps = [_Capture(s, cfg.neuron_axis, alphas) for _, _, s in group]
                grads = _run_pass(model, big, caps, cfg.objective)
                passes += 1
                for (name, li, _), c, g in zip(group, caps, grads):
                    scores[name][:, li] = c.score(g, seg, R, 1.0 / m).cpu()
    suffixes = {name: ss[0].suffix for name, ss in sites.items()}
    return Attribution(scores=scores, layers=layers, suffixes=suffixes,
                       config=cfg, requests=reqs, seconds=timer(), passes=passes)
