"""The fast KNE edit: a compact delta on the ensemble rows (or columns), merged in place.

Per ensemble module instance with ``K`` neurons, a trainable float32 delta ``dW`` of shape
``[K, in]`` (rows, ``neuron_axis="out"``) or ``[out, K]`` (columns, ``"in"``) enters the forward
as ``y[..., idx] += s * dropout(x) @ dW^T`` (rows) or ``y += s * dropout(x)[..., idx] @ dW^T``
(columns), ``s = alpha / sqrt(K)`` (``rs_scaling``) or ``alpha / K``. No parameter of the model
requires a gradient: backward only forms ``s * dY[:, idx]^T x``, a GEMM the size of the
ensemble, and the AdamW moments are compact too. At the end ``W[idx] = W[idx] + s * dW`` in place;
the original rows are kept so :meth:`EditResult.restore` is bit-exact.
"""

from __future__ import annotations

import math
import pathlib
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import kne_kernels
from kne_kernels.reference import adamw_update_

from ._utils import Timer, frozen, input_device, kernel_backend, logits_at, model_devices, seeded
from .adapters import ModuleSite, get_architecture, resolve_sites
from .config import KNEConfig, resolve_config
from .ensemble import Ensemble, _match_suffix, locate
from .nullspace import edit_bases
from .objective import EditObjective, edit_loss
from .requests import EditRequest, as_requests

__all__ = ["EditError", "EditResult", "fast_edit", "edit_loss", "delta_scale", "initial_delta"]


class EditError(RuntimeError):
    """An edit could not be completed; the model was left exactly as it was."""


def delta_scale(config: KNEConfig, k: int) -> float:
    """``s = alpha / sqrt(K)`` with rs scaling, else ``alpha / K``."""
    return config.alpha / math.sqrt(k) if config.rs_scaling else config.alpha / k


def initial_delta(config: KNEConfig, site: ModuleSite, axis: str, k: int, device) -> torch.Tensor:
    """The compact delta's starting value: zeros, or uniform noise in ``+-bound`` drawn from a
    generator seeded by ``(seed, layer, module)`` so every implementation draws the same numbers.
    ``"kaiming"``: the bound of the dense ``[out, in]`` weight, ``1/sqrt(in_features)``;
    ``"authors"``: the bound ``nn.init.kaiming_uniform_(a=sqrt(5))`` gives the authors' compact
    ``knb_W``, ``1/sqrt(fan_in)``: ``1/sqrt(in_features)`` for rows ``[K, in]``, ``1/sqrt(K)`` for
    columns ``[out, K]``."""
    shape = (k, site.in_features) if axis == "out" else (site.out_features, k)
    if config.delta_init == "zeros":
        return torch.zeros(shape, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(
        (config.seed * 1_000_003 + site.layer * 7919 + zlib.crc32(site.suffix.encode())) % (2**63))
    bound = 1.0 / math.sqrt(site.in_features if config.delta_init == "kaiming" else shape[1])
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound).to(device)


def merged_rows(base: torch.Tensor, scale: float, delta: torch.Tensor) -> torch.Tensor:
    """``base + scale * delta`` in ``base``'s dtype, computed in float32 (float64 for a float64
    model, whose rows are then not rounded to float32)."""
    acc = torch.promote_types(base.dtype, torch.float32)
    return (base.to(acc) + scale * delta.to(acc)).to(base.dtype)


@dataclass
class _Slot:
    """One edited module instance."""

    site: ModuleSite
    idx: torch.Tensor
    scale: float
    delta: torch.Tensor  # fp32 compact delta (trained)
    base: torch.Tensor  # original rows/columns, weight dtype, where the weight lives (what restore() writes)
    base_dev: torch.Tensor  # the same on the module's compute device
    merged: torch.Tensor  # base + scale * delta in the weight dtype, kept current by the optimizer kernel
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    local: torch.Tensor  # arange(K): the optimizer kernel writes all of ``merged``
    idx_dev: torch.Tensor  # idx on the compute device (the forward hook's index)


