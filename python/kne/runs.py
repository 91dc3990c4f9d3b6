"""Evaluation runs over many records: independent and sequential edits, for several methods."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ._guard import deferred_interrupt
from .config import KNEConfig
from .result import EditError, EditResult
from .evaluation import EvalResult, evaluate, measure_before
from .requests import EditRequest

__all__ = ["METHODS", "distributed", "edit_with", "format_table", "keeps_earlier", "merge_runs", "pct", "run_edits"]

METHODS = ("kne", "reference", "ft-m", "ft-m+kl")


def keeps_earlier(method: str, config: KNEConfig) -> bool:
    """Whether a sequential edit with ``method`` can keep the earlier edits (``keep=``): kne and
    the reference, with the null-space projection on (``config.project``, the ``local`` preset)."""
    return method in ("kne", "reference") and bool(config.project)


def edit_with(method: str, model: nn.Module, tokenizer, requests: Sequence[EditRequest], config: KNEConfig,
              ensemble=None, keep=None, editor=None) -> EditResult:
    """One edit with ``method``: ``kne`` (kne.fast_edit), ``reference`` (kne.reference.edit),
    ``ft-m`` (kne.baselines.ft_m with EasyEdit's settings) or ``ft-m+kl`` (FT-M with kne's neighbour
    KL at ``config.preserve_weight`` and ``config.preserve_count``). ``keep``: earlier edits the
    projection keeps (kne and reference with ``config.project``; see :func:`kne.fast_edit`).
    ``editor``: a :class:`kne.Editor` of ``method`` on ``model`` that makes the edit (keeping every
    earlier edit it made)."""
    from . import baselines, reference
    from .editing import fast_edit

    if editor is not None:
        if editor.method != method or editor.model is not model:
            raise ValueError(f"the editor edits with {editor.method} on another model or method than {method}")
        return editor.edit(list(requests), ensemble=ensemble)
    if method == "kne":
        return fast_edit(model, tokenizer, requests, config, ensemble=ensemble, keep=keep)
    if method == "reference":
        return reference.edit(model, tokenizer, requests, config, ensemble=ensemble, keep=keep)
    if method in ("ft-m", "ft-m+kl"):
        if ensemble is not None:
            raise ValueError(f"{method} does not use an ensemble: drop --ensemble for it")
        kl = {}
        if method == "ft-m+kl":
            if not config.preserve_weight > 0:
                raise ValueError("ft-m+kl needs a neighbour KL weight: set preserve_weight (--preserve-weight, or "
                                 "--preset local)")
            kl = dict(preserve_weight=config.preserve_weight, preserve_count=config.preserve_count)
        return baselines.ft_m(model, tokenizer, requests, add_special_tokens=config.add_special_tokens, **kl)
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


def pct(x: Optional[float], digits: int = 2) -> str:
    """A metric in [0, 1] as a percentage with ``digits`` decimals; ``-`` when not measured."""
    return "-" if x is None else f"{100 * x:.{digits}f}"


def run_edits(model: nn.Module, tokenizer, requests: Sequence[EditRequest], method: str, config: KNEConfig, *,
              protocol: str = "independent", fluency: bool = False, progress: bool = True,
              desc: Optional[str] = None, ensemble=None, indices: Optional[Sequence[int]] = None,
              evaluation: Optional[Dict[str, Any]] = None, keep_earlier: bool = True, generate: bool = False,
              other_subjects: int = 0, drift: bool = False, max_new_tokens: int = 16) -> Dict[str, Any]:
    """Edit every request with ``method`` and evaluate with EasyEdit's metrics.

    ``independent``: for each request evaluate, edit, evaluate again, restore (the model is never
    edited twice). ``sequential``: evaluate every request on the unedited model, apply every edit in
    turn without restoring, evaluate every request at the end (earlier edits must survive later
    ones), then restore them all (newest first; a Ctrl-C waits for the restores, so the model is left as
    it was whatever happens). With ``config.project`` (kne, reference) and ``keep_earlier`` the
    sequential edits are made by one :class:`kne.Editor` (``require_landed=False``: an edit that
    did not land is kept and scored, as for the other methods), so each keeps the earlier ones'
    keys. A request whose
    edit fails (``EditError``) is left out of the means and listed under ``failures``. ``ensemble`` (kne and reference only) is a dataset-level ensemble
    used for every edit instead of locating one per request. ``indices`` name the requests in the
    records (default ``0..n-1``; a data-parallel shard passes its global indices). ``evaluation``:
    keyword options for every :func:`kne.evaluate` call (default EasyEdit's tokenisation, whatever
    the edit's ``config.add_special_tokens``; ``{"add_special_tokens": False, "always_space": False}``
    gives kne 0.2's numbers). ``generate``, ``other_subjects`` and ``drift`` add those measures
    (:func:`kne.evaluate`): the generated answers and the other subjects per record (a record whose
    relation no shipped template asks gets no other-subjects value); drift once per run on the
    unedited model, then after each independent edit on a window of
    :data:`kne.drift.WINDOW` held-out sequences that moves with the record index (a sequential run:
    once, on every sequence, after the last edit). Returns ``{"method", "protocol", "summary",
    "seconds_per_edit", "failures", "records"}``; the model is left as it was.
    """
    from tqdm.auto import tqdm

    if protocol not in ("independent", "sequential"):
        raise ValueError(f"protocol must be 'independent' or 'sequential', got {protocol!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    from . import drift as driftmod
    from .others import relation_template

    indices = list(range(len(requests))) if indices is None else list(indices)
    if len(indices) != len(requests):
        raise ValueError(f"{len(indices)} indices for {len(requests)} requests")
    ev = dict(evaluation or {})
    tf = dict(ev)  # the teacher-forced evaluation before the edit: the measures' part is measured once, below
    if generate:
        ev.update(generate=True, max_new_tokens=max_new_tokens)
    asks = [bool(other_subjects) and relation_template(r) is not None for r in requests]
    # what the unedited model answers (locality, generated) and which other subjects already give the
    # target: one batched pass over every request, not one per edit
    before = (measure_before(model, tokenizer, requests, generate=generate, max_new_tokens=max_new_tokens,
                             other_subjects=[other_subjects if a else 0 for a in asks],
                             **{k: v for k, v in tf.items() if k in ("add_special_tokens", "always_space",
                                                                     "batch_size", "template")})
              if generate or any(asks) else [{} for _ in requests])

    text = base = None
    if drift:
        text = driftmod.drift_text(model, tokenizer, progress=progress)
        base = driftmod.token_scores(model, tokenizer, text)  # the unedited model, every sequence, once
    keep_earlier = keep_earlier and protocol == "sequential" and keeps_earlier(method, config)
    records: List[Dict[str, Any]] = []
    seconds: List[float] = []
    failures: List[Dict[str, Any]] = []
    bar = tqdm(total=len(requests), desc=desc or f"{method} {protocol}", unit="edit", disable=not progress,
               file=sys.stderr)

    def record(i: int, req: EditRequest, post: EvalResult, res: Optional[EditResult]) -> Dict[str, Any]:
        rec = dict(post.records[0])
        rec.pop("locality_output", None)
        rec.pop("drift_state", None)
        rec.update(index=indices[i], prompt=req.prompt, target_new=req.target_new)
        if res is not None:
            rec.update(steps=res.stats["steps"], seconds=res.stats["total_seconds"], final_loss=res.stats["losses"][-1])
        return rec

    def attempt(i: int, req: EditRequest, editor=None) -> Optional[EditResult]:
        """The edit, or ``None`` with the failure listed (the model is left as it was)."""
        try:
            if editor is not None:
                return edit_with(method, model, tokenizer, [req], config, ensemble, editor=editor)
            return edit_with(method, model, tokenizer, [req], config, ensemble)
        except EditError as e:
            failures.append({"index": indices[i], "error": str(e)})
            bar.update(1)
            return None

    def drift_after(rows):
        after = driftmod.token_scores(model, tokenizer, text, rows)
        return driftmod.compare(driftmod.select(base, text, rows), after)

    if protocol == "independent":
        for i, req in enumerate(requests):
            o = other_subjects if asks[i] else 0
            pre = evaluate(model, tokenizer, [req], **tf)
            pre.records[0].update(before[i])
            res = attempt(i, req)
            if res is None:
                continue
            try:
                post = evaluate(model, tokenizer, [req], pre=pre, fluency=fluency, seed=config.seed + indices[i],
                                other_subjects=o, **ev)
                if drift:
                    rows = driftmod.window(indices[i], driftmod.WINDOW, len(text.sequences))
                    post.records[0]["drift"], post.records[0]["drift_flips"] = drift_after(rows)
            finally:
                with deferred_interrupt():  # a Ctrl-C waits until the model is restored
                    res.restore()
            records.append(record(i, req, post, res))
            seconds.append(res.stats["total_seconds"])
            s = EvalResult(records).summary()
            bar.set_postfix(succ=pct(s["edit_succ"], 1), loc=pct(s["locality"], 1))
            bar.update(1)
    else:
        o = other_subjects if any(asks) else 0
        pre = evaluate(model, tokenizer, list(requests), **tf)
        for rec, extra in zip(pre.records, before):
            rec.update(extra)
        results: Dict[int, EditResult] = {}  # request position -> its edit, in the order applied
        editor = None
        if keep_earlier:
            from .editor import Editor

            editor = Editor(model, tokenizer, config, method=method, require_landed=False)
        try:
            for i, req in enumerate(requests):
                res = attempt(i, req, editor)
                if res is None:
                    continue
                results[i] = res
                seconds.append(res.stats["total_seconds"])
                bar.update(1)
            shift = drift_after(list(range(len(text.sequences)))) if drift and results else None
            for i, res in results.items():
                post = evaluate(model, tokenizer, [requests[i]], pre=EvalResult([pre.records[i]]), fluency=fluency,
                                seed=config.seed + indices[i], other_subjects=o if asks[i] else 0, **ev)
                if shift is not None:
                    post.records[0]["drift"], post.records[0]["drift_flips"] = shift
                records.append(record(i, requests[i], post, res))
        finally:
            with deferred_interrupt():  # a Ctrl-C waits until every edit is restored, newest first
                if editor is not None:
                    editor.undo_all()
                    editor.close()
                else:
                    for res in reversed(list(results.values())):
                        res.restore()
    bar.close()
    summary = EvalResult(records).summary() if records else {"n": 0}
    return {"method": method, "protocol": protocol, "summary": summary,
            "seconds_per_edit": sum(seconds) / max(1, len(seconds)), "failures": failures, "records": records}


def merge_runs(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One run from the shards of a data-parallel run (records back in index order)."""
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"])
    failures = sorted((f for p in parts for f in p["failures"]), key=lambda f: f["index"])
    secs = [r["seconds"] for r in records if "seconds" in r]
    first = parts[0]
    return {"method": first["method"], "protocol": first["protocol"],
            "summary": EvalResult(records).summary() if records else {"n": 0},
            "seconds_per_edit": sum(secs) / max(1, len(secs)), "failures": failures, "records": records,
            "shards": len(parts)}


def distributed() -> Tuple[int, int]:
    """``(rank, world_size)`` under torchrun (a gloo, or NCCL on CUDA, process group is started),
    else ``(0, 1)``; ``kne eval`` gives each rank every world-th record and merges with
    :func:`merge_runs`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if os.environ.get("KNE_DIST_BACKEND") == "nccl" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of evaluation summaries: percentages (fluency x100 as in the KnowEdit tables;
    drift in nats per token). The generated-answer, other-subject and drift columns appear when a
    run has them."""
    from .metrics import METRICS

    base = ["edit_succ", "rephrase", "portability", "locality", "fluency"]
    extra = [k for k, _, _ in METRICS if k not in base and any((r["summary"] or {}).get(k) is not None for r in rows)]
    names = {k: n for k, n, _ in METRICS}
    cols = base + extra
    head = "| data | method | protocol | n | " + " | ".join(names[k] for k in cols) + " | s/edit |"
    sep = "|---|---|---|---:|" + "---:|" * len(cols) + "---:|"
    lines = [head, sep]
    for r in rows:
        s = r["summary"]
        if not s.get("n"):
            lines.append(f"| {r['data']} | {r['method']} | {r.get('protocol', 'independent')} | 0 | "
                         + " | ".join("-" for _ in cols) + " | - |")
            continue
        cells = [("-" if s.get(k) is None else f"{s[k]:.4f}") if k == "drift" else pct(s.get(k)) for k in cols]
        lines.append(f"| {r['data']} | {r['method']} | {r.get('protocol', 'independent')} | {s['n']} | "
                     + " | ".join(cells) + f" | {r['seconds_per_edit']:.2f} |")
    return "\n".join(lines)
