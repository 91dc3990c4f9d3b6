"""What ``--generate --other-subjects 8 --drift`` adds to a ``kne eval`` run: the same records run
twice in one process, without and with the three measures.

    python benchmarks/quality/measures_cost.py --data zsre counterfact recent --skip 20 --limit 6 --out cost.json

For each file and method: seconds per record of ``kne.runs.run_edits`` (what ``kne eval`` runs)
without the measures, and with them. The drift baseline (the unedited model on all 256 held-out
sequences, once per run) is timed on its own and spread over ``--per-run`` records (default 50,
the Quality runs' size), so a short sample stands for a 50-record run. The held-out text itself
is made once per model and cached (``kne.drift``); it is made before the timing. Embedded model,
CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def measure(model, tok, reqs, method, cfg, per_run, indices):
    from kne import drift as D
    from kne.runs import run_edits

    t = time.perf_counter()
    run_edits(model, tok, reqs, method, cfg, progress=False, indices=indices)
    base = (time.perf_counter() - t) / len(reqs)
    t = time.perf_counter()
    D.token_scores(model, tok, D.drift_text(model, tok, progress=False))
    baseline = time.perf_counter() - t
    t = time.perf_counter()
    run_edits(model, tok, reqs, method, cfg, progress=False, indices=indices, generate=True, other_subjects=8,
              drift=True)
    total = time.perf_counter() - t
    measured = (total - baseline) / len(reqs) + baseline / per_run
    return {"base_s_per_record": base, "measures_s_per_record": measured, "drift_baseline_s": baseline,
            "ratio": measured / base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["zsre", "counterfact", "recent"], help="shipped KnowEdit sets")
    p.add_argument("--skip", type=int, default=20, help="leave out the first N records (default 20)")
    p.add_argument("--limit", type=int, default=6, help="records per file (default 6)")
    p.add_argument("--method", nargs="+", default=["kne"], choices=["kne", "ft-m"])
    p.add_argument("--preset", default="local", help="KNEConfig preset of the kne edits (default local)")
    p.add_argument("--per-run", type=int, default=50, help="records the drift baseline is spread over (default 50)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.skip < 0 or a.limit < 1 or a.per_run < 1:
        p.error("--skip must be 0 or more, --limit and --per-run 1 or more")
    from kne.io import check_output, write_text

    check_output(a.out, "--out")
    import torch

    import kne
    from kne import drift as D

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, tok = kne.load_model()
    D.drift_text(model, tok)  # made once per model and cached: not part of a run's cost
    cfg = kne.KNEConfig.preset(a.preset)
    rows = []
    for data in a.data:
        reqs = kne.datasets.knowedit(data)[a.skip:a.skip + a.limit]
        for m in a.method:
            r = measure(model, tok, reqs, m, cfg, a.per_run, range(a.skip, a.skip + len(reqs)))
            r.update(data=data, method=f"kne ({a.preset})" if m == "kne" else m, records=len(reqs))
            rows.append(r)
            print(f"{data} {r['method']}: {r['base_s_per_record']:.2f} s/record without the measures, "
                  f"{r['measures_s_per_record']:.2f} with them: {r['ratio']:.2f}x", flush=True)
    if a.out:
        out = {"skip": a.skip, "limit": a.limit, "per_run": a.per_run, "threads": int(os.environ["OMP_NUM_THREADS"]),
               "note": "kne.runs.run_edits without and with generate=True, other_subjects=8, drift=True in one "
                       "process; the drift baseline spread over per_run records", "runs": rows}
        write_text(a.out, json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
