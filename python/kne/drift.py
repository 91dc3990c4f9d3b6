"""Drift: how much an edit changes what the model says about text that no record is about.

A sequence of edits can leave every KnowEdit probe in place and still change the model elsewhere.
Drift scores a fixed held-out text with the edited model against the unedited one:

* the text (:func:`drift_text`): the unedited model's own greedy continuations (``NEW_TOKENS``
  tokens, stopped at EOS) of ``SEQUENCES`` shipped training prompts (KnowEdit training records 100
  and later: no evaluated record of records 0-99 shares one), made once per model and cached under
  ``$KNE_CACHE/drift`` (keyed as the null-space corpus is: by the model's weights other than its
  FFN projections, so an edited model finds its unedited text);
* the score of a token (:func:`token_scores`): its negative log-likelihood given what precedes it,
  and the model's argmax there, over the continuation tokens only (the prompts are records'
  prompts);
* ``drift``: the mean NLL increase per token, edited minus unedited (nats; 0 for the unedited
  model, positive when the edit made the text less likely); ``drift_flips``: the share of tokens
  whose argmax changed.

On SmolLM2-135M the 256 sequences hold about 5,800 scored tokens (9,000 through the model);
scoring them all takes about 40 s on one CPU thread (270 tokens a second: the 20,000 tokens first
planned would take 72 s per evaluation). ``kne eval`` therefore scores the unedited model's text
once per run and, after each edit, a window of ``WINDOW`` (4) sequences that moves with the record
index: one forward of about 150 tokens (about 0.6 s) per edit, and a run of 64 records or more
reads every sequence (50 records: 200 of the 256).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._text import check_tokenizer, pad_id
from ._utils import frozen, input_device, new_folder

__all__ = ["SEQUENCES", "NEW_TOKENS", "WINDOW", "DriftText", "drift_text", "token_scores", "window", "select",
           "compare"]

SEQUENCES = 256
NEW_TOKENS = 24
WINDOW = 4  # sequences an edit of a kne eval run is scored on
_FORMAT = "kne.drift/1"


@dataclass
class DriftText:
    """Token sequences (prompt + continuation) and where each one's continuation starts."""

    sequences: List[List[int]]
    starts: List[int]
    folder: Optional[Path] = None

    @property
    def tokens(self) -> int:
        return sum(len(s) - b for s, b in zip(self.sequences, self.starts))


def _folder(model: nn.Module, prompts: Sequence[str], new_tokens: int) -> Path:
    from .adapters import get_architecture
    from .models import cache_dir
    from .nullspace import model_key

    arch = get_architecture(model)
    ffn = [s for _, s in arch.modules]
    h = hashlib.sha256(json.dumps([list(prompts), new_tokens]).encode()).hexdigest()[:12]
    return cache_dir() / "drift" / f"{model_key(model, ffn)}-{h}"


def drift_text(model: nn.Module, tokenizer, *, sequences: int = SEQUENCES, new_tokens: int = NEW_TOKENS,
               batch_size: int = 64, progress: bool = True) -> DriftText:
    """The held-out text of ``model`` (module docstring): loaded from the cache, else generated from
    the unedited model (greedy, batched) and cached; ``sequences`` of the shipped training prompts,
    the last ones first used by nothing else."""
    from tqdm.auto import tqdm

    from .nullspace import _continuations
    from .preservation import training_prompts

    check_tokenizer(tokenizer)
    prompts = training_prompts()[-2 * sequences:]  # twice as many: those continued by EOS at once are left out
    folder = _folder(model, prompts + [f"sequences={sequences}"], new_tokens)
    meta = folder / "text.json"
    if meta.is_file():
        d = json.loads(meta.read_text(encoding="utf-8"))
        return DriftText(d["sequences"], d["starts"], folder)
    starts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    with frozen(model):
        bar = tqdm(total=len(prompts), desc="drift text: generate", unit="prompt", file=sys.stderr,
                   disable=not progress)
        seqs = _continuations(model, tokenizer, prompts, new_tokens, batch_size, False, bar)
        bar.close()
    keep = [i for i, (s, b) in enumerate(zip(seqs, starts)) if len(s) > b][:sequences]  # a continuation to score
    text = DriftText([seqs[i] for i in keep], [starts[i] for i in keep], folder)
    with new_folder(folder) as tmp:
        (tmp / "text.json").write_text(json.dumps({"format": _FORMAT, "prompts": [prompts[i] for i in keep],
                                                   "new_tokens": new_tokens, "sequences": text.sequences,
                                                   "starts": text.starts}) + "\n", encoding="utf-8")
    return text


@torch.no_grad()
def token_scores(model: nn.Module, tokenizer, text: DriftText, rows: Optional[Sequence[int]] = None,
                 batch_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(nll, argmax)`` of every continuation token of the sequences ``rows`` (default all), in
    order: float32 and int64 CPU tensors. Right-padded batches; the model is not modified."""
    from ._text import pad_batch

    rows = list(range(len(text.sequences))) if rows is None else list(rows)
    device = input_device(model)
    pad = pad_id(tokenizer)
    nlls, tops = [], []
    with frozen(model):
        for i in range(0, len(rows), batch_size):
            chunk = [text.sequences[r] for r in rows[i:i + batch_size]]
            starts = [text.starts[r] for r in rows[i:i + batch_size]]
            ids, mask = pad_batch(chunk, pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for b, (seq, start) in enumerate(zip(chunk, starts)):
                lg = logits[b, start - 1:len(seq) - 1].float()  # the positions that predict the continuation
                tgt = torch.tensor(seq[start:], device=lg.device)
                nlls.append(torch.nn.functional.cross_entropy(lg, tgt, reduction="none").cpu())
                tops.append(lg.argmax(-1).cpu())
    return torch.cat(nlls), torch.cat(tops)


def window(index: int, count: int = WINDOW, total: int = SEQUENCES) -> List[int]:
    """The ``count`` sequences record ``index`` of a run is scored on (consecutive, wrapping)."""
    return [(index * count + j) % total for j in range(count)]


def select(scores: Tuple[torch.Tensor, torch.Tensor], text: DriftText, rows: Sequence[int],
           among: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tokens of sequences ``rows`` out of ``scores`` (which :func:`token_scores` made for the
    sequences ``among``, default all)."""
    among = list(range(len(text.sequences))) if among is None else list(among)
    offsets, at = {}, 0
    for r in among:
        n = len(text.sequences[r]) - text.starts[r]
        offsets[r] = (at, at + n)
        at += n
    pick = torch.cat([torch.arange(*offsets[r]) for r in rows])
    return scores[0][pick], scores[1][pick]


def compare(before: Tuple[torch.Tensor, torch.Tensor], after: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[float, float]:
    """``(drift, drift_flips)``: the mean NLL increase per token and the share of changed argmaxes."""
    (nb, tb), (na, ta) = before, after
    if nb.shape != na.shape:
        raise ValueError(f"drift: {nb.numel()} tokens before the edit but {na.numel()} after: score the same "
                         "sequences (pass the pre-edit result of the same call)")
    return float((na.double() - nb.double()).mean()), float((ta != tb).double().mean())
