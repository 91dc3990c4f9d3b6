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

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import kne_kernels

from ._exclusive import holds_model, own_thread
from ._text import Batch, answer_logprobs, check_lengths, check_tokenizer, encode
from ._utils import (Timer, answer_logits, as_int, frozen, input_device, kernel_backend, max_positions,
                     require_backend)
from .adapters import ModuleSite, check_model, resolve_sites
from .config import KNEConfig, resolve_config
from .ensemble import Ensemble
from .requests import EditRequest, as_requests

__all__ = ["Attribution", "attribute", "locate", "objective_value", "request_batch"]


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
        return Ensemble.from_attribution(self)


def request_batch(tokenizer, requests: Sequence[EditRequest], config: KNEConfig, device) -> Batch:
    return encode(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                  add_special_tokens=config.add_special_tokens, always_space=config.always_space, device=device)


def objective_value(logprobs: torch.Tensor, objective: str) -> torch.Tensor:
    """Sum over answer tokens of ``P`` (``"prob"``) or of ``log P`` (``"logprob"``)."""
    return logprobs.exp().sum() if objective == "prob" else logprobs.sum()


class _Capture:
    """Forward hook on one module site: optional per-row output scaling, keeps what the score needs."""

    def __init__(self, site: ModuleSite, axis: str, alphas: Optional[torch.Tensor], config: KNEConfig):
        self.site, self.axis, self.alphas, self.config = site, axis, alphas, config
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
        # a float64 model: kne_kernels takes fp32/fp16/bf16 only, so its scores are summed here
        wide = act.dtype not in kne_kernels.FLOAT_DTYPES
        if self.axis == "in":
            ct = torch.float64 if wide else torch.float32
            dy = dy.to(ct) @ self.site.weight().to(dy.device, ct)
            act = act.to(ct)
        D = act.shape[-1]
        rows = act.numel() // D  # B * T, whether the model keeps [B, T, D] or flattens to [B*T, D]
        seg = segments.to(act.device).repeat_interleave(rows // segments.numel())
        if wide:  # products and sums in float64, the scores in float32 like every other dtype's
            out = torch.zeros(num_segments, D, dtype=torch.float64, device=act.device)
            out.index_add_(0, seg, act.reshape(-1, D) * dy.reshape(-1, D).double())
            return (out * weight_scale).float()
        return kne_kernels.neuron_attribution(act.reshape(-1, D).contiguous(), dy.reshape(-1, D).contiguous(),
                                              segments=seg, num_segments=num_segments, scale=weight_scale,
                                              backend=kernel_backend(self.config, act.device))


def _run_pass(model, batch: Batch, captures: List[_Capture], objective: str) -> List[torch.Tensor]:
    handles = [c.site.module.register_forward_hook(own_thread(c)) for c in captures]
    try:
        obj = objective_value(answer_logprobs(answer_logits(model, batch), batch), objective)
        ys = [c.y for c in captures]
        if any(y is None for y in ys):
            raise RuntimeError("a target module did not run in the forward pass (is it used by the model?)")
        grads = torch.autograd.grad(obj, ys, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [torch.zeros_like(y) if g is None else g for y, g in zip(ys, grads)]


class _PrefixCache:
    """Decoder-layer outputs of the unscaled model for one copy of a batch.

    A layerwise IG pass scales layer ``l`` only, so layers below it compute exactly what the model
    itself computes: :meth:`skip_below` makes layers ``0 .. l-2`` pass their input through and
    layer ``l-1`` return its cached output (repeated for the ``m`` copies), so the pass starts at
    layer ``l``. Works for every model whose decoder layers return a tensor; for others it does
    nothing (the pass then runs the whole model, which is merely slower).
    """

    def __init__(self, model: nn.Module, batch: Batch):
        from .adapters import get_architecture

        self.layers = model.get_submodule(get_architecture(model).layers)
        self.outputs: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.ok = True

        def keep(i):
            def hook(module, args, out):
                if isinstance(out, torch.Tensor):
                    self.outputs[i] = out.detach()
                else:
                    self.ok = False
            return hook

        handles = [layer.register_forward_hook(own_thread(keep(i))) for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                answer_logits(model, batch)
        finally:
            for h in handles:
                h.remove()
        self.ok = self.ok and all(o is not None for o in self.outputs)

    @contextlib.contextmanager
    def skip_below(self, layer: int, copies: int):
        if not self.ok or layer == 0:
            yield
            return
        cached = self.outputs[layer - 1].repeat(copies, *([1] * (self.outputs[layer - 1].dim() - 1)))

        def passthrough(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        def replay(*args, **kwargs):
            return cached

        saved = []
        try:
            for i in range(layer):
                mod = self.layers[i]
                saved.append((mod, mod.__dict__.get("forward")))  # keep an instance-level forward (accelerate)
                mod.forward = replay if i == layer - 1 else passthrough
            yield
        finally:
            for mod, prev in saved:
                if prev is None:
                    del mod.forward
                else:
                    mod.forward = prev


def _length_order(tokenizer, reqs: Sequence[EditRequest], config: KNEConfig) -> List[int]:
    """Request indices sorted by token length, so chunks pad little."""
    from ._text import join

    lens = [len(tokenizer(join(r.prompt, r.target_new, always_space=config.always_space),
                          add_special_tokens=config.add_special_tokens)["input_ids"])
            for r in reqs]
    return sorted(range(len(reqs)), key=lambda i: lens[i])


@holds_model("kne.attribute")
def attribute(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None, *,
              batch_size: int = 16, progress: Optional[bool] = None, **overrides: Any) -> Attribution:
    """Score every neuron of the target modules for each request (fast path).

    Returns an :class:`Attribution` whose ``scores[name]`` is float32 ``[R, L, D]`` with ``R`` the
    number of requests, ``L`` the number of scored layers and ``D`` the neurons per module
    (``out_features`` for ``neuron_axis="out"``, ``in_features`` for ``"in"``). The score of a
    neuron is ``sum over its weights of W * (1/m) sum_k dP(x; a_k W)/dW`` -- computed without
    weight gradients (see the module docstring). The model is not modified.

    Requests run in padded batches of ``batch_size`` (sorted by length); ``progress`` shows a
    progress bar and the throughput (default: when there is more than one batch).
    """
    cfg = resolve_config(config, overrides)
    check_tokenizer(tokenizer)
    cfg = check_model(model, cfg)  # loaded weights, layers of this model, no shared module
    reqs = as_requests(requests)
    batch_size = as_int(batch_size, "batch_size", 1)
    timer = Timer()
    sites = resolve_sites(model, cfg.target_modules, cfg.layers, cfg.exclude_edge_layers)
    require_backend(cfg, [s.device for ss in sites.values() for s in ss])
    check_lengths(tokenizer, [(r.prompt, r.target_new) for r in reqs], max_positions(model), cfg.add_special_tokens)
    layers = tuple(s.layer for s in next(iter(sites.values())))
    R, m = len(reqs), cfg.ig_steps
    # Scores live on the CPU: with a model spread over devices each site reports from its own.
    scores = {name: torch.zeros(R, len(ss), ss[0].num_neurons(cfg.neuron_axis), dtype=torch.float32)
              for name, ss in sites.items()}
    flat = [(name, li, s) for name, ss in sites.items() for li, s in enumerate(ss)]
    order = _length_order(tokenizer, reqs, cfg) if R > batch_size else list(range(R))
    chunks = [order[i:i + batch_size] for i in range(0, R, batch_size)]
    show = len(chunks) > 1 if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=R, desc="attribute", unit="req", file=sys.stderr)
    passes = 0
    device = input_device(model)
    with frozen(model):
        for chunk in chunks:
            B = len(chunk)
            idx = torch.tensor(chunk)
            batch = request_batch(tokenizer, [reqs[i] for i in chunk], cfg, device)
            seg_one = torch.arange(B)
            if m == 1:
                # a_1 = 1: the path is the model itself, layerwise and joint coincide -- one pass.
                caps = [_Capture(s, cfg.neuron_axis, None, cfg) for _, _, s in flat]
                grads = _run_pass(model, batch, caps, cfg.objective)
                passes += 1
                for (name, li, _), c, g in zip(flat, caps, grads):
                    scores[name][idx, li] = c.score(g, seg_one, B, 1.0).cpu()
            else:
                big = batch.repeat(m)
                alphas = torch.arange(1, m + 1, dtype=torch.float32).repeat_interleave(B) / m
                seg = seg_one.repeat(m)
                if cfg.ig_path == "joint":
                    groups = [flat]
                    prefix = None
                else:
                    groups = [[f] for f in flat]
                    prefix = _PrefixCache(model, batch)
                for group in groups:
                    caps = [_Capture(s, cfg.neuron_axis, alphas, cfg) for _, _, s in group]
                    skip = prefix.skip_below(group[0][2].layer, m) if prefix else contextlib.nullcontext()
                    with skip:
                        grads = _run_pass(model, big, caps, cfg.objective)
                    passes += 1
                    for (name, li, _), c, g in zip(group, caps, grads):
                        scores[name][idx, li] = c.score(g, seg, B, 1.0 / m).cpu()
            if bar is not None:
                bar.update(B)
    seconds = timer()
    if bar is not None:
        bar.close()
        print(f"attribute: {R} requests in {seconds:.1f} s ({R / seconds:.2f} requests/s)", file=sys.stderr)
    suffixes = {name: ss[0].suffix for name, ss in sites.items()}
    return Attribution(scores=scores, layers=layers, suffixes=suffixes,
                       config=cfg, requests=reqs, seconds=seconds, passes=passes)


def locate(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None, *, batch_size: int = 16,
           progress: Optional[bool] = None, **overrides: Any) -> Ensemble:
    """Attribute (:func:`kne.attribute`) and keep the neurons above the global percentile.

    One ensemble for all ``requests`` (scores aggregated over requests with ``config.aggregate``):
    with many requests this is the authors' dataset-level ensemble, reusable for every edit.
    ``batch_size`` and ``progress`` are passed to :func:`kne.attribute`.
    """
    return Ensemble.from_attribution(attribute(model, tokenizer, requests, resolve_config(config, overrides),
                                               batch_size=batch_size, progress=progress))
