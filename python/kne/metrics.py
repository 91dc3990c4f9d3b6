"""The KnowEdit metrics' names and their per-record reduction, shared by :mod:`kne.evaluation`
(the summary), :mod:`kne.compare`, :mod:`kne.plots` and the scripts that read results files; no
torch here, so the last ones stay light."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

#: (summary key, table name, per-record field) of every metric, in the KnowEdit tables' order
METRICS: Tuple[Tuple[str, str, str], ...] = (
    ("edit_succ", "Edit Succ.", "rewrite_acc"),
    ("rephrase", "Rephrase", "rephrase_acc"),
    ("portability", "Portability", "portability"),
    ("locality", "Locality", "locality"),
    ("fluency", "Fluency", "fluency"),
    # generated answers (EasyEdit's generation protocol, exact match), kne.generation
    ("gen_edit_succ", "Gen. Succ.", "gen_rewrite_acc"),
    ("gen_rephrase", "Gen. Rephrase", "gen_rephrase_acc"),
    ("gen_portability", "Gen. Portability", "gen_portability"),
    ("gen_locality", "Gen. Locality", "gen_locality"),
    # the same answers, the truth stated once in them (kne.generation.contains_match)
    ("gen_edit_contains", "Gen. Succ. (contains)", "gen_rewrite_contains"),
    ("gen_rephrase_contains", "Gen. Rephrase (contains)", "gen_rephrase_contains"),
    ("gen_portability_contains", "Gen. Portability (contains)", "gen_portability_contains"),
    # the edited relation asked of other subjects (lower is better), kne.others
    ("others_moved", "Others moved", "others_moved"),
    # a fixed held-out text: mean NLL increase per token (nats) and share of changed argmaxes, kne.drift
    ("drift", "Drift (nats)", "drift"),
    ("drift_flips", "Drift flips", "drift_flips"),
)

#: metrics that are not shares of 1 (printed as they are, not in points)
UNSCALED = ("fluency", "drift")
#: per-record fields that may hold one value per kind (KnowEdit's portability and locality kinds)
PER_KIND = ("portability", "locality", "gen_portability", "gen_locality", "gen_portability_contains")


def mean_present(xs):
    """The mean of the values that are not ``None`` (``None`` when there are none): how a summary
    averages records, some of which lack a metric."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def record_value(record: Dict[str, Any], field: str) -> Optional[float]:
    """A record's value of one metric (``field`` of :data:`METRICS`): portability and locality the
    mean over the record's kinds; ``None`` when the record has none."""
    v = record.get(field)
    if isinstance(v, dict):
        return mean_present(list(v.values())) if v else None
    return None if v is None else float(v)


# ---------------------------------------------------------------------------------------------- results files
_FIELDS = tuple(f for _, _, f in METRICS)


class ResultsError(ValueError):
    """A results JSON (``kne eval --out``) that is not what ``kne compare`` and ``kne plot`` read;
    the message names the file and the field."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value(path, field: str, v: Any, kinds: bool) -> None:
    """A metric value: a finite number or ``null``; with ``kinds`` also an object of them (one per
    portability / locality kind)."""
    if v is None:
        return
    if kinds and isinstance(v, dict):
        for k, x in v.items():
            _value(path, f"{field}.{k}", x, False)
        return
    if not _number(v):
        raise ResultsError(f"{path}: field {field} must be a number or null{' (or an object of them per kind)' if kinds else ''}, "
                           f"got {type(v).__name__} {str(v)[:40]!r}")
    if not math.isfinite(v):
        raise ResultsError(f"{path}: field {field} is {v}: a metric must be a finite number (null where a record has "
                           "none); the file is damaged, or was written by a run that diverged")


def check_results(payload: Any, path="results") -> List[Dict[str, Any]]:
    """The runs of a ``kne eval --out`` results JSON, each checked field by field: ``method``,
    ``data`` and ``protocol`` strings; ``records`` a list of objects with an integer ``index`` and
    metric values that are finite numbers or null (portability and locality: also objects of them
    per kind); an optional ``summary`` object of the same. A single run at the top level (an old
    file with ``summary`` and no ``runs``) is read as one run. A bad field raises
    :class:`ResultsError` naming it; NaN or infinity anywhere is refused, never averaged."""
    if not isinstance(payload, dict):
        raise ResultsError(f"{path}: must be a JSON object (a results file of kne eval --out), got {type(payload).__name__}")
    runs = payload.get("runs")
    if runs is None and "summary" in payload:
        runs = [payload]
        name = lambda i: ""  # noqa: E731  (fields at the top level)
    else:
        name = lambda i: f"runs[{i}]."  # noqa: E731
        if not isinstance(runs, list) or not runs:
            raise ResultsError(f"{path}: field runs must be a non-empty list of runs, got "
                               f"{type(runs).__name__ if runs is not None else 'nothing'}; give a results JSON written "
                               "by kne eval --out")
    for i, r in enumerate(runs):
        where = name(i)
        if not isinstance(r, dict):
            raise ResultsError(f"{path}: {where.rstrip('.')} must be an object (a run), got {type(r).__name__} "
                               f"{str(r)[:40]!r}")
        for key in ("method", "data", "protocol"):
            if key not in r:
                raise ResultsError(f"{path}: {where.rstrip('.') or 'the file'} lacks field {key}; give a results JSON "
                                   "written by kne eval --out")
            if not isinstance(r[key], str):
                raise ResultsError(f"{path}: field {where}{key} must be a string, got {type(r[key]).__name__}")
        summary = r.get("summary")
        if summary is not None:
            if not isinstance(summary, dict):
                raise ResultsError(f"{path}: field {where}summary must be an object of metrics, got "
                                   f"{type(summary).__name__}")
            for key, v in summary.items():
                if key == "n":
                    continue
                _value(path, f"{where}summary.{key}", v, False)
        records = r.get("records")
        if records is None:
            continue
        if not isinstance(records, list):
            raise ResultsError(f"{path}: field {where}records must be a list, got {type(records).__name__}")
        for j, rec in enumerate(records):
            at = f"{where}records[{j}]"
            if not isinstance(rec, dict):
                raise ResultsError(f"{path}: {at} must be an object, got {type(rec).__name__}")
            idx = rec.get("index")
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise ResultsError(f"{path}: field {at}.index must be an integer (the record's position in its file, "
                                   f"which pairs it), got {idx!r}")
            for f in _FIELDS:
                if f in rec:
                    _value(path, f"{at}.{f}", rec[f], f in PER_KIND)
    return runs
