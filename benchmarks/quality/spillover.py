"""Does one edit move what the model says about other subjects? Spillover of single edits.

KnowEdit's independent protocol scores each edit on its own record's locality probes only (the
edited subject asked another relation). This script edits each record alone and also scores the
locality probes of every *other* record of the run, whose subjects were not edited, against the
unedited model, then restores the model. ``others`` (the mean over edits of the other records'
locality) is what each edit of a sequence takes away from facts it was not about; ``own`` is the
independent protocol's locality.

    python benchmarks/quality/spillover.py --data zsre --skip 20 --limit 20 --method kne ft-m --out spill.json

``kne`` is ``fast_edit`` with ``--preset`` (default ``local``; ``--exclude-edge-layers`` on top);
``ft-m`` is kne's FT-M baseline. Embedded model, CPU, one thread; about 4 minutes per method for 20
records here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(method, data, skip, limit, cfg, progress):
    import kne
    from kne.evaluation import mean_present, record_value
    from kne.runs import edit_with

    model, tok = kne.load_model()
    reqs = kne.datasets.knowedit(data)[skip:skip + limit]
    if len(reqs) < 2:
        raise ValueError(f"--limit {limit} after --skip {skip} leaves {len(reqs)} record(s): spillover needs two or more")
    pre = kne.evaluate(model, tok, reqs)
    rows = []
    for i, r in enumerate(reqs):
        t = time.perf_counter()
        res = edit_with(method, model, tok, [r], cfg)
        try:
            ev = kne.evaluate(model, tok, reqs, pre=pre)
        finally:
            res.restore()
        loc = [record_value(rec, "locality") for rec in ev.records]
        rows.append({"index": skip + i, "edit_succ": ev.records[i]["rewrite_acc"], "own": loc[i],
                     "others": mean_present([v for j, v in enumerate(loc) if j != i]), "steps": res.stats.get("steps"),
                     "seconds": time.perf_counter() - t})
        if progress:
            print(method, json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"edit_succ": mean_present([r["edit_succ"] for r in rows]), "own": mean_present([r["own"] for r in rows]),
            "others": mean_present([r["others"] for r in rows]), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="zsre", help="a shipped KnowEdit set: zsre, counterfact or recent")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N records")
    p.add_argument("--limit", type=int, default=20, help="records: each edited alone, all evaluated")
    p.add_argument("--method", nargs="+", default=["kne", "ft-m"], choices=["kne", "ft-m"])
    p.add_argument("--preset", default="local", help="KNEConfig preset of the kne edits (default local)")
    p.add_argument("--exclude-edge-layers", type=int, default=None,
                   help="KNEConfig.exclude_edge_layers for the kne edits (default: the preset's)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no line per edit on stderr")
    a = p.parse_args(argv)
    from kne.io import check_output, write_text

    check_output(a.out, "--out")  # before the run, not after it
    import torch

    import kne

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    over = {} if a.exclude_edge_layers is None else {"exclude_edge_layers": a.exclude_edge_layers}
    cfg = kne.KNEConfig.preset(a.preset, **over)
    out = {"data": a.data, "skip": a.skip, "limit": a.limit, "preset": a.preset, "overrides": over,
           "note": "each record edited alone; own: its locality probes, others: the other records' probes "
                   "(subjects not edited), against the unedited model (EasyEdit's locality, in [0, 1])",
           "methods": {}}
    for m in a.method:
        out["methods"][m] = res = run(m, a.data, a.skip, a.limit, cfg, not a.quiet)
        print(f"{m}: edit succ {100 * res['edit_succ']:.2f}  own locality {100 * res['own']:.2f}  "
              f"other subjects' locality {100 * res['others']:.2f}")
    if a.out:
        write_text(a.out, json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
