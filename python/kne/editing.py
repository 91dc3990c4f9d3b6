"""The fast KNE edit: a compact delta on the ensemble rows (or columns), merged in place.

Per ensemble module instance with ``K`` neurons, a trainable float32 delta ``dW`` of shape
``[K, in]`` (rows, ``neuron_axis="out"``) or ``[out, K]`` (columns, ``"in"``) enters the forward
as ``y[..., idx] += s * dropout(x) @ dW^T`` (rows) or ``y += s * dropout(x)[..., idx] @ dW^T``
(columns), ``s = alpha / sqrt(K)`` (``rs_scaling``) or ``alpha / K``. No parameter of the model
requires a gradient: backward only forms ``s * dY[:, idx]^T x``, a GEMM the size of the
ensemble, and the optimizer state (AdamW's moments, or the momentum of ``optimizer="ngd"``) is
compact too. At the end ``W[idx] = W[idx] + s * dW`` in place;
the original rows are kept so :meth:`EditResult.restore` is bit-exact.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

import kne_kernels
from kne_kernels import adamw_update_

from ._exclusive import holds_model, own_thread, writing
from ._guard import undo_writes
from ._text import check_lengths, check_tokenizer
from ._utils import EditDropout, Timer, frozen, input_device, kernel_backend, logits_at, max_positions, require_backend
from .adapters import ModuleSite, check_model, distinct_sites, get_architecture, num_layers, resolve_sites
from .attribution import locate
from .config import KNEConfig, describe, edit_config
from .ensemble import Ensemble, _match_suffix
from .nullspace import edit_bases, kept_texts
from .objective import EditObjective, collapse, edit_loss, prompt_predictions, runaway_loss
from .requests import EditRequest, as_requests
from .result import EditError, EditResult

__all__ = ["EditError", "EditResult", "fast_edit", "edit_loss", "delta_scale", "initial_delta"]


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
    exp_avg: torch.Tensor  # AdamW's first moment, or ngd's momentum
    exp_avg_sq: torch.Tensor  # AdamW's second moment (empty under ngd, which has none)
    local: torch.Tensor  # arange(K): the optimizer kernel writes all of ``merged``
    idx_dev: torch.Tensor  # idx on the compute device (the forward hook's index)


def ngd_update_(deltas: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor], *, lr: float,
                momentum: float) -> None:
    """One step of normalised gradient descent with momentum (``KNEConfig.optimizer="ngd"``) on
    several tensors together, in place: ``m = momentum * m + g / ||g||``, then ``delta -= lr * m /
    ||m||``, both norms the Frobenius norm over every tensor of the list (each tensor's norm taken
    in float64). Every step moves the deltas by exactly ``lr`` along the momentum of the gradient's
    direction: a change spread over the ensemble as the gradient spreads it (AdamW's
    per-coordinate steps move coordinates with a tiny gradient as far as the others). A zero
    gradient adds nothing to the momentum (which still decays by ``momentum``): the norms are
    clamped at float32's smallest normal number, so no step waits on the host to test them, and a
    zero momentum moves nothing.

    >>> d, g, m = [torch.zeros(2)], [torch.tensor([3.0, 4.0])], [torch.zeros(2)]
    >>> ngd_update_(d, g, m, lr=0.5, momentum=0.9)
    >>> d[0]
    tensor([-0.3000, -0.4000])
    """
    tiny = torch.finfo(torch.float32).tiny
    home = deltas[0].device

    def joint_norm(ts: List[torch.Tensor]) -> torch.Tensor:
        norms = [torch.linalg.vector_norm(t, dtype=torch.float64).to(home) for t in ts]
        return torch.stack(norms).norm().clamp_min(tiny)

    gn = joint_norm(grads)
    for b, g in zip(bufs, grads):
        b.mul_(momentum).add_(g / gn.to(g.device, b.dtype))
    mn = joint_norm(bufs)
    for d, b in zip(deltas, bufs):
        d.sub_(b / mn.to(b.device, b.dtype), alpha=lr)  # |b| <= mn: no overflow when both are 0


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


def check_call(model: nn.Module, tokenizer, requests, cfg: KNEConfig, ensemble, preserve_prompts) -> List[EditRequest]:
    """The checks of an edit call that need no forward pass, before any work: the tokenizer, the
    requests (validated again), the ensemble's type, ``preserve_prompts``, and every text against
    the model's maximum positions. Returns the validated requests."""
    check_tokenizer(tokenizer)
    reqs = as_requests(requests)
    if ensemble is not None and not isinstance(ensemble, Ensemble):
        raise ValueError(f"ensemble must be a kne.Ensemble (see kne.locate / Ensemble.load), got "
                         f"{type(ensemble).__name__}")
    texts = [(r.prompt, r.target_new) for r in reqs]
    if preserve_prompts is not None:
        if isinstance(preserve_prompts, str) or not all(isinstance(p, str) and p.strip() for p in preserve_prompts):
            raise ValueError("preserve_prompts must be a list of non-empty prompt strings")
        texts += [(p, None) for p in preserve_prompts]
    check_lengths(tokenizer, texts, max_positions(model), cfg.add_special_tokens)
    return reqs


