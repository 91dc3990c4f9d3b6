"""Tokenising prompt/answer pairs the way EasyEdit does, and teacher-forced answer scores.

Two joining rules share one code path: EasyEdit's evaluation rule, ``prompt + " " + answer``
always (``always_space=True``, what :func:`kne.evaluate` uses by default), and the edit's own
training target (the default here, used by attribution, the edits and FT-M): no second space when
the answer already starts with whitespace, so a target stored as ``" Paris"`` trains the token
``" Paris"`` and not a lone space followed by ``"Paris"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["Batch", "encode", "join", "answer_logprobs", "check_tokenizer", "check_lengths"]


def join(prompt: str, answer: str, *, always_space: bool = False) -> str:
    """``prompt + " " + answer``; no second space when ``answer`` starts with whitespace, unless
    ``always_space`` (EasyEdit's evaluation joins with a space whatever the answer holds)."""
    if always_space:
        return prompt + " " + answer
    return prompt + answer if answer[:1].isspace() else prompt + " " + answer


@dataclass
class Batch:
    """Right-padded ``prompt + " " + answer`` sequences with the answer-token positions.

    ``input_ids``/``attention_mask`` ``[B, T]``; ``rows``/``cols`` (LongTensors ``[n]``) locate every
    answer token; the logits that predict it sit at ``cols - 1``; ``segment`` gives the sequence of
    each answer token (== ``rows``); ``lengths`` the number of answer tokens per sequence.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    lengths: List[int]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def size_answers(self) -> int:
        """Sequences with an answer (rows ``0..size_answers-1``; rows after them, such as the
        neighbour prompts of preservation, carry none)."""
        return len(self.lengths)

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[self.rows, self.cols]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.rows.to(device),
                     self.cols.to(device), self.lengths)

    def repeat(self, k: int) -> "Batch":
        """``k`` copies of every sequence, copy-major: sequence ``b`` of copy ``c`` is row ``c*B + b``."""
        B = self.size
        off = (torch.arange(k, device=self.rows.device) * B).repeat_interleave(self.rows.numel())
        return Batch(self.input_ids.repeat(k, 1), self.attention_mask.repeat(k, 1),
                     self.rows.repeat(k) + off, self.cols.repeat(k), self.lengths * k)


def check_tokenizer(tokenizer) -> None:
    """Refuse a missing tokenizer before any work starts (``None`` fails deep inside otherwise)."""
    if tokenizer is None:
        raise ValueError("tokenizer is None: pass the model's tokenizer (kne.load_model returns (model, tokenizer); "
                         "for other models AutoTokenizer.from_pretrained(<the model's name or folder>))")
    if not callable(tokenizer) or isinstance(tokenizer, torch.nn.Module):
        raise ValueError(f"tokenizer must be a Hugging Face tokenizer (a callable that returns input_ids), got "
                         f"{type(tokenizer).__name__}" + (": that is a model; pass the model first, then the tokenizer "
                                                          "(model, tokenizer)" if isinstance(tokenizer, torch.nn.Module)
                                                          else ""))


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def check_lengths(tokenizer, pairs: Iterable[Tuple[str, Optional[str]]], limit: Optional[Tuple[int, str]],
                  add_special_tokens: bool) -> None:
    """Refuse a text longer than the model's positions before it reaches the model (GPT-2 raises an
    ``IndexError`` deep in its embedding; a rotary model runs for minutes and then answers
    nonsense). ``pairs`` are ``(prompt, answer)`` (``answer`` ``None`` for a prompt alone);
    ``limit`` is :func:`kne._utils.max_positions` of the model (``None``: no limit known)."""
    if limit is None:
        return
    n_max, field = limit
    for prompt, answer in pairs:
        text = prompt if answer is None else join(prompt, answer)
        n = len(_ids(tokenizer, text, add_special_tokens))
        if n > n_max:
            what = f"prompt {_short(prompt)!r}" + ("" if answer is None else f" with its answer {_short(answer)!r}")
            raise ValueError(f"{what} is {n} tokens, more than the {n_max} positions this model has "
                             f"(config.{field}): shorten it")


def _ids(tokenizer, text: str, add_special_tokens: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its EOS, else 0 (padded
    positions are masked out; the id only has to be a valid one)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def pad_batch(seqs: Sequence[Sequence[int]], pad: int, left: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(seqs), longest]`` int64, of token lists padded
    with ``pad`` on the right (on the left with ``left=True``, as generation needs)."""
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, x in enumerate(seqs):
        at = slice(T - len(x), T) if left else slice(0, len(x))
        ids[b, at] = torch.tensor(list(x), dtype=torch.long)
        mask[b, at] = 1
    return ids, mask


