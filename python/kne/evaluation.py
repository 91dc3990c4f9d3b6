"""Edit quality with EasyEdit's definitions (so numbers compare with published KnowEdit tables).

Tokenisation follows EasyEdit's ``test_prediction_acc`` by default: the text is
``prompt + " " + answer`` always (even when the answer starts with a space), tokenised with the
tokenizer's special tokens (``add_special_tokens=True``: BOS where the tokenizer adds it), and the
answer tokens are those after the prompt's own tokens (counted the same way). Two deliberate
differences that do not change the numbers: batches are right-padded with exact positions (EasyEdit
left-pads its locality and portability lists), and prompt tokens are counted, not non-pad tokens
(the same unless the pad token is also the BOS token). ``evaluate(..., add_special_tokens=False,
always_space=False)`` gives kne 0.2's numbers, tokenised as the edit's own training target.

* Edit Succ. (``rewrite_acc``): teacher-forced token accuracy of ``target_new`` after
  ``prompt + " " + target_new`` (the argmax at position k-1 predicts token k; mean over the answer
  tokens).
* Rephrase (``rephrase_acc``): the same on ``rephrase_prompt``.
* Portability (per kind): the same on each portability prompt with its ground truth; a kind's value
  is the mean over its prompts, a record's the mean over its kinds.
* Locality (per kind): the fraction of answer-token argmax predictions (after
  ``prompt + " " + ground_truth``) unchanged from the pre-edit model -- it needs the pre-edit
  predictions: pass ``pre=`` (an :class:`EvalResult` of the unedited model on the same requests).
* Fluency (opt-in): weighted bigram/trigram entropy (weights 2/3, 4/3, log base 2) of a 100-token
  top-k=5 sampled generation from the prompt (EasyEdit's ``n_gram_entropy``); seeded. Published
  tables print it times 100. Words are split with NLTK's Treebank tokenizer (EasyEdit uses
  ``nltk.word_tokenize``, which also splits sentences first: it needs the ``punkt`` download).

Beyond teacher forcing (each opt-in, each a column of ``kne eval``, ``kne compare`` and ``kne plot``):

* ``generate=True``: generated answers, EasyEdit's protocol (:mod:`kne.generation`: the chat
  template, greedy until ``"."``, ``"\n"`` or EOS, SQuAD-normalised exact match).
  ``gen_rewrite_acc``, ``gen_rephrase_acc`` and ``gen_portability`` (per kind) are the exact match
  of the generated answer with the target or ground truth, and ``gen_rewrite_contains``,
  ``gen_rephrase_contains``, ``gen_portability_contains`` whether the answer states it once
  (:func:`kne.generation.contains_match`); ``gen_locality`` (per kind) whether the
  generated answer after the edit equals the one before it (it needs ``pre``). The texts are kept
  in ``generated``.
* ``other_subjects=N``: the edited relation asked of up to N other subjects from the shipped
  templates (:mod:`kne.others`); ``others_moved`` is the share that answer the new target after the
  edit (lower is better; needs ``pre``, which leaves out the subjects already answering it).
* ``drift=True``: the mean NLL increase per token of the model on a fixed held-out text, and the
  share of its tokens whose argmax changed (:mod:`kne.drift`; ``drift`` and ``drift_flips``, the
  same for every request of the call; needs ``pre``).

Summary (as EasyEdit's KnowEdit runner): the mean over records of each per-record value.
"""

from __future__ import annotations

import inspect
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .metrics import METRICS, mean_present, record_value
from ._text import answer_predictions, check_lengths, check_tokenizer, encode
from ._utils import answer_logits, as_int, input_device, max_positions, restore_training, training_flags
from .requests import as_requests

__all__ = ["EvalResult", "evaluate", "measure_before", "grade_generated", "ngram_entropy", "generate_topk", "METRICS", "mean_present", "record_value"]


@dataclass
class EvalResult:
    """Per-request metrics (``records``) and their means (:meth:`summary`).

    Each record has ``rewrite_acc``, ``rephrase_acc`` (or ``None``), ``portability`` and
    ``locality`` (``{kind: value}``; locality only when ``pre`` was given), ``fluency`` (or
    ``None``) and ``locality_output`` (the answer-token predictions, what a later ``pre=`` needs).
    """

    records: List[Dict[str, Any]]

    def summary(self) -> Dict[str, Optional[float]]:
        """``edit_succ``, ``rephrase``, ``portability``, ``locality``, ``fluency`` (means over the
        records that have the value; ``None`` when none has) and ``n``."""
        return {"n": len(self.records),
                **{key: mean_present([record_value(r, field) for r in self.records]) for key, _, field in METRICS}}

    def to_dict(self) -> Dict[str, Any]:
        return {"summary": self.summary(), "records": self.records}


