"""Edit requests in KnowEdit form, and the KnowEdit data files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = ["EditRequest", "as_request", "as_requests", "first_alias", "load_knowedit"]

# An answer may be a string, a list of aliases, or a list of alias lists (KnowEdit): the first
# alias is the answer, as EasyEdit's KnowEdit runner takes it.
Answer = Union[str, Sequence[Any]]


def first_alias(answer: Any, *, field_name: str = "ground_truth") -> str:
    """The first alias of a KnowEdit answer (``"x"``, ``["x", "y"]`` or ``[["x", "y"], ...]``)."""
    a = answer
    while isinstance(a, (list, tuple)):
        if not a:
            raise ValueError(f"{field_name} is an empty list: give at least one answer string")
        a = a[0]
    if not isinstance(a, str) or not a.strip():
        raise ValueError(f"{field_name}={answer!r} is not a non-empty string (or list of aliases)")
    return a


def _probe_list(name: str, value: Any) -> Dict[str, List[Dict[str, str]]]:
    """Normalise a locality/portability map ``{kind: [{prompt, ground_truth}, ...]}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict {{kind: [{{'prompt': ..., 'ground_truth': ...}}]}}, "
                         f"got {type(value).__name__}")
    out: Dict[str, List[Dict[str, str]]] = {}
    for kind, items in value.items():
        if isinstance(items, Mapping):  # EasyEdit's own form: {kind: {prompt: [...], ground_truth: [...]}}
            prompts, answers = items.get("prompt"), items.get("ground_truth")
            if isinstance(prompts, str):
                prompts, answers = [prompts], [answers]
            if not isinstance(prompts, (list, tuple)) or not isinstance(answers, (list, tuple)) or len(prompts) != len(answers):
                raise ValueError(f"{name}[{kind!r}] must pair each prompt with a ground_truth")
            items = [{"prompt": p, "ground_truth": g} for p, g in zip(prompts, answers)]
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{name}[{kind!r}] must be a list of {{'prompt', 'ground_truth'}} dicts")
        probes = []
        for i, it in enumerate(items):
            if not isinstance(it, Mapping) or "prompt" not in it or "ground_truth" not in it:
                raise ValueError(f"{name}[{kind!r}][{i}] must be a dict with 'prompt' and 'ground_truth'")
            p = it["prompt"]
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{name}[{kind!r}][{i}].prompt must be a non-empty string")
            probes.append({"prompt": p, "ground_truth": first_alias(it["ground_truth"],
                                                                     field_name=f"{name}[{kind!r}][{i}].ground_truth")})
        if probes:
            out[str(kind)] = probes
    return out


@dataclass
class EditRequest:
    """One fact edit (KnowEdit fields).

    ``prompt`` and ``target_new`` are required; the edit teaches the model ``target_new`` after
    ``prompt`` (the tokens of ``prompt + " " + target_new`` after the prompt's own tokens).
    ``ground_truth`` (the old answer), ``rephrase_prompt``, and the ``locality`` / ``portability``
    maps ``{kind: [{"prompt", "ground_truth"}]}`` are used by evaluation only.
    """

    prompt: str
    target_new: str
    subject: Optional[str] = None
    ground_truth: Optional[str] = None
    rephrase_prompt: Optional[str] = None
    locality: Dict[str, List[Dict[str, str]]] = field(default_factory=dict)
    portability: Dict[str, List[Dict[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "target_new"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"EditRequest.{name}={v!r} is invalid: give a non-empty string")
        if self.subject is not None:
            if not isinstance(self.subject, str) or not self.subject.strip():
                raise ValueError(f"EditRequest.subject={self.subject!r} is invalid: give a non-empty string or None")
        if self.ground_truth is not None and not isinstance(self.ground_truth, str):
            self.ground_truth = first_alias(self.ground_truth)
        if self.rephrase_prompt is not None:
            if isinstance(self.rephrase_prompt, (list, tuple)):
                self.rephrase_prompt = self.rephrase_prompt[0] if self.rephrase_prompt else None
            if self.rephrase_prompt is not None and (not isinstance(self.rephrase_prompt, str) or not self.rephrase_prompt.strip()):
                raise ValueError(f"EditRequest.rephrase_prompt={self.rephrase_prompt!r} is invalid: "
                                 "give a non-empty string or None")
        self.locality = _probe_list("locality", self.locality)
        self.portability = _probe_list("portability", self.portability)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EditRequest":
        """From a KnowEdit record or an EasyEdit request dict (``target_new`` may be a list)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a request must be a kne.EditRequest or a dict, got {type(d).__name__}")
        missing = [k for k in ("prompt", "target_new") if k not in d]
        if missing:
            raise ValueError(f"request dict lacks {missing}: a KnowEdit record needs 'prompt' and 'target_new' "
                             f"(keys present: {sorted(d)})")
        target = d["target_new"]
        if isinstance(target, (list, tuple)):
            target = first_alias(target, field_name="target_new")
        gt = d.get("ground_truth")
        if gt is not None and not isinstance(gt, str):
            gt = first_alias(gt)
        if isinstance(gt, str) and not gt.strip():
            gt = None
        rephrase = d.get("rephrase_prompt", d.get("rephrase"))
        return cls(
            prompt=d["prompt"], target_new=target, subject=d.get("subject"), ground_truth=gt,
            rephrase_prompt=rephrase or None, locality=d.get("locality") or {},
            portability=d.get("portability") or {},
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "prompt": self.prompt, "target_new": self.target_new, "subject": self.subject,
            "ground_truth": self.ground_truth, "rephrase_prompt": self.rephrase_prompt,
            "locality": self.locality, "portability": self.portability,
        }


def as_request(r: Union[EditRequest, Mapping[str, Any]]) -> EditRequest:
    return r if isinstance(r, EditRequest) else EditRequest.from_dict(r)


def as_requests(requests: Any) -> List[EditRequest]:
    """A list of :class:`EditRequest` from one request, a dict, or a sequence of either."""
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    if not isinstance(requests, Iterable) or isinstance(requests, (str, bytes)):
        raise ValueError(f"requests must be an EditRequest, a KnowEdit dict, or a list of them; "
                         f"got {type(requests).__name__}")
    out = [as_request(r) for r in requests]
    if not out:
        raise ValueError("requests is empty: give at least one edit request")
    return out


def load_knowedit(path: Union[str, Path], limit: Optional[int] = None) -> List[EditRequest]:
    """Read KnowEdit records from a JSON array file or a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KnowEdit file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON record ({e.msg}); expected a JSON array or JSON lines") from e
    if isinstance(records, Mapping):
        records = [records]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(EditRequest.from_dict(rec))
        except ValueError as e:
            raise ValueError(f"{path}: record {i}: {e}") from None
    return out