class EditResult:
    """Outcome of one edit: ``model`` (edited in place), ``ensemble``, ``stats`` and ``restore()``.

    ``stats`` holds ``locate_seconds``, ``edit_seconds``, ``total_seconds``, ``steps`` (optimizer
    steps taken), ``losses`` (the loss before each step, and the one that stopped the loop; with
    ``stop_after_step`` the loop ends after the step that loss took, so one per step),
    ``stopped_early``, ``neurons``, ``params_edited``, ``params_total`` (all model parameters),
    ``param_fraction`` and ``target_param_fraction`` (share of the target modules' parameters).
    """

    def __init__(self, model: nn.Module, ensemble: Ensemble, stats: Dict[str, Any], config: KNEConfig,
                 requests: List[EditRequest], saved: List[Tuple[ModuleSite, int, torch.Tensor, torch.Tensor]]):
        self.model = model
        self.ensemble = ensemble
        self.stats = stats
        self.config = config
        self.requests = requests
        self._saved = saved  # (site, dim, idx, original rows/cols)
        self.restored = False

    def save(self, path) -> "pathlib.Path":
        """Write only what changed (indices, new and original rows, model fingerprint, config) to a
        safetensors file; :func:`kne.apply_edit` / :func:`kne.revert_edit` apply and undo it."""
        from .editfile import save_edit

        return save_edit(self, path)

    def restore(self) -> nn.Module:
        """Put every edited weight back bit for bit (idempotent). Returns the model."""
        if not self.restored:
            for site, dim, idx, base in reversed(self._saved):
                with torch.no_grad():
                    site.weight().index_copy_(dim, idx.to(base.device), base)
            self.restored = True
        return self.model

    def __repr__(self) -> str:
        s = self.stats
        return (f"EditResult(steps={s.get('steps')}, final_loss={s['losses'][-1] if s.get('losses') else None}, "
                f"neurons={s.get('neurons')}, params_edited={s.get('params_edited')}, "
                f"total_seconds={s.get('total_seconds', 0):.3f}, restored={self.restored})")


def _train(objective: Callable[[], Tuple[torch.Tensor, bool]], params: List[torch.Tensor], config: KNEConfig,
           step_fn: Callable[[int, List[torch.Tensor]], None], on_step: Optional[Callable] = None):
    """The edit loop: loss (recorded), non-finite check, stop test, gradient of ``params``, step.

    ``objective()`` runs the forward and returns ``(loss, done)`` (:class:`kne.objective.EditObjective`).
    Runs at most ``config.steps`` steps and records the loss before each, plus the loss after the
    last step (or the one whose stop test ended the loop). With ``config.stop_after_step`` (the
    authors' loop) a passed stop test still takes its step and the loop ends right after it: the
    losses are then one per step, the last the one that passed. ``kne.reference.edit`` writes the
    same loop out with ``torch.optim.AdamW``."""
    losses: List[float] = []
    steps = 0
    stopped = False
    for it in range(config.steps + 1):
        loss, done = objective()
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            raise EditError(f"the edit loss became {value} at step {it}: lower KNEConfig.lr (now {config.lr}) or "
                            "use a float32/bfloat16 model; the model was restored")
        if done and not config.stop_after_step:
            stopped = True
            break
        if it == config.steps:
            stopped = bool(done)
            break
        grads = torch.autograd.grad(loss, params)
        step_fn(it + 1, list(grads))
        steps += 1
        if on_step is not None:
            on_step(steps, value)
        if done:  # stop_after_step: the step on the loss that passed is taken, then the loop ends
            stopped = True
            break
    return losses, steps, stopped