def encode(tokenizer, prompts: Sequence[str], answers: Sequence[str], *, add_special_tokens: bool = False,
           always_space: bool = False, device=None) -> Batch:
    """Tokenise ``join(prompt, answer, always_space=always_space)`` for each pair, passing
    ``add_special_tokens`` to the tokenizer (``True``: BOS where the tokenizer adds one); the answer
    tokens are those after the prompt's own tokens, counted with the same ``add_special_tokens``
    (EasyEdit's rule)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    seqs, starts = [], []
    for p, a in zip(prompts, answers):
        full = _ids(tokenizer, join(p, a, always_space=always_space), add_special_tokens)
        n_prompt = len(_ids(tokenizer, p, add_special_tokens))
        if n_prompt < 1:
            raise ValueError(f"prompt {p!r} tokenizes to nothing: the first answer token needs a context")
        if n_prompt >= len(full):
            raise ValueError(f"answer {a!r} adds no tokens after prompt {p!r}: give a non-empty answer")
        seqs.append(full)
        starts.append(n_prompt)
    ids, mask = pad_batch(seqs, pad_id(tokenizer))
    rows, cols, lengths = [], [], []
    for b, (s, st) in enumerate(zip(seqs, starts)):
        rows += [b] * (len(s) - st)
        cols += list(range(st, len(s)))
        lengths.append(len(s) - st)
    batch = Batch(ids, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long), lengths)
    return batch.to(device) if device is not None else batch


def _at_answers(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The ``[n, V]`` logits that predict ``batch``'s answer tokens: from the model's full
    ``[B, T, V]`` output, or ``logits`` itself when already selected (``kne._utils.answer_logits``)."""
    return logits if logits.dim() == 2 else logits[batch.rows, batch.cols - 1]


def answer_logprobs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Float32 ``log P(answer token | prefix)`` for every answer token of ``batch`` (``[n]``).

    ``logits`` is the model's full ``[B, T, V]`` output, or already the ``[n, V]`` logits at the
    answer-predicting positions (``kne._utils.answer_logits``)."""
    sel = _at_answers(logits, batch).float()
    return torch.log_softmax(sel, dim=-1).gather(-1, batch.targets[:, None]).squeeze(-1)


def answer_predictions(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Argmax token at every answer position (``[n]``); ``logits`` full or already selected."""
    return _at_answers(logits, batch).argmax(-1)


def answer_margins(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per answer token (``[n]``): its logit minus the largest other logit at its position, in
    float32 (``> 0``: it is the strict argmax; the log of its probability over the runner-up's);
    ``logits`` full or already selected."""
    sel = _at_answers(logits, batch).float()
    idx = batch.targets[:, None]
    return sel.gather(-1, idx).squeeze(-1) - sel.scatter(-1, idx, float("-inf")).amax(-1)


def per_sequence_mean(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of ``values`` (``[n]``, one per answer token) per answer sequence: ``[len(batch.lengths)]``
    (the answer sequences are rows ``0..len(lengths)-1``; rows after them, such as preserved
    prompts, carry no answer)."""
    sums = torch.zeros(batch.size_answers, dtype=values.dtype, device=values.device).index_add_(0, batch.rows, values)
    lens = torch.tensor(batch.lengths, dtype=values.dtype, device=values.device)
    return sums / lens
