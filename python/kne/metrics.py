"""The KnowEdit metrics' names and their per-record reduction, shared by :mod:`kne.evaluation`
(the summary), :mod:`kne.compare`, :mod:`kne.plots` and the scripts that read results files; no
torch here, so the last ones stay light."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

#: (summary key, table name, per-record field) of every metric, in the KnowEdit tables' order
METRICS: Tuple[Tuple[str, str, str], ...] = (
    ("edit_succ", "Edit Succ.", "rewrite_acc"),
    ("rephrase", "Rephrase", "rephrase_acc"),
    ("portability", "Portability", "portability"),
    ("locality", "Locality", "locality"),
    ("fluency", "Fluency", "fluency"),
)


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
