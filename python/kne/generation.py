"""Generated answers, graded as EasyEdit grades them.

EasyEdit's generation protocol (``easyeditor/evaluate/evaluate_utils.py``: ``generate_texts``,
``exact_match_score``, ``normalize_answer``), reproduced:

* the prompt goes into the tokenizer's chat template as the user's message, after the system
  message ``"You are a helpful assistant."``, with the generation prompt added
  (``apply_chat_template(..., add_generation_prompt=True)``), and that text is tokenised with the
  tokenizer's special tokens; a tokenizer without a chat template gets the bare prompt
  (:func:`prompt_text` says which);
* greedy decoding, stopping at ``"."``, ``"\\n"`` or EOS, at most ``max_new_tokens`` new tokens
  (default :data:`MAX_NEW_TOKENS`; EasyEdit: 512). The bound never decides a grade: an answer graded
  against a truth may run to the truth's length plus :data:`GRADE_SLACK` tokens when that is more
  (:func:`answer_limit`), so any answer that could match is generated whole; the answers compared
  before and after an edit (generated locality) are compared on their first ``max_new_tokens``;
* the new tokens decoded as they are (special tokens included), then ``"."``, ``"\\n"`` and the EOS
  text each removed once from the end, in that order;
* graded by exact match after SQuAD's normalisation: lower case, punctuation removed, the articles
  ``a``/``an``/``the`` removed, whitespace collapsed. (Also graded by :func:`contains_match`, the
  truth stated once in the answer: EasyEdit's other grade is an LLM judge, which needs an API key.)

EasyEdit generates one prompt at a time without a KV cache; :func:`generate_answers` batches the
prompts (left padding, with the KV cache) and cuts each row where a single prompt would have
stopped, so the texts are the same (``tests/test_generation.py`` holds it to one prompt at a time
and to values EasyEdit's own code computed).
"""

from __future__ import annotations

import re
import string
from typing import List, Optional, Sequence, Tuple

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from ._utils import input_device

__all__ = ["SYSTEM_MESSAGE", "STOP_STRINGS", "MAX_NEW_TOKENS", "GRADE_SLACK", "normalize_answer", "exact_match",
           "contains_match", "prompt_text", "answer_limit", "generate_answers"]

SYSTEM_MESSAGE = "You are a helpful assistant."
MAX_NEW_TOKENS = 16  # new tokens per answer by default (EasyEdit: 512; SmolLM2 answers in sentences)
GRADE_SLACK = 4  # tokens a graded answer may run past its truth's length (articles, punctuation, the stop)
STOP_STRINGS = (".", "\n")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation, as EasyEdit's ``normalize_answer``: lower case, punctuation removed,
    articles removed, whitespace collapsed."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, truth: str) -> bool:
    """EasyEdit's ``exact_match_score``: the two normalised texts are equal."""
    return normalize_answer(prediction) == normalize_answer(truth)


def contains_match(prediction: str, truth: str) -> bool:
    """The normalised truth occurs in the normalised answer exactly once, as whole words.

    A judge-free stand-in for the two rules of EasyEdit's LLM-judge rubric
    (``test_prediction_acc_LLM_judge``) that a sentence answer meets or breaks most often: an answer
    that states the gold target in a sentence is correct ("Malia and Sasha Obama are the names of
    ..."), a repeated answer is not. It does not see contradictions ("... is not male" contains
    "male"), so it is lenient where the judge is not; exact match is EasyEdit's own grade, and a
    chat model that answers in sentences scores near 0 on it."""
    t = normalize_answer(truth)
    if not t:
        return False
    return f" {normalize_answer(prediction)} ".count(f" {t} ") == 1