def check_keep(keep, tokenizer, cfg: KNEConfig) -> List[Tuple[List[int], int, int]]:
    """``keep`` of an edit call, checked before any work: ``[]`` for ``None``, else the token
    sequences whose keys the projection keeps (:func:`kne.nullspace.kept_texts`); needs
    ``project``."""
    if keep is None:
        return []
    if not cfg.project:
        raise ValueError("keep= needs the null-space projection: set KNEConfig.project=True (KNEConfig.preset('local')) "
                         "or drop keep")
    return kept_texts(keep, tokenizer, cfg)


@holds_model("kne.fast_edit")
def fast_edit(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None, *,
              ensemble: Optional[Ensemble] = None, on_step: Optional[Callable[[int, float], None]] = None,
              preserve_prompts: Optional[List[str]] = None, keep=None, state=None, **overrides: Any) -> EditResult:
    """Edit ``model`` in place with KNE; returns an :class:`EditResult`.

    ``config`` (a :class:`KNEConfig`) and ``overrides`` (its fields by name) give the settings;
    with no config the base is ``KNEConfig.preset("local")``, edits that keep what the model knows
    (``KNEConfig.preset("authors")`` is the paper's setting; ``res.stats["preset"]`` says which).

    Without ``ensemble`` the ensemble is located from ``requests`` (:func:`kne.locate`); with one
    (for instance a dataset-level ensemble from ``kne.locate`` over many requests) its modules,
    layers and ``neuron_axis`` are used as they are. Several requests are edited together (the
    loss is the mean of their per-request losses). The model is left exactly as it was if the edit
    fails or is interrupted. A runaway edit raises :class:`EditError` and writes nothing (or puts
    back what it wrote): a non-finite loss or merged row, an answer loss that ends more than 1%
    above where it started, or a next-token distribution on the edit prompt that collapsed to one
    token.

    One model, one call at a time: a second kne call that changes this model, from another thread,
    raises ``kne.ModelBusyError`` at once. Forwards in other threads during the edit see the model
    without the edit, and wait during the merge (``docs/robustness.md``).

    All or nothing: every input is checked against the model before any work (requests, config,
    tokenizer, text lengths, the ensemble's layers, indices and shapes, the kernel backend); the
    weights are written only at the end, in one merge, after every statistic is computed; an
    exception or a ``KeyboardInterrupt`` at any point (locate, the preservation capture, an
    optimizer step, the merge) leaves the model bit for bit as it was -- a merge that fails
    half-way is put back -- or the call returns its complete result.

    With ``preserve_weight > 0`` (``KNEConfig.preset("local")``) the loss also keeps the unedited
    model's next-token distributions on neighbour prompts: ``preserve_prompts`` names them, else
    they are made from each request's ``subject`` (:mod:`kne.preservation`).

    ``keep`` (with ``project``; sequential editing): earlier edits (:class:`EditResult`) and
    prompt strings whose keys the projection keeps too -- an earlier edit's ``prompt + answer`` at
    ``config.keep_positions`` and the last token of each neighbour it kept, read from the model as
    it is now, cut at ``config.keep_rtol`` -- so this edit disturbs them as little as the key
    space allows (AlphaEdit's rule for sequential edits; :class:`kne.Editor` keeps a whole run's
    edits without re-reading them). ``state`` (with ``project``): a
    :class:`kne.nullspace.KeySketch` of the keys kept so far, joined the same way (what
    :class:`kne.Editor` passes). With ``keep``
    or ``state``, an edit whose every module instance has its whole key space kept cannot move:
    :class:`kne.CapacityError` before any step.

    >>> res = kne.fast_edit(model, tok, {"prompt": "The capital of France is", "target_new": "Rome"})
    >>> res.stats["steps"], res.restore()
    """
    cfg = edit_config(config, overrides)
    reqs = check_call(model, tokenizer, requests, cfg, ensemble, preserve_prompts)
    cfg = check_model(model, cfg)  # loaded weights, layers of this model, no shared module
    held = check_keep(keep, tokenizer, cfg)
    check_state(state, cfg)
    total = Timer()
    if ensemble is None:
        ensemble = locate(model, tokenizer, reqs, cfg)
        locate_seconds = total()
    else:
        locate_seconds = 0.0
    axis = ensemble.neuron_axis
    pairs = ensemble.sites(model)
    distinct_sites(site for site, _ in pairs)
    if not pairs:
        raise EditError("the ensemble is empty: no neuron scored above the percentile threshold; lower "
                        f"KNEConfig.percentile (now {cfg.percentile}) or set positive_only=False")
    require_backend(cfg, [site.device for site, _ in pairs])
    if cfg.project and axis != "out":
        raise ValueError("KNEConfig.project=True needs a row ensemble (neuron_axis='out'); this ensemble is on "
                         f"axis {axis!r}: locate it with neuron_axis='out' or set project=False")
    target_params = _target_params(model, ensemble)  # checks the ensemble's own layers against the model
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
                           exp_avg_sq=torch.zeros_like(delta) if cfg.optimizer == "adamw" else delta.new_empty(0),
                           local=torch.arange(idx.numel(), device=dev),
                           idx_dev=idx.to(dev)))
    saved = [(s.site, dim, s.idx, s.base) for s in slots]
    deltas = [s.delta.requires_grad_(True) for s in slots]

    dropout = EditDropout(cfg.dropout, cfg.seed)  # the edit's own generators: no global RNG is touched

    def make_hook(slot: _Slot):
        def hook(module, args, out):
            x = dropout(args[0])
            d = slot.delta.to(x.dtype)
            if axis == "out":
                return out.index_add(-1, slot.idx_dev, (x @ d.t()) * slot.scale)
            return out + (x.index_select(-1, slot.idx_dev) @ d.t()) * slot.scale

        return hook

    backends = [kernel_backend(cfg, s.delta.device) for s in slots]  # once, not every step
    bases: List[Optional[torch.Tensor]] = [None] * len(slots)

    survived = [0.0, 0.0]  # with a projection: sum over steps of |step after| and |step before| it

    def step_fn(step: int, grads: List[torch.Tensor]) -> None:
        # One fused AdamW step per module instance (kne_kernels.ensemble_adamw_step_): updates the
        # compact delta and moments, and rewrites the compact merged rows base + s * delta. With
        # optimizer "ngd" the step (ngd_update_) is plain torch on the compact deltas, then the same rewrite.
        with torch.no_grad():
            prev = [s.delta.clone() if b is not None else None for s, b in zip(slots, bases)]
            if cfg.optimizer == "ngd":  # the step needs the norm over every slot: plain torch ops, then the merge
                ngd_update_([s.delta for s in slots], grads, [s.exp_avg for s in slots], lr=cfg.lr,
                            momentum=cfg.ngd_momentum)
                for slot in slots:
                    slot.merged.copy_(merged_rows(slot.base_dev, slot.scale, slot.delta))
            else:
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
            raw = [float((s.delta - p).pow(2).sum()) for s, p in zip(slots, prev) if p is not None]
            for slot, basis, backend in zip(slots, bases, backends):
                if basis is not None:  # keep the delta off the preserved keys (kne.nullspace)
                    if slot.merged.dtype in kne_kernels.FLOAT_DTYPES:
                        kne_kernels.nullspace_project_(slot.merged, slot.local, slot.delta, basis, slot.base_dev,
                                                       scale=slot.scale, backend=backend)
                    else:
                        slot.delta.sub_((slot.delta @ basis.to(slot.delta.dtype)) @ basis.to(slot.delta.dtype).t())
                        slot.merged.copy_(merged_rows(slot.base_dev, slot.scale, slot.delta))
            if raw:
                kept = [float((s.delta - p).pow(2).sum()) for s, p in zip(slots, prev) if p is not None]
                survived[0] += math.sqrt(sum(kept))
                survived[1] += math.sqrt(sum(raw))

    def penalty() -> torch.Tensor:  # ||s * dW||^2 over every edited module instance
        return sum((s.scale * s.delta).pow(2).sum() for s in slots)

    def forward() -> Tuple[torch.Tensor, bool]:  # a batch with neighbours: the output projection on what is read
        return objective(logits_at(model, *objective.selection(), gather=objective.kl_on), penalty)

    handles = []
    written = []  # (path, weight, dim, index, rows before): what an undo puts back
    try:
        with frozen(model):
            if objective.preservation is not None:  # p_before and the neighbours' keys: the model itself
                with torch.no_grad():
                    keys = objective.capture(lambda *sel: logits_at(model, *sel, gather=True),
                                             [s.site for s in slots] if cfg.project else ())
                if cfg.project:  # with the earlier edits' keys (keep=), read from the model as it is now
                    bases = edit_bases(model, tokenizer, [s.site for s in slots], keys, cfg, kept=held, state=state)
                    if state is not None or held:  # earlier edits' keys: a full key space is said, not run
                        check_capacity([s.site for s in slots], bases, cfg)
            before = prompt_predictions(model, objective.edit_batch)  # for the collapse check after the merge
            handles = [s.site.module.register_forward_hook(own_thread(make_hook(s))) for s in slots]
            losses, steps, stopped = _train(forward, deltas, cfg, step_fn, on_step)
        for h in handles:
            h.remove()
        handles = []
        for d in deltas:
            d.requires_grad_(False)
        # Every statistic before the first write: after the merge only the clock is read.
        edited = sum(int(s.delta.numel()) for s in slots)
        n_total = sum(p.numel() for p in model.parameters())
        stats = {
            "preset": describe(cfg),
            "steps": steps,
            "losses": losses,
            "stopped_early": stopped,
            "neurons": len(ensemble),
            "params_edited": edited,
            "params_total": n_total,
            "param_fraction": edited / n_total,
            "target_param_fraction": edited / max(1, target_params),
            **objective.stats(),
        }
        if keep is not None:
            stats["kept_sequences"] = len(held)
        if survived[1] > 0:  # how much of the optimizer's steps the projection let through
            stats["step_survived"] = survived[0] / survived[1]
        refuse_runaway(cfg, stats["edit_losses"], steps, [(s.site.path, s.merged) for s in slots])
        with torch.no_grad(), writing(model):  # other threads' forwards wait: none sees a half merge
            try:
                for s in slots:  # the merge, the only write: W[idx] = base + s * delta, in place
                    w = s.site.weight()
                    written.append((s.site.path, w, dim, s.idx, s.base))  # first: a write that fails half-way is undone
                    w.index_copy_(dim, s.idx, s.merged.to(w.device))
                with frozen(model):
                    why = collapse(before, prompt_predictions(model, objective.edit_batch), tokenizer)
                if why:
                    raise EditError(runaway_message(why, cfg))
            except BaseException as e:
                undo_writes(written, "kne.fast_edit", e)
                written = []
                raise
        stats = {"locate_seconds": locate_seconds, "edit_seconds": timer(), "total_seconds": total(), **stats}
        result = EditResult(model, ensemble, stats, cfg, reqs, saved, method="kne.fast_edit")
    except BaseException as e:
        for h in handles:
            h.remove()
        if written:
            undo_writes(written, "kne.fast_edit", e)
        raise
    return result


