"""The pure-torch reference KNE: written for obvious correctness, not speed.

Same signatures as the fast path (:func:`kne.attribute`, :func:`kne.locate`, :func:`kne.fast_edit`),
implemented the direct way:

* ``attribute``: the weights themselves are scaled along the integrated-gradient path, autograd
  fills ``.grad``, and a neuron's score is ``(W * mean_k G_k)`` summed over its weights;
* ``locate``: aggregate over requests, then ``numpy.percentile`` (linear) over all layers of a
  module, strict ``>`` and ``> 0``;
* ``edit``: a dense ``[out, in]`` float32 delta per edited module, masked to the ensemble rows (or
  columns), trained with ``torch.optim.AdamW`` (or normalised gradient descent, ``optimizer="ngd"``),
  merged into ``W`` at the end.

The fast path must agree with this module; the tests hold them to it.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import numpy as np
import torch
from torch import nn

from ._exclusive import holds_model, own_thread, writing
from ._guard import undo_writes
from ._text import answer_logprobs, check_lengths, check_tokenizer, encode
from ._utils import EditDropout, Timer, forward_logits, input_device, max_positions, restore_training, training_flags
from .adapters import check_model, distinct_sites, require_resident, resolve_sites
from .attribution import Attribution
from .config import KNEConfig, describe, edit_config, resolve_config
from .editing import (check_call, check_capacity, check_keep, check_state, delta_scale, initial_delta, merged_rows,
                      refuse_runaway, runaway_message)
from .nullspace import edit_bases
from .objective import EditObjective, collapse, prompt_predictions
from .ensemble import Ensemble
from .requests import as_requests
from .result import EditError, EditResult

__all__ = ["attribute", "locate", "edit"]


def _objective(model, batch, objective: str) -> torch.Tensor:
    lp = answer_logprobs(forward_logits(model, batch), batch)
    return lp.exp().sum() if objective == "prob" else lp.sum()


@holds_model("kne.reference.attribute")
def attribute(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None, **overrides: Any) -> Attribution:
    """Reference attribution: autograd on the scaled weights, ``W * G`` summed per neuron."""
    cfg = resolve_config(config, overrides)
    check_tokenizer(tokenizer)
    cfg = check_model(model, cfg)
    reqs = as_requests(requests)
    timer = Timer()
    sites = resolve_sites(model, cfg.target_modules, cfg.layers, cfg.exclude_edge_layers)
    check_lengths(tokenizer, [(r.prompt, r.target_new) for r in reqs], max_positions(model), cfg.add_special_tokens)
    layers = tuple(s.layer for s in next(iter(sites.values())))
    m = cfg.ig_steps
    alphas = [k / m for k in range(1, m + 1)]
    flat = [(name, li, s) for name, ss in sites.items() for li, s in enumerate(ss)]
    require_resident([s for _, _, s in flat], "kne.reference.attribute")
    scores = {name: torch.zeros(len(reqs), len(ss), ss[0].num_neurons(cfg.neuron_axis)) for name, ss in sites.items()}
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]  # the caller's grads are kept
    modes = training_flags(model)
    passes = 0
    try:
        model.eval()
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        originals = {id(s.module.weight): s.module.weight.detach().clone() for _, _, s in flat}
        # With m == 1 the only path point is a = 1, the model itself: every weight at once.
        groups = [flat] if (cfg.ig_path == "joint" or m == 1) else [[f] for f in flat]
        for r, req in enumerate(reqs):
            batch = encode(tokenizer, [req.prompt], [req.target_new], add_special_tokens=cfg.add_special_tokens,
                           always_space=cfg.always_space, device=input_device(model))
            for group in groups:
                grad_sum = {id(s.module.weight): torch.zeros_like(s.module.weight, dtype=torch.float32)
                            for _, _, s in group}
                for a in alphas:
                    for _, _, s in group:
                        w = s.module.weight
                        with torch.no_grad():
                            w.copy_(originals[id(w)] * a)
                        w.requires_grad_(True)
                        w.grad = None
                    try:
                        _objective(model, batch, cfg.objective).backward()
                        passes += 1
                    finally:
                        for _, _, s in group:
                            w = s.module.weight
                            with torch.no_grad():
                                w.copy_(originals[id(w)])
                            w.requires_grad_(False)
                    for _, _, s in group:
                        w = s.module.weight
                        grad_sum[id(w)] += w.grad.float() if w.grad is not None else 0.0
                        w.grad = None
                for name, li, s in group:
                    W = originals[id(s.module.weight)].float()
                    G = grad_sum[id(s.module.weight)] / m
                    if s.transposed:  # Conv1D stores [in, out]: view both as [out, in]
                        W, G = W.t(), G.t()
                    prod = W * G
                    scores[name][r, li] = (prod.sum(1) if cfg.neuron_axis == "out" else prod.sum(0)).cpu()
    finally:
        for p, f, g in flags:
            p.requires_grad_(f)
            p.grad = g
        restore_training(modes)
    return Attribution(scores=scores, layers=layers, suffixes={n: ss[0].suffix for n, ss in sites.items()},
                       config=cfg, requests=reqs, seconds=timer(), passes=passes)


def locate(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None, **overrides: Any) -> Ensemble:
    """Reference localisation: ``numpy.percentile`` over all layers of each module."""
    cfg = resolve_config(config, overrides)
    att = attribute(model, tokenizer, requests, cfg)
    indices, thresholds, n_neurons, n_layers = {}, {}, {}, {}
    for name, sc in att.scores.items():
        agg = sc.max(0).values if cfg.aggregate == "max" else sc.mean(0)
        thr = np.percentile(agg.numpy(), cfg.percentile)
        keep = agg.numpy() > thr
        if cfg.positive_only:
            keep &= agg.numpy() > 0
        suffix = att.suffixes[name]
        indices[suffix] = {att.layers[i]: torch.from_numpy(np.nonzero(keep[i])[0]).long()
                           for i in range(keep.shape[0])}
        thresholds[suffix] = float(thr)
        n_neurons[suffix] = sc.shape[2]
        n_layers[suffix] = sc.shape[1]
    return Ensemble(indices=indices, neuron_axis=cfg.neuron_axis, thresholds=thresholds, n_neurons=n_neurons,
                    n_layers=n_layers, config=cfg.to_dict(), seconds=att.seconds)


@holds_model("kne.reference.edit")
def edit(model: nn.Module, tokenizer, requests, config: Optional[KNEConfig] = None, *,
         ensemble: Optional[Ensemble] = None, preserve_prompts: Optional[List[str]] = None, keep=None, state=None,
         **overrides: Any) -> EditResult:
    """Reference edit: dense masked deltas trained with ``torch.optim.AdamW`` (or, with
    ``optimizer="ngd"``, normalised gradient descent written out on them); the preservation KL
    from the full output logits, by plain autograd. With no config the base is
    ``KNEConfig.preset("local")``, as for :func:`kne.fast_edit`."""
    cfg = edit_config(config, overrides)
    reqs = check_call(model, tokenizer, requests, cfg, ensemble, preserve_prompts)
    cfg = check_model(model, cfg)
    held = check_keep(keep, tokenizer, cfg)
    check_state(state, cfg)
    total = Timer()
    locate_seconds = 0.0
    if ensemble is None:
        ensemble = locate(model, tokenizer, reqs, cfg)
        locate_seconds = total()
    timer = Timer()
    axis = ensemble.neuron_axis
    pairs = ensemble.sites(model)
    distinct_sites(site for site, _ in pairs)
    if not pairs:
        raise EditError("the ensemble is empty: lower KNEConfig.percentile or set positive_only=False")
    require_resident([s for s, _ in pairs], "kne.reference.edit")
    if cfg.project and axis != "out":
        raise ValueError("KNEConfig.project=True needs a row ensemble (neuron_axis='out'); this ensemble is on "
                         f"axis {axis!r}")
    objective = EditObjective(tokenizer, reqs, cfg, input_device(model), preserve_prompts)

    def full_logits(ids, mask, rows, pos) -> torch.Tensor:  # every position's logits, then the ones asked for
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, pos]

    def logits() -> torch.Tensor:
        return full_logits(*objective.selection())

    edits = []
    for site, idx in pairs:
        W = site.weight()
        mask = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        D = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        init = initial_delta(cfg, site, axis, idx.numel(), W.device)
        if axis == "out":
            mask[idx] = 1.0
            D[idx] = init
        else:
            mask[:, idx] = 1.0
            D[:, idx] = init
        edits.append({"site": site, "idx": idx, "mask": mask, "D": D.requires_grad_(True),
                      "s": delta_scale(cfg, idx.numel()), "orig": site.module.weight.detach().clone()})

    dropout = EditDropout(cfg.dropout, cfg.seed)  # the same masks as kne.fast_edit draws

    def make_hook(e):
        def hook(module, args, out):
            x = dropout(args[0])
            return out + e["s"] * (x @ (e["D"] * e["mask"]).t().to(x.dtype))
        return hook

    opt = torch.optim.AdamW([e["D"] for e in edits], lr=cfg.lr, weight_decay=cfg.weight_decay) \
        if cfg.optimizer == "adamw" else None  # ngd steps the deltas itself (ngd_step)
    momenta = [torch.zeros_like(e["D"]) for e in edits] if cfg.optimizer == "ngd" else []  # dense: only when read

    def ngd_step() -> None:  # optimizer "ngd" on the dense deltas (zero gradient outside the mask)
        tiny = torch.finfo(torch.float32).tiny
        gn = max(math.sqrt(sum(float((e["D"].grad.double() ** 2).sum()) for e in edits)), tiny)
        for e, m in zip(edits, momenta):
            m.copy_(cfg.ngd_momentum * m + e["D"].grad / gn)
        mn = max(math.sqrt(sum(float((m.double() ** 2).sum()) for m in momenta)), tiny)
        for e, m in zip(edits, momenta):
            e["D"].sub_((m / mn) * cfg.lr)  # |m| <= mn: no overflow when both are 0

    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = training_flags(model)
    handles = []
    written = []  # (path, weight, dim, index, rows before): what an undo puts back
    losses: List[float] = []
    steps, stopped = 0, False
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        projectors = []
        if objective.preservation is not None:
            with torch.no_grad():
                keys = objective.capture(full_logits, [e["site"] for e in edits] if cfg.project else ())
            if cfg.project:  # I - B B^T per edited module instance, formed explicitly
                bases = edit_bases(model, tokenizer, [e["site"] for e in edits], keys, cfg, kept=held, state=state)
                if state is not None or held:
                    check_capacity([e["site"] for e in edits], bases, cfg)
                for basis in bases:
                    n = edits[0]["D"].shape[1]
                    B = basis.double() if basis is not None else torch.zeros(n, 0, dtype=torch.float64)
                    projectors.append(torch.eye(B.shape[0], dtype=torch.float64, device=B.device) - B @ B.t())
        prompt_before = prompt_predictions(model, objective.edit_batch)
        handles = [e["site"].module.register_forward_hook(own_thread(make_hook(e))) for e in edits]
        for it in range(cfg.steps + 1):
            loss, done = objective(logits(), lambda: sum(((e["s"] * e["D"] * e["mask"]) ** 2).sum()
                                                         for e in edits))
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise EditError(f"the edit loss became {losses[-1]} at step {it}; the model was restored")
            if done and not cfg.stop_after_step:
                stopped = True
                break
            if it == cfg.steps:
                stopped = bool(done)
                break
            for e in edits:
                e["D"].grad = None
            loss.backward()
            if cfg.optimizer == "ngd":
                with torch.no_grad():
                    ngd_step()
            else:
                opt.step()
            with torch.no_grad():
                for e, P in zip(edits, projectors):  # rows of the dense delta, off the preserved keys
                    e["D"].copy_((e["D"].double() @ P.to(e["D"].device)).float() * e["mask"])
            steps += 1
            if done:  # stop_after_step (the authors' loop): the step on the passing loss, then stop
                stopped = True
                break
        for h in handles:
            h.remove()
        handles = []
        dim = 0 if axis == "out" else 1
        # Every statistic before the first write (the same all-or-nothing rule as kne.fast_edit).
        saved = [(e["site"], dim, e["idx"], e["orig"].t().index_select(dim, e["idx"]) if e["site"].transposed
                  else e["orig"].index_select(dim, e["idx"])) for e in edits]
        edited = sum(int(e["idx"].numel()) * (e["site"].in_features if axis == "out" else e["site"].out_features)
                     for e in edits)
        n_total = sum(p.numel() for p in model.parameters())
        stats = {"preset": describe(cfg), "steps": steps, "losses": losses, "stopped_early": stopped, "neurons": len(ensemble),
                 "params_edited": edited, "params_total": n_total, "param_fraction": edited / n_total,
                 **objective.stats()}
        if keep is not None:
            stats["kept_sequences"] = len(held)
        merged = []
        with torch.no_grad():
            for e in edits:  # W[idx] += s * D[idx]
                W = e["site"].weight()
                before = W.index_select(dim, e["idx"])
                merged.append((e, W, before, merged_rows(before, e["s"], e["D"].index_select(dim, e["idx"]))))
        refuse_runaway(cfg, stats["edit_losses"], steps, [(e["site"].path, rows) for e, _, _, rows in merged])
        with torch.no_grad(), writing(model):  # other threads' forwards wait: none sees a half merge
            try:
                for e, W, before, rows in merged:
                    written.append((e["site"].path, W, dim, e["idx"], before))
                    W.index_copy_(dim, e["idx"], rows.to(W.dtype))
                why = collapse(prompt_before, prompt_predictions(model, objective.edit_batch), tokenizer)
                if why:
                    raise EditError(runaway_message(why, cfg))
            except BaseException as e:
                undo_writes(written, "kne.reference.edit", e)
                written = []
                raise
        stats = {"locate_seconds": locate_seconds, "edit_seconds": timer(), "total_seconds": total(), **stats}
        result = EditResult(model, ensemble, stats, cfg, reqs, saved, method="kne.reference.edit")
    except BaseException as e:
        for h in handles:
            h.remove()
        if written:
            undo_writes(written, "kne.reference.edit", e)
        raise
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        restore_training(modes)
    return result
