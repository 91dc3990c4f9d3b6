"""Locality, success and portability after every edit of a sequential run, for kne and FT-M.

The sequential protocol (``kne eval --protocol sequential``) evaluates once, after the last edit.
This script evaluates every record of the run after each edit, so it shows how locality wears
away as edits accumulate and whether one edit or all of them do it. ``kne`` is ``fast_edit`` with
``--preset`` (default ``local``) keeping the earlier edits (``keep=``, as ``kne eval`` does with
the projection on); ``ft-m`` is kne's FT-M baseline.

    python benchmarks/quality/sequential_curve.py --data zsre --limit 20 --method kne ft-m --out curve.json

Embedded model, CPU, one thread; about 10 minutes for 20 local edits here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(method, data, skip, limit, preset, progress):
    import kne
    from kne.runs import edit_with, keeps_earlier

    model, tok = kne.load_model()
    reqs = kne.datasets.knowedit(data)[skip:skip + limit]
    cfg = kne.KNEConfig.preset(preset)
    pre = kne.evaluate(model, tok, reqs)
    results, rows = [], []
    try:
        for i, r in enumerate(reqs):
            t = time.perf_counter()
            keep = list(results) if keeps_earlier(method, cfg) else None
            results.append(edit_with(method, model, tok, [r], cfg, keep=keep))
            s = kne.evaluate(model, tok, reqs, pre=pre).summary()
            rows.append({"edits": i + 1, "steps": results[-1].stats.get("steps"), "seconds": time.perf_counter() - t,
                         **{k: s.get(k) for k in ("edit_succ", "rephrase", "portability", "locality")}})
            if progress:
                print(method, json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        for res in reversed(results):  # the model as it was loaded, for the next method
            res.restore()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="zsre", help="a shipped KnowEdit set: zsre, counterfact or recent")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N records")
    p.add_argument("--limit", type=int, default=20, help="edits in the sequence")
    p.add_argument("--method", nargs="+", default=["kne", "ft-m"], choices=["kne", "ft-m"])
    p.add_argument("--preset", default="local", help="KNEConfig preset of the kne edits (default local)")
    p.add_argument("--out", help="write the curves as JSON here")
    p.add_argument("--quiet", action="store_true", help="no line per edit on stderr")
    a = p.parse_args(argv)
    from kne.io import check_output, write_text

    check_output(a.out, "--out")  # before the run, not after it
    import torch

    torch.set_num_threads(1)
    out = {"data": a.data, "skip": a.skip, "limit": a.limit, "preset": a.preset,
           "note": "after each edit every record of the run is evaluated (EasyEdit's metrics, in [0, 1])",
           "curves": {m: run(m, a.data, a.skip, a.limit, a.preset, not a.quiet) for m in a.method}}
    print("edits " + " ".join(f"{m:>16s}" for m in a.method) + "   (locality %)")
    for i in range(a.limit):
        print(f"{i + 1:5d} " + " ".join(f"{100 * out['curves'][m][i]['locality']:16.1f}" for m in a.method))
    if a.out:
        write_text(a.out, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
