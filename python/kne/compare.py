"""Is one editor's number really above another's? Paired differences of ``kne eval`` results.

A KnowEdit mean over 20-50 records moves by several points from one set of records to the next,
so "3 points above FT-M" says little on its own. :func:`compare_runs` pairs two runs record by
record (the same records, matched by their ``index``), and gives for every metric the mean of
each, the mean difference, and a paired bootstrap confidence interval of that difference
(records resampled with replacement, the same resample for both runs).

Per-record values are :func:`kne.evaluation.record_value`, what
:meth:`kne.evaluation.EvalResult.summary` averages (portability and locality: the mean over a
record's kinds), so over all records two runs' means are the ``kne eval`` table's. Records only one run has (an edit that failed, a run on other
records) are left out of the pairing and counted (``unpaired``); runs with no record in common
are an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io import check_input
from .metrics import METRICS, UNSCALED, check_results, record_value

__all__ = ["FEW", "load_runs", "paired_difference", "compare_runs", "pair_runs", "format_comparison"]

#: fewer paired records than this: the interval is printed but not read as a finding
FEW = 10

def load_runs(path) -> List[Dict[str, Any]]:
    """The runs of a ``kne eval --out`` JSON (or of a merged results file with the same ``runs``
    list), each with its ``method``, ``data``, ``protocol`` and ``records``, checked field by field
    (:func:`kne.metrics.check_results`: a bad field is one ``ValueError`` naming it; NaN refused)."""
    p = check_input(path, "results JSON")
    try:
        payload = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start}); give a results JSON written by kne eval --out") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e.msg} at line {e.lineno}); give a results JSON written by "
                         "kne eval --out") from None
    runs = check_results(payload, p)
    for i, r in enumerate(runs):
        if not isinstance(r.get("records"), list):
            raise ValueError(f"{p}: runs[{i}] ({r['method']} on {r['data']}) has no records list to pair; give a "
                             "results JSON written by kne eval --out")
    return runs


def paired_difference(a: Sequence[float], b: Sequence[float], *, boots: int = 10000, seed: int = 0,
                      level: float = 0.95) -> Dict[str, float]:
    """Mean of ``a``, of ``b``, of ``a - b``, and the paired bootstrap ``level`` interval of the
    mean difference (percentile method; ``boots`` resamples of the pairs, seeded)."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} against {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("no paired values to compare")
    if boots < 1:
        raise ValueError(f"boots must be >= 1, got {boots}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # resamples per draw: at most ~16 MB of indices at a time
    means = np.sort(np.concatenate([d[rng.integers(0, n, size=(min(chunk, boots - i), n))].mean(axis=1)
                                    for i in range(0, boots, chunk)]))
    lo_i = int((1 - level) / 2 * boots)
    hi_i = min(boots - 1, int((1 + level) / 2 * boots))
    return {"n": n, "a": float(np.mean(a)), "b": float(np.mean(b)), "diff": float(d.mean()),
            "low": float(means[lo_i]), "high": float(means[hi_i])}


def _label(run: Dict[str, Any]) -> str:
    return str(run["method"])


def pair_runs(a_runs: Sequence[Dict[str, Any]], b_runs: Sequence[Dict[str, Any]], a_method: Optional[str] = None,
              b_method: Optional[str] = None) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Each run of ``a_runs`` (of ``a_method`` when given) with the one run of ``b_runs`` (of
    ``b_method`` when given) on the same data file and protocol. A run without a partner, or with
    more than one, is an error that names the candidates."""
    picked = [r for r in a_runs if a_method is None or _label(r) == a_method]
    if not picked:
        raise ValueError(f"no run of method {a_method!r} in the first results; they hold "
                         f"{sorted({_label(r) for r in a_runs})}")
    pairs = []
    for a in picked:
        cands = [b for b in b_runs if b["data"] == a["data"] and b["protocol"] == a["protocol"] and b is not a
                 and (b_method is None or _label(b) == b_method)]
        if b_method is None:
            cands = [b for b in cands if _label(b) != _label(a)] or cands
        if len(cands) != 1:
            held = sorted(f"{_label(b)} ({b['data']}, {b['protocol']})" for b in b_runs)
            what = "no run" if not cands else f"{len(cands)} runs ({', '.join(sorted(_label(b) for b in cands))})"
            raise ValueError(f"{what} to compare {_label(a)} on {a['data']} ({a['protocol']}) with"
                             f"{'' if b_method is None else ' of method ' + repr(b_method)}; the other results "
                             f"hold: {', '.join(held)}. Name the methods with --a-method / --b-method")
        pairs.append((a, cands[0]))
    return pairs


def compare_runs(a: Dict[str, Any], b: Dict[str, Any], *, boots: int = 10000, seed: int = 0,
                 level: float = 0.95) -> List[Dict[str, Any]]:
    """One row per metric both runs have: ``metric``, ``n`` (paired records), ``unpaired``
    (records only one run has), the means ``a``/``b``, ``diff`` and its interval ``low``/``high``."""
    a_by = {int(r["index"]): r for r in a["records"]}
    b_by = {int(r["index"]): r for r in b["records"]}
    common = sorted(set(a_by) & set(b_by))
    if not common:
        raise ValueError(f"{_label(a)} and {_label(b)} on {a['data']} share no record (indices "
                         f"{_span(a_by)} against {_span(b_by)}): compare runs on the same records")
    unpaired = len(set(a_by) ^ set(b_by))
    rows = []
    for key, name, field in METRICS:
        xs, ys = [], []
        for i in common:
            x, y = record_value(a_by[i], field), record_value(b_by[i], field)
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
        if not xs:
            continue
        row = paired_difference(xs, ys, boots=boots, seed=seed, level=level)
        rows.append({"metric": key, "name": name, "unpaired": unpaired, **row})
    return rows


def _span(by: Dict[int, Any]) -> str:
    return f"{min(by)}-{max(by)}" if by else "none"


def format_comparison(results: Sequence[Tuple[Dict[str, Any], Dict[str, Any], List[Dict[str, Any]]]],
                      level: float = 0.95) -> str:
    """A markdown table: metrics in points (x100) except fluency (as EasyEdit's tables print it) and
    drift (nats per token, four decimals);
    an interval that leaves out 0 is marked ``*``; a difference over fewer than :data:`FEW` paired
    records is marked ``(few)`` instead: a bootstrap of a handful of records says little."""
    pct = f"{round(level * 100)}%"
    lines = [f"| data | protocol | metric | A | B | n | A | B | A - B | {pct} interval |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for a, b, rows in results:
        for r in rows:
            s = 1.0 if r["metric"] in UNSCALED else 100.0
            d = 4 if r["metric"] == "drift" else 2
            if r["n"] < FEW:
                mark = " (few)"
            else:
                mark = " *" if r["low"] > 0 or r["high"] < 0 else ""
            n = f"{r['n']}" + (f" ({r['unpaired']} unpaired)" if r["unpaired"] else "")
            lines.append(f"| {a['data']} | {a['protocol']} | {r['name']} | {_label(a)} | {_label(b)} | {n} | "
                         f"{r['a'] * s:.{d}f} | {r['b'] * s:.{d}f} | {r['diff'] * s:+.{d}f}{mark} | "
                         f"[{r['low'] * s:+.{d}f}, {r['high'] * s:+.{d}f}] |")
    return "\n".join(lines)