def check_state(state, cfg: KNEConfig) -> None:
    """``state`` of an edit call: ``None`` or a :class:`kne.nullspace.KeySketch`, with ``project``."""
    if state is None:
        return
    from .nullspace import KeySketch

    if not isinstance(state, KeySketch):
        raise ValueError(f"state must be a kne.nullspace.KeySketch (what kne.Editor keeps), got {type(state).__name__}")
    if not cfg.project:
        raise ValueError("state= needs the null-space projection: set KNEConfig.project=True "
                         "(KNEConfig.preset('local')) or drop state")


def capacity_options(cfg: KNEConfig) -> str:
    """What to do when the kept keys leave an edit no room (named by every capacity error)."""
    return (f"edit several facts in one call (a batch: Editor.edit([...]) spends the key space once for all), raise "
            f"KNEConfig.keep_rtol (now {cfg.keep_rtol:g}) so fewer weak key directions are kept, lower the sketch "
            "rank (Editor(sketch_rank=...)), or edit other layers (KNEConfig.layers)")


def check_capacity(sites: List[ModuleSite], bases: List[Optional[torch.Tensor]], cfg: KNEConfig) -> None:
    """:class:`kne.CapacityError` when the preserved keys span the whole key space of every edited
    module instance: the projection would take every step back, so the edit cannot move."""
    from .result import CapacityError

    if not sites or any(b is None or b.shape[1] < s.in_features for s, b in zip(sites, bases)):
        return
    occ = {s.path: b.shape[1] / s.in_features for s, b in zip(sites, bases)}
    raise CapacityError(f"the kept keys span the whole key space of all {len(sites)} module instance(s) this edit "
                        f"would change ({sites[0].path}: {bases[0].shape[1]} of {sites[0].in_features} directions), "
                        f"so no step can move it; the model was left as it was. To go on: {capacity_options(cfg)}",
                        occ)