def _chunks(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@torch.no_grad()
def _predict(model, tokenizer, pairs: Sequence[Tuple[str, str]], add_special_tokens: bool,
             batch_size: int, always_space: bool = True) -> List[Tuple[List[int], List[int]]]:
    """For each (prompt, answer): (argmax predictions, answer tokens) at the answer positions."""
    out: List[Tuple[List[int], List[int]]] = []
    device = input_device(model)
    for chunk in _chunks(list(pairs), batch_size):
        batch = encode(tokenizer, [p for p, _ in chunk], [a for _, a in chunk],
                       add_special_tokens=add_special_tokens, always_space=always_space, device=device)
        pred = answer_predictions(answer_logits(model, batch), batch).cpu().tolist()
        tgt = batch.targets.cpu().tolist()
        pos = 0
        for n in batch.lengths:
            out.append((pred[pos:pos + n], tgt[pos:pos + n]))
            pos += n
    return out


def _acc(pred: List[int], tgt: List[int]) -> float:
    return sum(int(a == b) for a, b in zip(pred, tgt)) / len(tgt)


_TREEBANK = None


def _words(text: str) -> List[str]:
    global _TREEBANK
    if _TREEBANK is None:
        try:
            from nltk.tokenize import NLTKWordTokenizer

            _TREEBANK = NLTKWordTokenizer().tokenize
        except ImportError:  # pragma: no cover - nltk is a dependency
            _TREEBANK = lambda s: re.findall(r"\w+|[^\w\s]", s)  # noqa: E731
    return _TREEBANK(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """EasyEdit's ``compute_n_gram_entropy``: mean over n of ``w_n * H(n-gram distribution)``, log 2."""
    words = _words(text)
    vals = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log(c / total) / math.log(2) for c in grams.values()) if total else 0.0
        vals.append(h * w)
    return sum(vals) / len(vals)


@torch.no_grad()
def generate_topk(model, tokenizer, prompt: str, *, max_len: int = 100, top_k: int = 5, seed: int = 0,
                  add_special_tokens: bool = True) -> str:
    """EasyEdit's ``generate_fast``: top-k sampling until the sequence holds ``max_len`` tokens
    (prompt included, no stop at EOS; the prompt tokenised with the tokenizer's special tokens, as
    EasyEdit does), decoded without special tokens."""
    device = input_device(model)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]], device=device)
    if not -(2**63) <= seed < 2**64:  # seed + record index past what torch.manual_seed takes: wrap it
        seed %= 2**64
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # transformers renamed the KV-cache argument from past_key_values to cache (5.2x)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    cur = ids
    while ids.shape[1] < max_len:
        out = model(input_ids=cur, use_cache=True, **{key: past})
        past = out[key] if key in out else out.get("past_key_values")
        probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
        top = torch.topk(probs, top_k, dim=-1)
        p = top.values / top.values.sum(-1, keepdim=True)
        nxt = top.indices.gather(-1, torch.multinomial(p, 1, generator=gen)).to(device)
        ids = torch.cat([ids, nxt], dim=1)
        cur = nxt
    text = tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def evaluate(model: nn.Module, tokenizer, requests, pre: Optional[EvalResult] = None, *, fluency: bool = False,
             seed: int = 0, add_special_tokens: bool = True, always_space: bool = True,
             batch_size: int = 16, generate: bool = False, max_new_tokens: int = 16, template: str = "auto",
             other_subjects: int = 0, drift=False) -> EvalResult:
    """Evaluate ``requests`` on ``model`` with EasyEdit's definitions (see the module docstring).

    Call it once before the edit and pass that result as ``pre`` after it: locality compares the
    two (evaluate both with the same options). ``fluency=True`` adds the generation entropy (one
    100-token generation per request, seeded with ``seed``). The model is not modified.

    Tokenisation: EasyEdit's by default (``prompt + " " + answer`` even when the answer starts with
    a space; the tokenizer's special tokens, so BOS where it adds one). ``add_special_tokens=False``
    leaves BOS out; ``always_space=False`` joins without a second space when the answer starts with
    whitespace -- both ``False`` is kne 0.2's evaluation and the edit's own training tokenisation.

    ``generate``, ``other_subjects`` and ``drift`` add the measures of the module docstring
    (``max_new_tokens`` and ``template`` shape the generation; ``drift`` may also be a list of the
    held-out sequences to score). Each compares with ``pre``, which must have been evaluated with
    the same options. The teacher-forced metrics are the same with or without them.
    """
    check_tokenizer(tokenizer)
    reqs = as_requests(requests)
    seed = as_int(seed, "seed")
    batch_size = as_int(batch_size, "batch_size", 1)
    other_subjects = as_int(other_subjects, "other_subjects", 0)
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", 1)
    if other_subjects:
        from .others import other_subject_prompts

        asked = [other_subject_prompts(r, other_subjects) for r in reqs]
        if not any(t for t, _, _ in asked):
            raise ValueError(f"other_subjects={other_subjects}: no shipped template asks the relation of "
                             f"{'this request' if len(reqs) == 1 else 'any of these requests'} ("
                             + ("it has no subject" if not reqs[0].subject else f"{reqs[0].prompt!r}") +
                             "); other subjects can be asked only of the relations kne/data/preservation.json ships")
    if pre is not None and len(pre.records) != len(reqs):
        raise ValueError(f"pre has {len(pre.records)} records but {len(reqs)} requests were given: evaluate the "
                         "same requests before and after the edit")
    modes = training_flags(model)
    model.eval()
    try:
        # Gather every (prompt, answer) pair of every request, predict them in batches.
        pairs: List[Tuple[str, str]] = []
        where: List[Tuple[int, str, Optional[str]]] = []  # (request, field, kind)
        for i, r in enumerate(reqs):
            pairs.append((r.prompt, r.target_new)); where.append((i, "rewrite", None))
            if r.rephrase_prompt:
                pairs.append((r.rephrase_prompt, r.target_new)); where.append((i, "rephrase", None))
            for kind, probes in r.portability.items():
                for pr in probes:
                    pairs.append((pr["prompt"], pr["ground_truth"])); where.append((i, "portability", kind))
            for kind, probes in r.locality.items():
                for pr in probes:
                    pairs.append((pr["prompt"], pr["ground_truth"])); where.append((i, "locality", kind))
        check_lengths(tokenizer, pairs, max_positions(model), add_special_tokens)
        preds = _predict(model, tokenizer, pairs, add_special_tokens, batch_size, always_space)
        records: List[Dict[str, Any]] = [
            {"rewrite_acc": None, "rephrase_acc": None, "portability": {}, "locality": {}, "fluency": None,
             "locality_output": {}} for _ in reqs]
        port: List[Dict[str, List[float]]] = [{} for _ in reqs]
        for (i, fld, kind), (pred, tgt) in zip(where, preds):
            rec = records[i]
            if fld == "rewrite":
                rec["rewrite_acc"] = _acc(pred, tgt)
            elif fld == "rephrase":
                rec["rephrase_acc"] = _acc(pred, tgt)
            elif fld == "portability":
                port[i].setdefault(kind, []).append(_acc(pred, tgt))
            else:
                rec["locality_output"].setdefault(kind, []).append(pred)
        for i, rec in enumerate(records):
            rec["portability"] = {k: sum(v) / len(v) for k, v in port[i].items()}
            if pre is not None:
                before = pre.records[i].get("locality_output") or {}
                for kind, outs in rec["locality_output"].items():
                    if kind not in before or len(before[kind]) != len(outs):
                        raise ValueError(f"pre lacks the locality predictions of request {i} ({kind!r}): "
                                         "evaluate the same requests before the edit")
                    accs = [sum(int(a == b) for a, b in zip(x, y)) / len(y) for x, y in zip(outs, before[kind])]
                    rec["locality"][kind] = sum(accs) / len(accs)
            if fluency:
                rec["fluency"] = ngram_entropy(generate_topk(model, tokenizer, reqs[i].prompt, seed=seed + i,
                                                             add_special_tokens=add_special_tokens))
        if generate:
            _generated(model, tokenizer, reqs, records, pre, max_new_tokens, batch_size, template)
        if other_subjects:
            _other_subjects(model, tokenizer, reqs, records, pre, asked, add_special_tokens, batch_size, always_space)
        if drift is not False:
            _drift(model, tokenizer, records, pre, drift, batch_size)
        return EvalResult(records)
    finally:
        restore_training(modes)


