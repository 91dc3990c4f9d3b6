"""FT-M (EasyEdit's ``FT`` with ``objective_optimization: target_new``): fine-tune one FFN output
projection with the prompt masked out of the loss.

EasyEdit's Llama-2-7B FT-M settings: ``layers: [21]`` (of 32), ``mlp.down_proj``, Adam, lr 5e-4,
25 steps, weight decay 0, batch 1, stop once the loss (measured before a step) is below 1e-2.
For other depths the default layer is scaled: ``round(L * 21 / 32)``.

``preserve_weight > 0`` adds kne's neighbour KL (:mod:`kne.preservation`: the unedited model's
next-token distributions on neighbour prompts made from each request's ``subject``, in the same
batch) to FT-M's loss: the fair baseline for KNE's ``local`` preset.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
from torch import nn

from .._text import check_lengths, check_tokenizer
from .._utils import Timer, as_float, as_int, input_device, max_positions, restore_training, training_flags
from ..adapters import num_layers, require_resident, resolve_sites
from .._exclusive import holds_model, writing
from .._guard import undo_writes
from ..result import EditError, EditResult
from ..objective import EditObjective, collapse, prompt_predictions
from ..requests import as_requests

__all__ = ["ft_m"]


@holds_model("FT-M")
def ft_m(model: nn.Module, tokenizer, requests, *, layers: Optional[Sequence[int]] = None, module: str = "ffn_out",
         lr: float = 5e-4, steps: int = 25, stop_loss: float = 1e-2, weight_decay: float = 0.0,
         add_special_tokens: bool = False, preserve_weight: float = 0.0, preserve_count: int = 16,
         preserve_prompts: Optional[Sequence[str]] = None) -> EditResult:
    """Edit ``model`` in place with FT-M; returns an :class:`kne.EditResult` (``restore()`` puts the
    fine-tuned weights back bit for bit; ``ensemble`` is ``None``). ``preserve_weight`` (> 0) adds
    the neighbour KL of ``kne.preservation`` (``preserve_count`` templates per request, or
    ``preserve_prompts``). FT-M writes the weights at every step, so forwards in other threads wait
    for the whole edit (``docs/robustness.md``); a non-finite result or a collapsed next-token
    distribution on the edit prompt raises :class:`kne.EditError` with the model put back."""
    from ..config import KNEConfig

    check_tokenizer(tokenizer)
    reqs = as_requests(requests)
    steps = as_int(steps, "steps", 1)
    lr = as_float(lr, "lr", lo=0.0, lo_open=True, fix="a positive learning rate (EasyEdit: 5e-4)")
    stop_loss = as_float(stop_loss, "stop_loss", lo=0.0, fix="a non-negative loss (EasyEdit: 1e-2)")
    weight_decay = as_float(weight_decay, "weight_decay", lo=0.0, fix="a non-negative number (EasyEdit: 0)")
    if not isinstance(add_special_tokens, bool):
        raise ValueError(f"add_special_tokens={add_special_tokens!r} is invalid: use True or False")
    L = num_layers(model)
    if layers is None:
        layers = [round(L * 21 / 32)]
    else:
        try:
            layers = [as_int(l, "layers[...]") for l in ([layers] if isinstance(layers, int) else layers)]
        except TypeError:
            raise ValueError(f"layers={layers!r} is invalid: use a list of layer indices") from None
    sites = resolve_sites(model, [module], layers)[module]
    require_resident(sites, "FT-M")
    check_lengths(tokenizer, [(r.prompt, r.target_new) for r in reqs], max_positions(model), add_special_tokens)
    timer = Timer()
    cfg = KNEConfig(stop_loss=stop_loss, add_special_tokens=add_special_tokens, preserve_weight=preserve_weight,
                    preserve_count=preserve_count)
    objective = EditObjective(tokenizer, reqs, cfg, input_device(model), preserve_prompts)

    def logits(ids, mask, rows, pos):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, pos]

    params = [s.module.weight for s in sites]
    originals = [p.detach().clone() for p in params]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]  # the caller's gradients are kept
    modes = training_flags(model)
    losses, n_steps = [], 0
    held = contextlib.ExitStack()
    held.enter_context(writing(model))  # every step writes: other threads' forwards wait until the edit is whole
    try:
        model.eval()
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        with torch.no_grad():
            prompt_before = prompt_predictions(model, objective.edit_batch)
        if objective.preservation is not None:
            with torch.no_grad():
                objective.capture(logits)
        for _ in range(steps):  # every step writes the weights: from here on an undo puts them back
            opt.zero_grad()
            loss, done = objective(logits(*objective.selection()))
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise EditError(f"FT-M loss became {losses[-1]}; the model was restored")
            loss.backward()
            opt.step()
            n_steps += 1
            if done:  # EasyEdit's FT stops after the step whose loss was under stop_loss
                break
        for s, p in zip(sites, params):
            if not bool(torch.isfinite(p).all()):
                raise EditError(f"FT-M left NaN or infinity in {s.path}: the edit was refused and the model put back "
                                f"(lower lr={lr:g})")
        why = collapse(prompt_before, prompt_predictions(model, objective.edit_batch), tokenizer)
        if why:
            raise EditError(f"{why}; the FT-M edit was refused and the model put back (lower lr={lr:g})")
        edited = sum(p.numel() for p in params)
        n_total = sum(p.numel() for p in model.parameters())
        stats = {"locate_seconds": 0.0, "edit_seconds": timer(), "total_seconds": timer(), "steps": n_steps,
                 "losses": losses, "stopped_early": objective.edit_losses[-1] < stop_loss, "neurons": None,
                 "params_edited": edited, "params_total": n_total, "param_fraction": edited / n_total,
                 "layers": layers, **objective.stats()}
        saved = []
        for s, o in zip(sites, originals):
            w = o.t() if s.transposed else o
            saved.append((s, 0, torch.arange(w.shape[0], device=w.device), w.clone()))
        result = EditResult(model, None, stats, None, reqs, saved, method="FT-M")
    except BaseException as e:
        undo_writes([(s.path + ".weight", p, 0, None, o) for s, p, o in zip(sites, params, originals)], "FT-M", e)
        raise
    finally:
        held.close()
        for p, f, g in flags:
            p.requires_grad_(f)
            p.grad = g
        restore_training(modes)
    return result
