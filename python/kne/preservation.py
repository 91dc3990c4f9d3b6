"""Keeping what the model knows: the neighbour prompts of an edit and the preservation objective.

A KNE edit follows the subject: without help it also rewrites what the model says about the
subject's other relations (KnowEdit's locality probes ask exactly that). Three levers, each off by
default (the authors' settings and ``tuned`` are unchanged); ``KNEConfig.preset("local")`` turns
on the projection (it keeps every neighbour), the argmax stop, and the KL at the answer's end:

* **neighbour KL** (``preserve_weight``): the loss adds ``preserve_weight * mean KL(p_before ||
  p_after)`` over the next-token distributions of neighbour prompts at their last position (and,
  with ``preserve_prompt_positions``, at every position of the edit prompt before the answer, and
  with ``preserve_answer_end`` at the answer's last token: what follows the new answer).
  ``p_before`` is the unedited model's own prediction, so no labels are needed. Neighbours run in
  the same batch as the edit, through the same delta hooks.
* **stopping and size** (``stop_rule``, ``stop_prob``, ``stop_margin``, ``delta_l2``): stop as soon
  as the answer is the argmax, has probability ``stop_prob``, or leads every other token by
  ``stop_margin`` logits, rather than at a loss (:mod:`kne.objective`); an L2 penalty on the change.
* **null-space projection** (``project``, rows only): :mod:`kne.nullspace`.

Neighbours (:func:`neighbour_prompts`): explicit ``preserve_prompts=``; otherwise the request's
``subject`` in the shipped relation templates (``data/preservation.json``, harvested from KnowEdit
training records 100+ by ``tools/harvest_preservation.py``; never from the records docs/quality.md
reports on) plus generic continuations (``"{subject},"``), and the edit prompt itself asked of
``preserve_others`` other subjects (the relation must not move for them). A template that asks the edited relation
itself (a paraphrase of the edit) must not be preserved: :func:`same_relation` drops every
template whose relation words ("place", "birth") are at least half shared with the edit prompt
(or that holds all of the prompt's relation words), and, once ``p_before`` is known, a neighbour whose top token is the first token of the request's
old answer (``ground_truth``) is dropped too (it asks the edited relation in other words). A
request without a subject falls back to the prompts of the other requests of the call, else to
shipped training prompts about other subjects, with a warning.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._text import Batch, encode, join, pad_batch, pad_id
from ._warn import warn

__all__ = ["templates", "training_prompts", "neighbour_prompts", "same_relation", "Preservation",
           "build_preservation", "GENERIC_TEMPLATES"]

_DATA = Path(__file__).resolve().parent / "data" / "preservation.json"

#: continuations of the bare subject, added to the relation templates
GENERIC_TEMPLATES = ("{},", "{} is a", "{} was")

# Words that carry no relation: articles, copulas, question words, and the frame of KnowEdit's
# templates ("The name of the ... of {} is").
_STOP = frozenset("""
a an the of in on at to for by with from as and or is are was were be been being do does did has have had
which who whom whose what where when why how that this these those it its name names called
""".split())


@functools.lru_cache(maxsize=1)
def _data() -> Dict:
    return json.loads(_DATA.read_text(encoding="utf-8"))


def templates() -> List[str]:
    """The shipped relation templates (``"The place of birth of {} is"``), most frequent first."""
    return [t for t, _ in _data()["templates"]]


def template_subjects() -> Dict[str, List[str]]:
    """Per shipped template, subjects training records ask it about."""
    return {t: list(v) for t, v in _data()["subjects"].items()}


def other_subjects(request, count: int) -> List[str]:
    """``count`` other subjects to ask the request's own relation about: those the training records
    ask the same relation of (templates :func:`same_relation` matches), then subjects of any
    template, in a fixed order."""
    if count <= 0 or not request.subject:
        return []
    same, rest = [], []
    for t, subs in template_subjects().items():
        (same if same_relation(t, request.prompt, request.subject) else rest).extend(subs)
    out = [x for x in _unique(same + rest) if x != request.subject and x not in request.prompt]
    return out[:count]


def training_prompts() -> List[str]:
    """Shipped edit prompts of KnowEdit training records (other subjects than any reported record)."""
    return list(_data()["prompts"])


def _relation_words(text: str) -> set:
    words = re.findall(r"[a-z]+", text.lower().replace("'s", ""))
    return {w for w in words if w not in _STOP}


def same_relation(template: str, prompt: str, subject: str) -> bool:
    """Whether ``template`` (with ``{}`` for the subject) asks what ``prompt`` asks about ``subject``:
    the same text, at least half of the template's relation words in the prompt, or every relation
    word of the prompt in the template ("The name of the capital city of the country {} is
    associated with is" asks "The capital of {} is" too)."""
    if template.format(subject).strip().lower() == prompt.strip().lower():
        return True
    tw = _relation_words(template.replace("{}", " "))
    pw = _relation_words(prompt.replace(subject, " "))
    return bool(tw) and (len(tw & pw) * 2 >= len(tw) or (bool(pw) and pw <= tw))


def neighbour_prompts(request, count: int, *, others: Sequence[str] = (), other_count: int = 0,
                      template_list: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """``(kept, dropped)`` neighbour prompts of one request: up to ``count`` relation templates
    filled with its subject (most frequent first, skipping those :func:`same_relation` drops, which
    are returned as ``dropped``), the generic continuations, and the request's own prompt asked of
    ``other_count`` other subjects (:func:`other_subjects`: the edit must not move the relation
    itself, "The capital of Belgium is").

    A request without a subject takes ``others`` (the neighbours of the other requests edited with
    it), else the first ``count`` shipped training prompts (about other subjects), with a warning:
    those keep what the model knows elsewhere, not about this request's subject."""
    if request.subject:
        subject = request.subject
        kept, dropped = [], []
        for t in (templates() if template_list is None else template_list):
            if len(kept) >= count:
                break
            text = t.format(subject)
            if text == request.prompt or same_relation(t, request.prompt, subject):
                dropped.append(text)
            else:
                kept.append(text)
        kept += [g.format(subject) for g in GENERIC_TEMPLATES]
        if subject in request.prompt:
            kept += [request.prompt.replace(subject, o) for o in other_subjects(request, other_count)]
        return _unique(kept), dropped
    pool = [p for p in others if p != request.prompt]
    source = "the other requests' neighbours" if pool else "shipped training prompts about other subjects"
    text = (f"request {request.prompt!r} has no subject: its neighbours for preservation are {source}, which do "
            "not protect what the model knows about its own subject; give ")
    warn(text + "subject= (or preserve_prompts=)", cli=text + "--subject", stacklevel=3)
    return _unique(pool or training_prompts())[:count], []


def _unique(xs: List[str]) -> List[str]:
    return list(dict.fromkeys(xs))


@dataclass
class Preservation:
    """The edit batch extended with the neighbour prompts.

    ``input_ids``/``attention_mask`` ``[B + N, T]``: the edit sequences (``prompt + " " + answer``,
    rows ``0..B-1``, as :func:`kne._text.encode` makes them) then the ``N`` neighbour prompts, right
    padded. ``edit`` is the edit :class:`Batch` (its rows index the same tensor). ``rows``/``pos``
    locate every preserved next-token distribution: the neighbours' last positions (``N``, first),
    then, with ``preserve_prompt_positions``, the edit prompts' positions before the answer, then
    with ``preserve_answer_end`` each edit sequence's last answer token.
    ``logp_before`` (``[P, V]`` float32) is set by :meth:`capture`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    edit: Batch
    rows: torch.Tensor
    pos: torch.Tensor
    prompts: List[str]
    dropped: List[str] = field(default_factory=list)
    old_answer_tokens: List[Optional[int]] = field(default_factory=list)  # per neighbour: its request's old first answer token
    logp_before: Optional[torch.Tensor] = None

    @property
    def num_neighbours(self) -> int:
        return len(self.prompts)

    @property
    def num_edit_positions(self) -> int:
        return int(self.edit.rows.numel())

    def neighbour_rows(self) -> torch.Tensor:
        """Rows of ``input_ids`` holding the neighbour prompts."""
        return torch.arange(self.edit.size_answers, self.edit.size_answers + self.num_neighbours,
                            device=self.input_ids.device)

    def selection(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, positions)`` of every logit the objective reads: the edit's answer-predicting
        positions, then the preserved ones."""
        return (torch.cat([self.edit.rows, self.rows]), torch.cat([self.edit.cols - 1, self.pos]))

    def capture(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep ``log p_before`` from the unedited model's logits at :meth:`selection`; returns the
        bool mask of the neighbours to keep: a neighbour whose top token is the first token of its
        request's old answer asks the edited relation in other words, and is dropped (then call
        :meth:`subset`)."""
        lp = torch.log_softmax(logits[self.num_edit_positions:].float(), dim=-1).detach()
        self.logp_before = lp
        top = lp[: self.num_neighbours].argmax(-1).tolist()
        return torch.tensor([old is None or t != old for t, old in zip(top, self.old_answer_tokens)], dtype=torch.bool)

    def subset(self, keep: torch.Tensor) -> "Preservation":
        """The same batch with only the neighbours ``keep`` marks (the others move to ``dropped``)."""
        keep = keep.cpu()
        if bool(keep.all()):
            return self
        B, N = self.edit.size_answers, self.num_neighbours
        kept = [j for j in range(N) if keep[j]]
        rows_kept = list(range(B)) + [B + j for j in kept]
        ids, mask = self.input_ids[rows_kept], self.attention_mask[rows_kept]
        T = int(mask.sum(1).max())
        ids, mask = ids[:, :T].contiguous(), mask[:, :T].contiguous()
        new_row = {B + j: B + i for i, j in enumerate(kept)}
        sel = [i for i in range(N) if keep[i]] + list(range(N, int(self.rows.numel())))  # neighbours, then prompt positions
        rows = torch.tensor([new_row.get(int(r), int(r)) for r in self.rows[sel].tolist()], dtype=torch.long,
                            device=self.rows.device)
        lp = self.logp_before[torch.tensor(sel, dtype=torch.long, device=self.logp_before.device)] if self.logp_before is not None else None
        return Preservation(input_ids=ids, attention_mask=mask,
                            edit=Batch(ids, mask, self.edit.rows, self.edit.cols, self.edit.lengths),
                            rows=rows, pos=self.pos[torch.tensor(sel, dtype=torch.long, device=self.pos.device)], prompts=[self.prompts[j] for j in kept],
                            dropped=self.dropped + [self.prompts[j] for j in range(N) if not keep[j]],
                            old_answer_tokens=[self.old_answer_tokens[j] for j in kept], logp_before=lp)

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """``KL(p_before || p_after)`` per preserved position (``[P]``, float32) from the logits at
        :meth:`selection`."""
        lb = self.logp_before
        la = torch.log_softmax(logits[self.num_edit_positions:].float(), dim=-1)
        return (lb.exp() * (lb - la)).sum(-1)

    def flips(self, logits: torch.Tensor) -> Optional[float]:
        """Share of neighbours whose top token differs from the unedited model's (``None`` without
        neighbours: with the projection on the KL holds none, and the projected ones do not move)."""
        n = self.num_neighbours
        if n == 0:
            return None
        after = logits[self.num_edit_positions:self.num_edit_positions + n].argmax(-1)
        before = self.logp_before[:n].argmax(-1).to(after.device)
        return float((after != before).float().mean())


def build_preservation(tokenizer, requests, config, device, preserve_prompts: Optional[Sequence[str]] = None
                       ) -> Preservation:
    """The edit batch of ``requests`` extended with their neighbours (see the module docstring).

    ``preserve_prompts`` replaces the generated neighbours (for every request). The edit rows are
    exactly :func:`kne._text.encode`'s batch of the requests, padded further on the right."""
    add = config.add_special_tokens
    edit = encode(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                  add_special_tokens=add, always_space=config.always_space)
    own = {r.prompt for r in requests}
    prompts: List[str] = []
    dropped: List[str] = []
    olds: List[Optional[int]] = []
    if preserve_prompts is not None:
        if isinstance(preserve_prompts, str) or not all(isinstance(p, str) and p.strip() for p in preserve_prompts):
            raise ValueError("preserve_prompts must be a list of non-empty prompt strings")
        prompts = _unique(list(preserve_prompts))
        olds = [None] * len(prompts)
    else:
        with_subject = [r for r in requests if r.subject]
        found = {id(r): neighbour_prompts(r, config.preserve_count, other_count=config.preserve_others)
                 for r in with_subject}
        theirs = _unique([p for kept, _ in found.values() for p in kept])
        for r in requests:
            kept, drop = found[id(r)] if r.subject else neighbour_prompts(r, config.preserve_count, others=theirs)
            old = _first_answer_token(tokenizer, r, add)
            for p in kept:
                if p not in prompts and p not in own:  # never preserve a prompt the call edits
                    prompts.append(p)
                    olds.append(old)
            dropped += drop
    seqs = [edit.input_ids[b, : int(edit.attention_mask[b].sum())].tolist() for b in range(edit.size)]
    rows: List[int] = []
    pos: List[int] = []
    for j, p in enumerate(prompts):
        ids = list(tokenizer(p, add_special_tokens=add)["input_ids"])
        if not ids:
            raise ValueError(f"preserve prompt {p!r} tokenizes to nothing: give prompts with text")
        rows.append(edit.size + j)
        pos.append(len(ids) - 1)
        seqs.append(ids)
    if config.preserve_prompt_positions:
        for b in range(edit.size):
            start = int(edit.cols[edit.rows == b].min())  # first answer token: the prompt is 0..start-1
            rows += [b] * (start - 1)  # positions 0..start-2 predict prompt tokens 1..start-1
            pos += list(range(start - 1))
    if config.preserve_answer_end:
        for b in range(edit.size):
            rows.append(b)  # the answer's last token predicts what follows the answer
            pos.append(int(edit.cols[edit.rows == b].max()))
    ids, mask = pad_batch(seqs, pad_id(tokenizer))
    return Preservation(input_ids=ids.to(device), attention_mask=mask.to(device),
                        edit=Batch(ids, mask, edit.rows, edit.cols, edit.lengths).to(device),
                        rows=torch.tensor(rows, dtype=torch.long, device=device),
                        pos=torch.tensor(pos, dtype=torch.long, device=device),
                        prompts=prompts, dropped=dropped, old_answer_tokens=olds)


def _first_answer_token(tokenizer, request, add_special_tokens: bool) -> Optional[int]:
    """The first token of the request's old answer after its prompt, or ``None`` when unknown."""
    if not request.ground_truth:
        return None
    full = list(tokenizer(join(request.prompt, request.ground_truth), add_special_tokens=add_special_tokens)["input_ids"])
    n = len(tokenizer(request.prompt, add_special_tokens=add_special_tokens)["input_ids"])
    return full[n] if len(full) > n else None
