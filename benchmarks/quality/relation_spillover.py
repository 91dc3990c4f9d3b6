"""Does one edit rewrite its relation for other subjects? A thin caller of ``kne.evaluate(other_subjects=N)``.

KnowEdit's locality asks the edited subject about *other* relations; nothing in it asks the edited
relation of *other* subjects. ``kne.evaluate(..., other_subjects=N)`` does (``kne.others``: the
template and subjects come from the shipped training templates, subjects whose unedited answer is
already the new target are left out), and ``others_moved`` is the share of them that answer the
new target after the edit: lower is better. This script reports it per method, record by record,
and splits KnowEdit portability by it:

    python benchmarks/quality/relation_spillover.py --data recent --skip 20 --limit 50 --method kne ft-m --out rel.json
    python benchmarks/quality/relation_spillover.py --from benchmarks/results/quality_measures.json

The first edits each record alone (``kne.runs.run_edits(..., other_subjects=N)``: ``kne`` is
``fast_edit`` with ``--preset``, default ``local``; ``ft-m`` kne's FT-M baseline) on the embedded
model, CPU, one thread. The second reads the runs of a ``kne eval --other-subjects N --out`` file
and edits nothing. ``--split`` splits each data set's KnowEdit portability of the kne run and
FT-M by whether FT-M's edit moved half or more of the other subjects (from the runs themselves, or
from another ``kne eval --out`` file of the same records).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")


def rows_of(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A run's records that were asked of other subjects: ``{index, template, others, moved, own}``."""
    rows = []
    for rec in run["records"]:
        o = rec.get("others")
        if rec.get("others_moved") is None or not o:
            continue
        rows.append({"index": rec["index"], "template": o["template"], "others": len(o["subjects"]),
                     "moved": rec["others_moved"], "own": rec.get("rewrite_acc") == 1.0})
    return rows


def portability_split(rows_kne, rows_ftm, runs, data_file, kne_label, threshold=0.5):
    """KnowEdit portability of the two methods (from a ``kne eval`` JSON's ``runs``) on the records
    where FT-M's edit moved at least ``threshold`` of the other subjects, and on the rest."""
    from kne.evaluation import record_value

    def by_index(label):
        for r in runs:
            if r["method"] == label and r["data"] == data_file and r.get("protocol", "independent") == "independent":
                values = ((rec["index"], record_value(rec, "portability")) for rec in r["records"])
                return {i: v for i, v in values if v is not None}
        raise ValueError(f"no independent run of {label!r} on {data_file} in the split file")

    pk, pf = by_index(kne_label), by_index("ft-m")
    moved = {r["index"]: r["moved"] for r in rows_ftm}
    edited = {r["index"] for r in rows_kne}
    common = sorted(i for i in pk if i in pf and i in moved and i in edited)
    out = {}
    for name, keep in (("ftm_moved_at_least", lambda i: moved[i] >= threshold),
                       ("ftm_moved_less", lambda i: moved[i] < threshold)):
        idx = [i for i in common if keep(i)]
        out[name] = {"records": idx, "kne": statistics.mean(pk[i] for i in idx) if idx else None,
                     "ft-m": statistics.mean(pf[i] for i in idx) if idx else None}
    out["threshold"] = threshold
    out["kne_label"] = kne_label  # the run whose portability is "kne" above
    return out