def runaway_message(why: str, cfg: KNEConfig) -> str:
    return (f"{why}; the edit was refused and the model left as it was. Lower the step size (lr={cfg.lr:g}, "
            f"optimizer {cfg.optimizer}; alpha={cfg.alpha:g}): the presets' values are in docs/usage.md")


def refuse_runaway(cfg: KNEConfig, edit_losses: List[float], steps: int, merged: List[Tuple[str, torch.Tensor]]) -> None:
    """Before the merge: a finite result whose answer loss did not rise (more than
    ``kne.objective.RUNAWAY_RISE``), else :class:`EditError`."""
    for path, rows in merged:
        if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
            raise EditError(runaway_message(f"the edited rows of {path} hold NaN or infinity", cfg))
    why = runaway_loss(edit_losses, steps)
    if why:
        raise EditError(runaway_message(why, cfg))


def _target_params(model: nn.Module, ensemble: Ensemble) -> int:
    """Parameters of the target modules the ensemble was selected from: the layers the config
    scored when known, else the layers the ensemble touches. An ensemble whose config scored layers
    this model lacks was made for another model: ``ValueError``."""
    arch = get_architecture(model)
    layers = ensemble.config.get("layers") if isinstance(ensemble.config, dict) else None
    edge = int(ensemble.config.get("exclude_edge_layers") or 0) if isinstance(ensemble.config, dict) else 0
    if layers is not None:
        n = num_layers(model)
        try:
            layers = [int(l) for l in layers]
        except (TypeError, ValueError):
            raise ValueError(f"the ensemble's config names layers {layers!r}: layer numbers must be integers") from None
        bad = [l for l in layers if not 0 <= l < n]
        if bad:
            raise ValueError(f"the ensemble was located over layers {layers} (its config), but this model has {n} layers "
                             f"(0..{n - 1}): was the ensemble made for another model?")
    total = 0
    for suffix, per in ensemble.indices.items():
        name = _match_suffix(model, arch, suffix)
        use = layers if (layers is not None or ensemble.n_layers.get(suffix)) else sorted(per)
        if use is not None and not use:
            continue
        total += sum(site.module.weight.numel() for site in resolve_sites(model, [name], use, edge)[name])
    return total