def prompt_text(tokenizer, prompt: str, template: str = "auto") -> Tuple[str, str]:
    """``(text to tokenise, template)``: the chat template with EasyEdit's system message
    (``"chat"``; with ``template="auto"`` when the tokenizer has one), else the prompt itself
    (``"bare"``)."""
    if template not in ("auto", "chat", "bare"):
        raise ValueError(f"template={template!r} is invalid: use 'auto', 'chat' or 'bare'")
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("template='chat' but the tokenizer has no chat template: use 'bare' or 'auto'")
    if template == "chat" or (template == "auto" and has):
        messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), "chat"
    return prompt, "bare"


def answer_limit(tokenizer, truth: str, max_new_tokens: int = MAX_NEW_TOKENS) -> int:
    """New tokens an answer graded against ``truth`` may run to: ``max_new_tokens``, or the truth's
    token count plus :data:`GRADE_SLACK` when that is more."""
    return max(max_new_tokens, len(tokenizer(truth, add_special_tokens=False)["input_ids"]) + GRADE_SLACK)


def _stops(tokenizer) -> List[str]:
    eos = tokenizer.eos_token
    return list(STOP_STRINGS) + ([eos] if eos else [])


def _strip(tokenizer, text: str) -> str:
    for suffix in _stops(tokenizer):  # EasyEdit: ".", "\n", EOS, each removed once, in that order
        if suffix and text.endswith(suffix):
            text = text[: -len(suffix)]
    return text


class _Stops(StoppingCriteria):
    """A stopping criterion that stops nothing itself: it records, for each row of the batch, the
    length at which generation's own criteria (the stop strings, EOS) first held -- where a single
    prompt's run would have ended. (In a batch, a finished row goes on receiving padding.)"""

    def __init__(self, tokenizer, rows: int, start: int):
        self.strings = StopStringCriteria(tokenizer=tokenizer, stop_strings=_stops(tokenizer))
        self.eos = tokenizer.eos_token_id
        self.ends: List[Optional[int]] = [None] * rows
        self.start = start

    def __call__(self, input_ids, scores, **kwargs):
        done = self.strings(input_ids, scores)
        if self.eos is not None:
            done = done | (input_ids[:, -1] == self.eos)
        for r, d in enumerate(done.tolist()):
            if d and self.ends[r] is None:
                self.ends[r] = input_ids.shape[1] - self.start
        return torch.zeros_like(done)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                     batch_size: int = 16, template: str = "auto",
                     limits: Optional[Sequence[int]] = None) -> Tuple[List[str], str]:
    """``(texts, template used)``: the greedy answer to each prompt under EasyEdit's protocol
    (module docstring), ``batch_size`` prompts at a time (left-padded, KV cache), at most
    ``max_new_tokens`` each, or ``limits[i]`` for prompt ``i`` (each text is what that prompt alone
    gives with that bound). The template used is ``"chat"`` or ``"bare"`` (``template``:
    ``"auto"``, ``"chat"``, ``"bare"``). The model is not modified."""
    limits = [max_new_tokens] * len(prompts) if limits is None else [int(x) for x in limits]
    if len(limits) != len(prompts) or any(x < 1 for x in limits):
        raise ValueError(f"limits must give a positive bound for each of the {len(prompts)} prompts")
    if not prompts:
        return [], prompt_text(tokenizer, "", template)[1]
    device = input_device(model)
    texts, used = [], "bare"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            caps = limits[i:i + batch_size]
            made = [prompt_text(tokenizer, p, template) for p in chunk]
            used = made[0][1]
            enc = tokenizer([t for t, _ in made], padding=True, return_tensors="pt").to(device)
            start = enc["input_ids"].shape[1]
            ends = _Stops(tokenizer, len(chunk), start)
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max(caps), do_sample=False, num_beams=1,
                                 stop_strings=_stops(tokenizer), tokenizer=tokenizer, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([ends]), use_cache=True,
                                 top_p=None, top_k=None, temperature=None)
            new = out[:, start:].cpu().tolist()
            for row, end, cap in zip(new, ends.ends, caps):
                texts.append(_strip(tokenizer, tokenizer.decode(row[:min(cap, end or cap)])))
    finally:
        tokenizer.padding_side = side
    return texts, used