def summarise(runs: List[Dict[str, Any]], kne_label: str, split_runs=None) -> List[Dict[str, Any]]:
    """Per data set: each independent run's rows and mean ``moved``, and the portability split when
    the data set has both ``kne_label`` and ``ft-m`` runs."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in runs:
        if r.get("protocol", "independent") != "independent":
            continue
        rows = rows_of(r)
        if not rows:
            continue
        d = out.setdefault(r["data"], {"data": r["data"], "methods": {}})
        d["methods"][r["method"]] = {"moved": statistics.mean(x["moved"] for x in rows),
                                     "own": statistics.mean(float(x["own"]) for x in rows), "rows": rows}
    for d in out.values():
        m = d["methods"]
        if kne_label in m and "ft-m" in m:
            d["split"] = portability_split(m[kne_label]["rows"], m["ft-m"]["rows"], split_runs or runs, d["data"],
                                           kne_label)
    return list(out.values())


def report(summary: List[Dict[str, Any]]) -> None:
    for d in summary:
        for label, v in d["methods"].items():
            print(f"{d['data']}: {label}: {len(v['rows'])} edits, own {100 * v['own']:.1f}%, other subjects moved "
                  f"to the new target {100 * v['moved']:.1f}%")
        sp = d.get("split")
        for name, what in (("ftm_moved_at_least", "half or more"), ("ftm_moved_less", "less than half")):
            v = sp and sp[name]
            if v and v["records"]:
                print(f"{d['data']}: portability where FT-M moved {what} of the other subjects ({len(v['records'])} "
                      f"records): kne {100 * v['kne']:.1f}, FT-M {100 * v['ft-m']:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", metavar="EVAL_JSON",
                   help="read the runs of a kne eval --other-subjects N --out file instead of editing")
    p.add_argument("--data", default="recent", help="a shipped KnowEdit set: zsre, counterfact or recent (default recent)")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N records")
    p.add_argument("--limit", type=int, default=20, help="records to edit, each alone (after --skip)")
    p.add_argument("--others", type=int, default=8, help="other subjects asked per edit, at most (default 8)")
    p.add_argument("--method", nargs="+", default=["kne", "ft-m"], choices=["kne", "ft-m"])
    p.add_argument("--preset", default="local", help="KNEConfig preset of the kne edits (default local)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--split", metavar="EVAL_JSON",
                   help="take the KnowEdit portability of the split from this kne eval --out file (default: the "
                        "runs themselves)")
    p.add_argument("--label", help="the kne run's method label (default 'kne (PRESET)')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.skip < 0 or a.limit < 1 or not 1 <= a.others <= 8:
        p.error("--skip must be 0 or more, --limit 1 or more, --others 1..8")
    for flag, path in (("--from", a.source), ("--split", a.split)):
        if path and not Path(path).is_file():
            p.error(f"{flag} {path}: no such file")
    from kne.io import check_output, write_text

    check_output(a.out, "--out")  # before the run, not after it
    label = a.label or f"kne ({a.preset})"
    from kne.compare import load_runs  # a kne eval --out file, checked field by field

    split_runs = load_runs(a.split) if a.split else None
    if a.source:
        runs = load_runs(a.source)
        if not any(rows_of(r) for r in runs):
            raise ValueError(f"{a.source}: no run was asked of other subjects (make it with kne eval --other-subjects N)")
        what = {"from": a.source}
    else:
        import torch

        import kne
        from kne.runs import run_edits

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        cfg = kne.KNEConfig.preset(a.preset)
        model, tok = kne.load_model()
        reqs = kne.datasets.knowedit(a.data)[a.skip:a.skip + a.limit]
        if not reqs:
            raise ValueError(f"{a.data} has no records after --skip {a.skip}")
        data_file = kne.datasets.resolve_data(a.data).name.removesuffix(".gz")
        runs = []
        for m in a.method:
            r = run_edits(model, tok, reqs, m, cfg, other_subjects=a.others, progress=not a.quiet,
                          indices=range(a.skip, a.skip + len(reqs)))
            r.update(data=data_file, method=label if m == "kne" else m)
            runs.append(r)
        what = {"data": a.data, "skip": a.skip, "limit": a.limit, "others": a.others, "preset": a.preset}
    summary = summarise(runs, label, split_runs)
    if not summary:
        raise ValueError("no record could be asked of other subjects (no shipped template asks their relation)")
    report(summary)
    if a.out:
        out = {**what, "note": "others_moved of kne.evaluate(other_subjects=N) per independent edit; split: KnowEdit "
                               "portability where FT-M moved half or more of the other subjects, and elsewhere",
               "runs": summary}
        write_text(a.out, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
