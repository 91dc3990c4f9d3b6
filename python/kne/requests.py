"""Edit requests in KnowEdit form, and the KnowEdit data files."""

from __future__ import annotations

import gzip
import json
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ._warn import warn
from .io import check_input

__all__ = ["EditRequest", "as_request", "as_requests", "first_alias", "load_knowedit"]

# An answer may be a string, a list of aliases, or a list of alias lists (KnowEdit): the first
# alias is the answer, as EasyEdit's KnowEdit runner takes it.
Answer = Union[str, Sequence[Any]]


class _NoAnswer(ValueError):
    """An answer with no non-empty alias (KnowEdit probes such as ``""`` or ``[[]]``)."""


def _aliases(answer: Any) -> Iterable[Any]:
    if isinstance(answer, (list, tuple)):
        for a in answer:
            yield from _aliases(a)
    else:
        yield answer


def first_alias(answer: Any, *, field_name: str = "ground_truth") -> str:
    """The first alias of a KnowEdit answer (``"x"``, ``["x", "y"]`` or ``[["x", "y"], ...]``).

    Empty aliases are passed over (KnowEdit has answers such as ``[[], ["Honorary Doctor"]]``); an
    answer with no non-empty alias at all raises ``ValueError``."""
    for a in _aliases(answer):
        if not isinstance(a, str):
            raise ValueError(f"{field_name}={answer!r} holds a {type(a).__name__}: answers are strings or lists of them")
        if a.strip():
            return a
    raise _NoAnswer(f"{field_name}={answer!r} has no non-empty answer string")


def _probe_list(name: str, value: Any, skipped: Optional[List[str]] = None) -> Dict[str, List[Dict[str, str]]]:
    """Normalise a locality/portability map ``{kind: [{prompt, ground_truth}, ...]}``.

    A probe without any answer raises ``ValueError``, or, when ``skipped`` is a list, is left out
    and named in it."""
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
            try:
                gt = first_alias(it["ground_truth"], field_name=f"{name}[{kind!r}][{i}].ground_truth")
            except _NoAnswer:
                if skipped is None:
                    raise
                skipped.append(f"{name}[{kind!r}][{i}]")
                continue
            probes.append({"prompt": p, "ground_truth": gt})
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
    #: locality/portability probes left out because they have no answer at all (KnowEdit holds a
    #: few, such as ``""`` or ``[[]]``); each is named here and in a warning
    skipped_probes: List[str] = field(default_factory=list, init=False, compare=False, repr=False)
    warn_skipped: InitVar[bool] = True

    def __post_init__(self, warn_skipped: bool = True) -> None:
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
        self.locality = _probe_list("locality", self.locality, self.skipped_probes)
        self.portability = _probe_list("portability", self.portability, self.skipped_probes)
        if self.skipped_probes and warn_skipped:
            warn(f"request {self.prompt!r}: probe(s) without any answer left out: " + ", ".join(self.skipped_probes),
                 stacklevel=3)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, warn_skipped: bool = True) -> "EditRequest":
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
            portability=d.get("portability") or {}, warn_skipped=warn_skipped,
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "prompt": self.prompt, "target_new": self.target_new, "subject": self.subject,
            "ground_truth": self.ground_truth, "rephrase_prompt": self.rephrase_prompt,
            "locality": self.locality, "portability": self.portability,
        }


def as_request(r: Union[EditRequest, Mapping[str, Any]]) -> EditRequest:
    """A validated :class:`EditRequest`. An ``EditRequest`` is checked again and copied, so a field
    reassigned after construction (``req.target_new = ""``) is refused here, at the call, and later
    changes by the caller do not reach a running edit."""
    if isinstance(r, EditRequest):
        try:
            fresh = EditRequest(prompt=r.prompt, target_new=r.target_new, subject=r.subject,
                                ground_truth=r.ground_truth, rephrase_prompt=r.rephrase_prompt,
                                locality=r.locality, portability=r.portability, warn_skipped=False)
        except ValueError as e:
            raise ValueError(f"{e} (the request was changed after it was made)") from None
        fresh.skipped_probes = list(r.skipped_probes) + [p for p in fresh.skipped_probes if p not in r.skipped_probes]
        return fresh
    return EditRequest.from_dict(r)


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


def load_knowedit(path: Union[str, Path], limit: Optional[int] = None, skip: int = 0) -> List[EditRequest]:
    """Read KnowEdit records from a JSON file (an array, or one record) or a JSON-lines file,
    either of them gzip-compressed when the name ends in ``.gz``; ``skip`` leaves out the first
    records, ``limit`` keeps that many of the rest. (The shipped KnowEdit files:
    :func:`kne.datasets.knowedit`.)

    The published files hold a few locality/portability probes without any answer (``""``,
    ``[[]]``); those probes of the records read are left out with one warning naming them by their
    index in the file (the records are kept).
    """
    path = check_input(path, "KnowEdit file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a gzip file ({e}), though its name ends in .gz: give the JSON file itself, or "
                         "gzip it") from None
    except UnicodeDecodeError as e:
        bom = " (it starts with a UTF-16 byte-order mark: save it as UTF-8)" if e.object[:2] in (b"\xff\xfe",
                                                                                                 b"\xfe\xff") else ""
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}){bom}; KnowEdit files are UTF-8 "
                         "JSON") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = None
    if records is None or not isinstance(records, (list, Mapping)):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON record ({e.msg}); expected a JSON array or JSON lines") from e
    if isinstance(records, Mapping):
        records = [records]
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if records and skip >= len(records):
        raise ValueError(f"{path}: no records to evaluate (it holds {len(records)}; skipping {skip} leaves none)")
    records = records[skip:]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    out = []
    skipped = []
    for i, rec in enumerate(records, skip):
        try:
            req = EditRequest.from_dict(rec, warn_skipped=False)
        except ValueError as e:
            raise ValueError(f"{path}: record {i}: {e}") from None
        skipped += [f"record {i} {s}" for s in req.skipped_probes]
        out.append(req)
    if skipped:
        warn(f"{path.name}: {len(skipped)} probe(s) without any answer were left out: "
             + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""), stacklevel=2)
    return out