def _pre_record(pre: Optional[EvalResult], i: int, key: str, what: str) -> Optional[Dict[str, Any]]:
    if pre is None:
        return None
    got = pre.records[i].get(key)
    if got is None:
        raise ValueError(f"pre lacks {what} of request {i}: evaluate the unedited model with the same options "
                         f"({what} on) and pass that result as pre")
    return got


def measure_before(model: nn.Module, tokenizer, requests, *, generate: bool = False, max_new_tokens: int = 16,
                   template: str = "auto", other_subjects=0, add_special_tokens: bool = True,
                   always_space: bool = True, batch_size: int = 16) -> List[Dict[str, Any]]:
    """What the measures need of the unedited model, for each request, all batched together: the
    generated locality answers (``generated``) and the other subjects already answering the new
    target (``others``). Merged into the records of a teacher-forced ``evaluate(model, tok, [req])``
    it is a ``pre`` for ``evaluate(..., pre=pre, generate=..., other_subjects=...)`` after the edit,
    without generating the answers that only the edited model is graded on. ``other_subjects``: a
    number for every request, or one per request (0: not asked). The model is not modified."""
    reqs = as_requests(requests)
    counts = list(other_subjects) if isinstance(other_subjects, (list, tuple)) else [other_subjects] * len(reqs)
    if len(counts) != len(reqs):
        raise ValueError(f"{len(counts)} other_subjects counts for {len(reqs)} requests")
    counts = [as_int(c, "other_subjects", 0) for c in counts]
    records: List[Dict[str, Any]] = [{} for _ in reqs]
    modes = training_flags(model)
    model.eval()
    try:
        if generate:
            _generated(model, tokenizer, reqs, records, None, as_int(max_new_tokens, "max_new_tokens", 1),
                       as_int(batch_size, "batch_size", 1), template, fields=("locality",))
        if any(counts):
            from .others import other_subject_prompts

            asked = [other_subject_prompts(r, c) if c else (None, [], []) for r, c in zip(reqs, counts)]
            _other_subjects(model, tokenizer, reqs, records, None, asked, add_special_tokens,
                            as_int(batch_size, "batch_size", 1), always_space)
    finally:
        restore_training(modes)
    return [{k: rec[k] for k in ("generated", "others") if k in rec} for rec in records]