def fast_edit(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None, *,
              ensemble: Optional[Ensemble] = None, on_step: Optional[Callable[[int, float], None]] = None,
              preserve_prompts: Optional[List[str]] = None, **overrides: Any) -> EditResult:
    """Edit ``model`` in place with KNE; returns an :class:`EditResult`.

    Without ``ensemble`` the ensemble is located from ``requests`` (:func:`kne.locate`); with one
    (for instance a dataset-level ensemble from ``kne.locate`` over many requests) its modules,
    layers and ``neuron_axis`` are used as they are. Several requests are edited together (the
    loss is the mean of their per-request losses). The model is left exactly as it was if the edit
    fails or is interrupted (a non-finite loss raises :class:`EditError`).

    With ``preserve_weight > 0`` (``KNEConfig.preset("local")``) the loss also keeps the unedited
    model's next-token distributions on neighbour prompts: ``preserve_prompts`` names them, else
    they are made from each request's ``subject`` (:mod:`kne.preservation`).

    >>> res = kne.fast_edit(model, tok, {"prompt": "The capital of France is", "target_new": "Rome"})
    >>> res.stats["steps"], res.restore()
    """
    cfg = resolve_config(config, overrides)
    reqs = as_requests(requests)
    total = Timer()
    if ensemble is None:
        ensemble = locate(model, tokenizer, reqs, cfg)
        locate_seconds = total()
    else:
        if not isinstance(ensemble, Ensemble):
            raise ValueError(f"ensemble must be a kne.Ensemble (see kne.locate / Ensemble.load), got "
                             f"{type(ensemble).__name__}")
        locate_seconds = 0.0
    axis = ensemble.neuron_axis
    pairs = ensemble.sites(model)
    if not pairs:
        raise EditError("the ensemble is empty: no neuron scored above the percentile threshold; lower "
                        f"KNEConfig.percentile (now {cfg.percentile}) or set positive_only=False")
    timer = Timer()
    objective = EditObjective(tokenizer, reqs, cfg, input_device(model), preserve_prompts)
    dim = 0 if axis == "out" else 1
    slots: List[_Slot] = []
    for site, idx in pairs:
        w = site.weight()  # where the values live (an offloaded module: the offload store)
        dev = site.device  # where the module computes: everything trained lives here
        idx = idx.to(w.device)
        scale = delta_scale(cfg, idx.numel())
        delta = initial_delta(cfg, site, axis, idx.numel(), dev)
        base = w.index_select(dim, idx).detach().clone()
        base_dev = base.to(dev)
        slots.append(_Slot(site=site, idx=idx, scale=scale, delta=delta, base=base, base_dev=base_dev,
                           merged=merged_rows(base_dev, scale, delta).to(w.dtype), exp_avg=torch.zeros_like(delta),
                           exp_avg_sq=torch.zeros_like(delta), local=torch.arange(idx.numel(), device=dev),
                           idx_dev=idx.to(dev)))
    saved = [(s.site, dim, s.idx, s.base) for s in slots]
    deltas = [s.delta.requires_grad_(True) for s in slots]

    def make_hook(slot: _Slot):
        p = cfg.dropout

        def hook(module, args, out):
            x = args[0]
            if p > 0:
                x = F.dropout(x, p=p, training=True)
            d = slot.delta.to(x.dtype)
            if axis == "out":
                return out.index_add(-1, slot.idx_dev, (x @ d.t()) * slot.scale)
            return out + (x.index_select(-1, slot.idx_dev) @ d.t()) * slot.scale

        return hook

    backends = [kernel_backend(cfg, s.delta.device) for s in slots]  # once, not every step
    if cfg.project and axis != "out":
        raise ValueError("KNEConfig.project=True needs a row ensemble (neuron_axis='out'); this ensemble is on "
                         f"axis {axis!r}: locate it with neuron_axis='out' or set project=False")
    bases: List[Optional[torch.Tensor]] = [None] * len(slots)

    def step_fn(step: int, grads: List[torch.Tensor]) -> None:
        # One fused AdamW step per module instance (kne_kernels.ensemble_adamw_step_): updates the
        # compact delta and moments, and rewrites the compact merged rows base + s * delta.
        with torch.no_grad():
            for slot, g, backend in zip(slots, grads, backends):
                if slot.merged.dtype in kne_kernels.FLOAT_DTYPES:
                    kne_kernels.ensemble_adamw_step_(slot.merged, slot.local, g, slot.delta, slot.exp_avg,
                                                     slot.exp_avg_sq, slot.base_dev, step=step, lr=cfg.lr,
                                                     scale=slot.scale, dim=dim, weight_decay=cfg.weight_decay,
                                                     backend=backend)
                else:  # a float64 model: the same step in plain torch (the kernels take fp32/fp16/bf16)
                    adamw_update_(slot.delta, g, slot.exp_avg, slot.exp_avg_sq, step=step, lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
                    slot.merged.copy_(merged_rows(slot.base_dev, slot.scale, slot.delta))
            for slot, basis, backend in zip(slots, bases, backends):
                if basis is not None:  # keep the delta off the preserved keys (kne.nullspace)
                    if slot.merged.dtype in kne_kernels.FLOAT_DTYPES:
                        kne_kernels.nullspace_project_(slot.merged, slot.local, slot.delta, basis, slot.base_dev,
                                                       scale=slot.scale, backend=backend)
                    else:
                        slot.delta.sub_((slot.delta @ basis.to(slot.delta.dtype)) @ basis.to(slot.delta.dtype).t())
                        slot.merged.copy_(merged_rows(slot.base_dev, slot.scale, slot.delta))

    def penalty() -> torch.Tensor:  # ||s * dW||^2 over every edited module instance
        return sum((s.scale * s.delta).pow(2).sum() for s in slots)

    def forward() -> Tuple[torch.Tensor, bool]:
        return objective(logits_at(model, *objective.selection()), penalty)

    handles = []
    merged: List[_Slot] = []
    try:
        with frozen(model), seeded(cfg.seed, model_devices(model)):
            if objective.preservation is not None:  # p_before and the neighbours' keys: the model itself
                with torch.no_grad():
                    keys = objective.capture(lambda *sel: logits_at(model, *sel),
                                             [s.site for s in slots] if cfg.project else ())
                if cfg.project:
                    bases = edit_bases(model, tokenizer, [s.site for s in slots], keys, cfg)
            handles = [s.site.module.register_forward_hook(make_hook(s)) for s in slots]
            losses, steps, stopped = _train(forward, deltas, cfg, step_fn, on_step)
        for h in handles:
            h.remove()
        handles = []
        with torch.no_grad():
            for s in slots:  # merge: W[idx] = base + s * delta, in place
                w = s.site.weight()
                w.index_copy_(dim, s.idx, s.merged.to(w.device))
                merged.append(s)
    except BaseException:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for s in merged:
                s.site.weight().index_copy_(dim, s.idx, s.base)
        raise
    edit_seconds = timer()
    edited = sum(int(s.delta.numel()) for s in slots)
    n_total = sum(p.numel() for p in model.parameters())
    stats = {
        "locate_seconds": locate_seconds,
        "edit_seconds": edit_seconds,
        "total_seconds": total(),
        "steps": steps,
        "losses": losses,
        "stopped_early": stopped,
        "neurons": len(ensemble),
        "params_edited": edited,
        "params_total": n_total,
        "param_fraction": edited / n_total,
        "target_param_fraction": edited / max(1, _target_params(model, ensemble)),
        **objective.stats(),
    }
    for d in deltas:
        d.requires_grad_(False)
    return EditResult(model, ensemble, stats, cfg, reqs, saved)


def _target_params(model: nn.Module, ensemble: Ensemble) -> int:
    """Parameters of the target modules the ensemble was selected from: the layers the config
    scored when known, else the layers the ensemble touches."""
    arch = get_architecture(model)
    layers = ensemble.config.get("layers") if ensemble.config else None
    total = 0
    for suffix, per in ensemble.indices.items():
        name = _match_suffix(model, arch, suffix)
        use = layers if (layers is not None or ensemble.n_layers.get(suffix)) else sorted(per)
        if use is not None and not use:
            continue
        total += sum(site.module.weight.numel() for site in resolve_sites(model, [name], use)[name])
    return total
