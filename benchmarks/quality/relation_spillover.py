"""Does one edit rewrite its relation for other subjects? Relation spillover of single edits.

KnowEdit's locality asks the edited subject about *other* relations, and its portability includes
the edited fact asked of another name of the subject (Subject_Aliasing). Neither asks the edited
relation of other subjects, so an edit that answers "Canada" to "The name of the country which {}
is associated with is" whatever the subject scores full marks on an aliasing probe and loses
nothing in locality. This script edits each record alone and fills its prompt's template with the
subjects of the file's other records that share the template, keeping those whose unedited answer
is not already the new target (up to ``--others``); ``moved`` is the share of them that answer the
new target after the edit (every target token the argmax, teacher-forced: EasyEdit's rewrite
accuracy of 1), then the model is restored.

    python benchmarks/quality/relation_spillover.py --data recent --skip 20 --limit 50 --method kne ft-m --out rel.json

``kne`` is ``fast_edit`` with ``--preset`` (default ``local``); ``ft-m`` is kne's FT-M baseline.
A record whose subject is not once in its prompt, or whose template no other record shares, gets
no row; each is listed under ``skipped`` with the reason. ``--split`` takes a ``kne eval --out`` file
of the same records (both methods, independent) and splits their KnowEdit portability by whether
FT-M's edit moved half or more of the other subjects. Embedded model, CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def template(req):
    """The record's prompt with its subject as ``{}``, or ``None`` (no subject, or not once in it)."""
    s = req.subject
    if not s or req.prompt.count(s) != 1 or "{" in req.prompt or "}" in req.prompt:
        return None
    return req.prompt.replace(s, "{}")


def answered(model, tok, prompts, target):
    """For each prompt, whether the model answers ``target`` (EasyEdit's rewrite accuracy of 1)."""
    import kne

    if not prompts:
        return []
    ev = kne.evaluate(model, tok, [kne.EditRequest(prompt=p, target_new=target) for p in prompts])
    return [r["rewrite_acc"] >= 1.0 for r in ev.records]


def plan(reqs, skip, limit, others, model, tok, progress=False):
    """The edited records with the other subjects each is asked of, and the records left out
    (``progress``: a line per record on stderr; this asks the unedited model of many subjects)."""
    templates = [template(r) for r in reqs]
    by_template = {}
    for j, t in enumerate(templates):
        if t is not None:
            by_template.setdefault(t, []).append(j)
    jobs, skipped = [], []
    for i in range(skip, min(skip + limit, len(reqs))):
        r, t = reqs[i], templates[i]
        if t is None:
            skipped.append({"index": i, "why": "its subject is not once in its prompt"})
            continue
        subjects = []
        for j in by_template[t]:
            s = reqs[j].subject
            if j != i and s != r.subject and s not in subjects:
                subjects.append(s)
        if not subjects:
            skipped.append({"index": i, "why": "no other record shares its template"})
            continue
        prompts, n_answered = [], 0
        for k in range(0, len(subjects), 4 * others):  # in chunks, until enough are found
            batch = [t.format(s) for s in subjects[k:k + 4 * others]]
            hits = answered(model, tok, batch, r.target_new)
            n_answered += sum(hits)
            prompts += [p for p, h in zip(batch, hits) if not h]
            if len(prompts) >= others:
                break
        prompts = prompts[:others]
        if not prompts:
            skipped.append({"index": i, "why": "every other subject already answers the new target"})
            continue
        jobs.append({"index": i, "template": t, "target_new": r.target_new, "prompts": prompts,
                     "already": n_answered})
        if progress:
            print(f"plan: record {i}: {len(prompts)} other subjects to ask ({n_answered} already answer "
                  f"{r.target_new!r})", file=sys.stderr, flush=True)
    return jobs, skipped


def run(method, model, tok, reqs, jobs, cfg, progress):
    from kne.evaluation import mean_present
    from kne.runs import edit_with

    rows = []
    for job in jobs:
        r = reqs[job["index"]]
        t = time.perf_counter()
        res = edit_with(method, model, tok, [r], cfg)
        try:
            own = answered(model, tok, [r.prompt], r.target_new)[0]
            hits = answered(model, tok, job["prompts"], r.target_new)
        finally:
            res.restore()
        rows.append({"index": job["index"], "own": own, "others": len(hits), "moved": sum(hits) / len(hits),
                     "steps": res.stats.get("steps"), "seconds": time.perf_counter() - t})
        if progress:
            print(method, json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"own": mean_present([float(x["own"]) for x in rows]), "moved": mean_present([x["moved"] for x in rows]),
            "rows": rows}