_FIELDS = ("rewrite", "rephrase", "portability", "locality")


def _generated(model, tokenizer, reqs, records, pre, max_new_tokens: int, batch_size: int, template: str,
               fields=_FIELDS) -> None:
    from .generation import answer_limit, generate_answers

    prompts, where = [], []  # (request, field, kind, truth)
    for i, r in enumerate(reqs):
        if "rewrite" in fields:
            prompts.append(r.prompt); where.append((i, "rewrite", None, r.target_new))
        if r.rephrase_prompt and "rephrase" in fields:
            prompts.append(r.rephrase_prompt); where.append((i, "rephrase", None, r.target_new))
        for kind, probes in r.portability.items() if "portability" in fields else ():
            for pr in probes:
                prompts.append(pr["prompt"]); where.append((i, "portability", kind, pr["ground_truth"]))
        for kind, probes in r.locality.items():
            for pr in probes:
                prompts.append(pr["prompt"]); where.append((i, "locality", kind, None))
    limits = [max_new_tokens if truth is None else answer_limit(tokenizer, truth, max_new_tokens)
              for _, _, _, truth in where]
    texts, used = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, template=template, limits=limits)
    for rec in records:
        rec["generated"] = {"template": used, "rewrite": None, "rephrase": None, "portability": {}, "locality": {}}
    for (i, fld, kind, _), text in zip(where, texts):
        g = records[i]["generated"]
        if fld in ("rewrite", "rephrase"):
            g[fld] = text
        else:
            g[fld].setdefault(kind, []).append(text)
    if fields != _FIELDS:
        return
    for i, rec in enumerate(records):
        rec.update(grade_generated(reqs[i], rec["generated"]))
        rec["gen_locality"] = {}
        before = _pre_record(pre, i, "generated", "the generated answers")
        if before is not None:
            for kind, outs in rec["generated"]["locality"].items():
                was = before["locality"].get(kind, [])
                if len(was) != len(outs):
                    raise ValueError(f"pre lacks the generated locality answers of request {i} ({kind!r})")
                rec["gen_locality"][kind] = sum(float(a == b) for a, b in zip(outs, was)) / len(outs)


