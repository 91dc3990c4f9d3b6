"""The edit objective shared by :func:`kne.fast_edit` and :func:`kne.reference.edit`.

``loss = NLL(target_new) + preserve_weight * mean KL(p_before || p_after) + delta_l2 * ||dW||^2``

* NLL: mean over each request's answer tokens, then over requests (EasyEdit's FT-M loss;
  ``loss_reduction="request"``), or the mean over every answer token of the batch (the authors'
  KNB trainer's, Hugging Face's causal-LM loss; ``loss_reduction="token"``); the same for one
  request;
* KL: over the preserved next-token distributions (:mod:`kne.preservation`), when
  ``preserve_weight > 0``;
* ``||dW||^2``: the squared Frobenius norm of the weight change ``s * delta`` over every edited
  module instance, when ``delta_l2 > 0`` (the caller computes it from its own delta).

The stop test (``stop_rule``) reads the answer tokens only: ``"loss"`` (the NLL, so reduced, below
``stop_loss``), ``"argmax"`` (every answer token is the argmax), ``"min_prob"`` (every answer
token's probability at least ``stop_prob``) or ``"margin"`` (every answer token's logit at least
``stop_margin`` above the largest other logit at its position). Every part comes from the one
forward the step takes anyway: none costs a pass.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ._text import Batch, answer_logprobs, answer_margins, answer_predictions, encode, per_sequence_mean
from ._utils import forward_logits, frozen, logits_at
from .preservation import Preservation, build_preservation

# The pieces of an edit step, public for code that builds its own (kne's benchmarks do): ``encode``
# (kne's tokenisation of prompt + answer into a padded ``Batch``), ``forward_logits`` (the model's logits of
# a batch, without a KV cache), ``frozen`` (no parameter requires a gradient inside it)
# and ``edit_loss`` (the NLL of the answer tokens).
__all__ = ["EditObjective", "edit_loss", "encode", "Batch", "forward_logits", "frozen", "prompt_predictions",
           "runaway_loss", "collapse"]


def edit_loss(logits: torch.Tensor, batch: Batch, reduction: str = "request") -> torch.Tensor:
    """NLL of the answer tokens (prompt and padding masked): ``"request"`` -- the mean over each
    request's answer tokens, then over requests (EasyEdit's FT-M loss); ``"token"`` -- the mean
    over every answer token of the batch (Hugging Face's loss, the authors' KNB trainer's)."""
    return _reduce(answer_logprobs(logits, batch), batch, reduction)


def _reduce(lp: torch.Tensor, batch: Batch, reduction: str) -> torch.Tensor:
    if reduction == "request":
        return (-per_sequence_mean(lp, batch)).mean()
    if reduction == "token":
        return -lp.mean()
    raise ValueError(f"loss reduction {reduction!r} is invalid: use 'request' or 'token'")


class EditObjective:
    """Loss and stop test of one edit (see the module docstring).

    ``selection()`` names the logits a step reads, ``(input_ids, attention_mask, rows, pos)``: the
    caller computes ``logits[rows, pos]`` its own way (the fast path projects only those positions,
    the reference indexes the full output) and passes them to ``__call__``, which returns
    ``(loss, done)``. With preservation, :meth:`capture` must see the unedited model's logits first.
    """

    def __init__(self, tokenizer, requests, config, device, preserve_prompts: Optional[Sequence[str]] = None):
        self.config = config
        self.kl_on = config.preserve_weight > 0
        self.preservation: Optional[Preservation] = None
        if self.kl_on or config.project:
            self.preservation = build_preservation(tokenizer, requests, config, device, preserve_prompts)
        elif preserve_prompts is not None:
            raise ValueError("preserve_prompts was given but neither KNEConfig.preserve_weight > 0 nor project=True: "
                             "set one (for instance KNEConfig.preset('local')) to preserve them")
        #: the edit's own sequences (prompt + answer), without neighbours: what the runaway check reads
        self.edit_batch = encode(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                                 add_special_tokens=config.add_special_tokens, always_space=config.always_space,
                                 device=device)
        self.batch = self.preservation.edit if self.kl_on else self.edit_batch
        self.neighbours = self.preservation  # every kept neighbour (preservation: those the KL holds)
        self.edit_losses: List[float] = []
        self.kls: List[float] = []
        self.flips: Optional[float] = None

    def selection(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, rows, pos)`` of the logits one step reads: the answer
        positions, then (with the KL on) the preserved ones."""
        b = self.batch
        if not self.kl_on:
            return b.input_ids, b.attention_mask, b.rows, b.cols - 1
        rows, pos = self.preservation.selection()
        return b.input_ids, b.attention_mask, rows, pos

    def capture(self, logits_fn: Callable[..., torch.Tensor], key_sites: Sequence = ()) -> List[torch.Tensor]:
        """One forward of the unedited model over the edit and its neighbours (``logits_fn(input_ids,
        attention_mask, rows, pos)`` returns the logits at those positions): keeps ``p_before``,
        drops same-relation neighbours (:meth:`Preservation.capture`), and returns the inputs of
        each of ``key_sites`` at every token of the neighbours the projection keeps (``[tokens, in]``
        each).

        Who keeps which neighbour: the null-space projection keeps a neighbour's whole forward
        exactly (every edited module's output on its tokens is unchanged, layer by layer), so with
        ``project`` it keeps every neighbour (``preserve_others``' too) and the KL holds only the
        edit prompt's own positions (``preserve_answer_end``, ``preserve_prompt_positions``), which
        no projection can keep. Without ``project`` the KL holds every neighbour."""
        from .nullspace import KeyCapture

        pres = self.preservation
        rows, pos = pres.selection()
        with KeyCapture(key_sites, pres.neighbour_rows(), pres.attention_mask) as kc:
            logits = logits_fn(pres.input_ids, pres.attention_mask, rows, pos)
        keep = pres.capture(logits)
        keys = kc.keys(keep)
        self.neighbours = pres.subset(keep)
        if self.config.project and self.kl_on:  # the projection keeps the neighbours; the KL none of them
            self.preservation = self.neighbours.subset(torch.zeros(self.neighbours.num_neighbours, dtype=torch.bool))
        else:
            self.preservation = self.neighbours
        if self.kl_on:
            self.batch = self.preservation.edit
        return keys

    def __call__(self, logits: torch.Tensor, penalty: Optional[Callable[[], torch.Tensor]] = None
                 ) -> Tuple[torch.Tensor, bool]:
        cfg, b = self.config, self.batch
        n = int(b.rows.numel())
        answer = logits[:n] if self.kl_on else logits
        lp = answer_logprobs(answer, b)
        loss = _reduce(lp, b, cfg.loss_reduction)
        nll = float(loss.detach())
        self.edit_losses.append(nll)
        if self.kl_on:
            kl = self.preservation.kl(logits)
            mean_kl = kl.mean() if kl.numel() else kl.sum()
            self.kls.append(float(mean_kl.detach()))
            self.flips = self.preservation.flips(logits.detach())
            loss = loss + cfg.preserve_weight * mean_kl
        if penalty is not None and cfg.delta_l2 > 0:
            loss = loss + cfg.delta_l2 * penalty()
        if cfg.stop_rule == "loss":
            done = nll < cfg.stop_loss
        elif cfg.stop_rule == "argmax":
            done = bool((answer_predictions(answer.detach(), b) == b.targets).all())
        elif cfg.stop_rule == "min_prob":
            done = bool((lp.detach().exp() >= cfg.stop_prob).all())
        else:  # "margin"
            done = bool((answer_margins(answer.detach(), b) >= cfg.stop_margin).all())
        return loss, done

    def stats(self) -> dict:
        """``edit_losses`` and, with preservation, ``preserve_kl`` (the final mean KL),
        ``neighbor_flips`` (share of the neighbours the KL holds whose top token changed; ``None``
        when it holds none, as with the projection on), ``kl_neighbours`` (those neighbours),
        ``neighbours`` (every prompt kept) and ``neighbours_dropped`` (same-relation prompts left
        out)."""
        out = {"edit_losses": list(self.edit_losses)}
        p = self.neighbours
        if p is not None:
            out.update(neighbours=list(p.prompts), neighbours_dropped=list(p.dropped))
        if self.kl_on:
            out.update(preserve_kl=self.kls[-1] if self.kls else None, preserve_kls=list(self.kls),
                       neighbor_flips=self.flips, kl_neighbours=list(self.preservation.prompts))
        return out


# ---------------------------------------------------------------------------------------------- runaway edits
#: an answer loss that ends more than this share above where it started marks a runaway edit (a
#: regularised edit can end a hair above its start, 5.420 -> 5.425 nats; a runaway one ends far above,
#: 7.6 -> 48 with ngd's lr=1000 on the embedded model)
RUNAWAY_RISE = 0.01


def runaway_loss(edit_losses: Sequence[float], steps: int) -> Optional[str]:
    """Why an edit whose answer loss (its NLL) ended more than :data:`RUNAWAY_RISE` above where it
    started is refused (``None`` when it did not): the settings made the training diverge."""
    if steps < 1 or len(edit_losses) < 2:
        return None
    first, last = float(edit_losses[0]), float(edit_losses[-1])
    if last > first * (1 + RUNAWAY_RISE) + 1e-9:
        return (f"the edit loss rose from {first:.4g} to {last:.4g} over {steps} step(s): the training diverged "
                "instead of learning the answer")
    return None


def prompt_predictions(model, batch: Batch) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(top token, its probability)`` at every position of the edit sequences' prompts that
    predicts the next prompt token, from one forward without gradients; ``None`` when no prompt has
    two tokens. The answer's positions are not read: there the edit is meant to change the model."""
    rows, pos = [], []
    for r in range(batch.size_answers):
        first = int(batch.cols[batch.rows == r].min())  # the first answer token's position
        rows += [r] * max(0, first - 1)
        pos += list(range(max(0, first - 1)))
    if not rows:
        return None
    dev = batch.input_ids.device
    with torch.no_grad():
        logits = logits_at(model, batch.input_ids, batch.attention_mask, torch.tensor(rows, device=dev),
                           torch.tensor(pos, device=dev), gather=True)
    top = logits.float().softmax(-1).max(-1)
    return top.indices.cpu(), top.values.cpu()


def collapse(before: Optional[Tuple[torch.Tensor, torch.Tensor]],
             after: Optional[Tuple[torch.Tensor, torch.Tensor]], tokenizer=None) -> Optional[str]:
    """Why an edited model whose next-token distribution on the edit prompt collapsed is refused
    (``None`` when it did not): after the edit one token is the top prediction at every prompt
    position, each time with probability 0.5 or more, where before the edit the predictions varied
    -- the model then says that token whatever it reads (a runaway learning rate or scale)."""
    if before is None or after is None or after[0].numel() < 2:
        return None
    tok, p = after
    if bool((tok == tok[0]).all()) and bool((p >= 0.5).all()) and not bool((before[0] == tok[0]).all()):
        name = repr(tokenizer.convert_ids_to_tokens(int(tok[0]))) if tokenizer is not None else f"id {int(tok[0])}"
        return (f"the edited model predicts the token {name} at all {tok.numel()} positions of the edit prompt "
                f"(probability {float(p.min()):.2f} or more), where the unedited model's predictions varied: its "
                "next-token distribution collapsed")
    return None