def portability_split(rows_kne, rows_ftm, runs, data_file, kne_label, threshold=0.5):
    """KnowEdit portability of the two methods (from a ``kne eval`` JSON's ``runs``) on the records
    where FT-M's edit moved at least ``threshold`` of the other subjects, and on the rest."""
    import statistics

    from kne.evaluation import record_value

    def by_index(label):
        for r in runs:
            if r["method"] == label and r["data"] == data_file and r.get("protocol", "independent") == "independent":
                values = ((rec["index"], record_value(rec, "portability")) for rec in r["records"])
                return {i: v for i, v in values if v is not None}
        raise ValueError(f"no independent run of {label!r} on {data_file} in the --split file")

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
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="recent", help="a shipped KnowEdit set: zsre, counterfact or recent (default recent)")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N records")
    p.add_argument("--limit", type=int, default=20, help="records to edit, each alone (after --skip)")
    p.add_argument("--others", type=int, default=30,
                   help="other subjects asked per edit, at most (default 30)")
    p.add_argument("--method", nargs="+", default=["kne", "ft-m"], choices=["kne", "ft-m"])
    p.add_argument("--preset", default="local", help="KNEConfig preset of the kne edits (default local)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--split", metavar="EVAL_JSON",
                   help="a kne eval --out file with independent runs of the kne preset and ft-m on the same "
                        "records: also split their portability by whether FT-M's edit moved half or more of the "
                        "other subjects (needs both methods)")
    p.add_argument("--split-label", default="kne (local)",
                   help="the kne run's method label in the --split file (default 'kne (local)')")
    p.add_argument("--quiet", action="store_true", help="no line per edit on stderr")
    a = p.parse_args(argv)
    if a.split and set(a.method) != {"kne", "ft-m"}:
        p.error("--split needs --method kne ft-m")
    if a.split and not Path(a.split).is_file():
        p.error(f"--split {a.split}: no such file")
    if a.skip < 0 or a.limit < 1 or a.others < 1:
        p.error("--skip must be 0 or more, --limit and --others 1 or more")
    from kne.io import check_output, write_text

    check_output(a.out, "--out")  # before the run, not after it
    import torch

    import kne

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = kne.KNEConfig.preset(a.preset)
    model, tok = kne.load_model()
    reqs = kne.datasets.knowedit(a.data)
    jobs, skipped = plan(reqs, a.skip, a.limit, a.others, model, tok, progress=not a.quiet)
    for s in skipped:
        print(f"record {s['index']}: no row ({s['why']})", file=sys.stderr)
    if not jobs:
        raise ValueError(f"none of records {a.skip}..{a.skip + a.limit - 1} of {a.data} can be asked of other subjects "
                         "(see the lines above)")
    out = {"data": a.data, "skip": a.skip, "limit": a.limit, "others": a.others, "preset": a.preset,
           "note": "each record edited alone; moved: the share of other subjects (its template filled with the "
                   "subjects of other records that share it, their unedited answer not the new target) that answer "
                   "the new target after the edit (every target token the argmax); own: the edit's own prompt",
           "asked": jobs, "skipped": skipped, "methods": {}}
    for m in a.method:
        out["methods"][m] = res = run(m, model, tok, reqs, jobs, cfg, not a.quiet)
        print(f"{m}: {len(jobs)} edits, own {100 * res['own']:.1f}%, other subjects moved to the new target "
              f"{100 * res['moved']:.1f}%")
    if a.split:
        runs = json.loads(Path(a.split).read_text())["runs"]
        data_file = kne.datasets.resolve_data(a.data).name.removesuffix(".gz")
        out["split"] = sp = portability_split(out["methods"]["kne"]["rows"], out["methods"]["ft-m"]["rows"], runs,
                                              data_file, a.split_label)
        for name, what in (("ftm_moved_at_least", "half or more"), ("ftm_moved_less", "less than half")):
            v = sp[name]
            if v["records"]:
                print(f"portability where FT-M moved {what} of the other subjects ({len(v['records'])} records): "
                      f"kne {100 * v['kne']:.1f}, FT-M {100 * v['ft-m']:.1f}")
    if a.out:
        write_text(a.out, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