def grade_generated(request, generated: Dict[str, Any]) -> Dict[str, Any]:
    """The grades of one request's generated answers (``generated``, as a record keeps them): for
    the rewrite, the rephrase and each portability kind, EasyEdit's exact match (``gen_*_acc``,
    ``gen_portability``) and :func:`kne.generation.contains_match` (``gen_*_contains``,
    ``gen_portability_contains``). A pure function of the texts: a results file can be graded
    again from the texts it keeps."""
    from .generation import contains_match, exact_match

    req = as_requests([request])[0]
    out: Dict[str, Any] = {"gen_rewrite_acc": None, "gen_rephrase_acc": None, "gen_rewrite_contains": None,
                           "gen_rephrase_contains": None, "gen_portability": {}, "gen_portability_contains": {}}
    for fld, truth in (("rewrite", req.target_new), ("rephrase", req.target_new if req.rephrase_prompt else None)):
        text = generated.get(fld)
        if text is not None and truth is not None:
            out[f"gen_{fld}_acc"] = float(exact_match(text, truth))
            out[f"gen_{fld}_contains"] = float(contains_match(text, truth))
    for kind, probes in req.portability.items():
        texts = generated.get("portability", {}).get(kind, [])
        if len(texts) != len(probes):
            raise ValueError(f"{len(texts)} generated answers for the {len(probes)} {kind!r} portability probes")
        if probes:
            truths = [pr["ground_truth"] for pr in probes]
            for key, grade in (("gen_portability", exact_match), ("gen_portability_contains", contains_match)):
                out[key][kind] = sum(float(grade(t, g)) for t, g in zip(texts, truths)) / len(probes)
    return out


def _other_subjects(model, tokenizer, reqs, records, pre, asked, add_special_tokens: bool, batch_size: int,
                    always_space: bool) -> None:
    pairs, where = [], []
    for i, (r, (t, subs, prompts)) in enumerate(zip(reqs, asked)):
        before = _pre_record(pre, i, "others", "the other subjects")
        if before is not None:  # ask what the unedited model was asked, less what already answered the target
            subs = [s for s, a in zip(before["subjects"], before["already"]) if not a]
            prompts = [before["template"].format(s) for s in subs] if before["template"] else []
        records[i]["others"] = {"template": t if before is None else before["template"], "subjects": subs}
        for p in prompts:
            pairs.append((p, r.target_new)); where.append(i)
    check_lengths(tokenizer, pairs, max_positions(model), add_special_tokens)
    preds = _predict(model, tokenizer, pairs, add_special_tokens, batch_size, always_space)
    hits: List[List[bool]] = [[] for _ in reqs]
    for i, (pred, tgt) in zip(where, preds):
        hits[i].append(pred == tgt)  # every target token the argmax: the subject now answers the target
    for i, rec in enumerate(records):
        o = rec["others"]
        if pre is None:
            o["already"] = hits[i]
        else:
            o["moved"] = hits[i]
            rec["others_moved"] = (sum(hits[i]) / len(hits[i])) if hits[i] else None


def _drift(model, tokenizer, records, pre, drift, batch_size: int) -> None:
    from .drift import compare, drift_text, token_scores

    text = drift_text(model, tokenizer)
    if drift is True:
        rows = list(range(len(text.sequences)))
    else:
        rows = [as_int(r, "drift rows", 0) for r in drift]
        bad = [r for r in rows if r >= len(text.sequences)]
        if bad or not rows:
            raise ValueError(f"drift rows {bad or rows} are not sequences of the held-out text (0..{len(text.sequences) - 1})")
    if pre is not None and pre.records:
        state = pre.records[0].get("drift_state")
        if state is None or state[0] != rows:
            raise ValueError("pre lacks the drift scores of these sequences: evaluate the unedited model with the "
                             "same drift option and pass that result as pre")
    scores = token_scores(model, tokenizer, text, rows, batch_size=max(batch_size, 32))
    for rec in records:
        if pre is None:
            rec["drift_state"] = (rows, scores)  # not JSON: kne.runs drops it from the records it keeps
        else:
            rec["drift"], rec["drift_flips"] = compare(pre.records[0]["drift_state"][1], scores)
