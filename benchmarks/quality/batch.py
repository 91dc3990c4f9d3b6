"""Batch editing: N facts in one call, for N in ``--sizes``, against FT-M given the same N facts.

Each batch is one call on the unedited model: kne ``local`` through :class:`kne.Editor` (one
attribution pass over all N requests in length-sorted batches, one training loop), kne ``tuned``
(``fast_edit`` with the N requests), and FT-M (kne's baseline with the N requests). The N facts are
then scored with EasyEdit's metrics and the generated answers; the model is put back. Facts per
second is N over the call's seconds. Records: as ``lifelong.py`` (records from 100 on that fed
nothing shipped), the first N.

    python benchmarks/quality/batch.py --data counterfact --sizes 1 10 100 --method local tuned ft-m --out batch.json

Embedded model, CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="counterfact")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--method", nargs="+", default=["local", "tuned", "ft-m"], choices=["local", "tuned", "ft-m"])
    p.add_argument("--max-local", type=int, default=10, help="largest N the local preset is run at")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch

    import kne
    from kne.evaluation import EvalResult, measure_before
    from lifelong import _cpu, lifelong_records

    torch.set_num_threads(1)
    indices, reqs = lifelong_records(a.data, 100)
    model, tok = kne.load_model()
    n_max = max(a.sizes)
    before = measure_before(model, tok, reqs[:n_max], generate=True)
    pre = kne.evaluate(model, tok, reqs[:n_max])
    for rec, extra in zip(pre.records, before):
        rec.update(extra)
    rows = []

    def save():
        doc = {"data": a.data, "records": indices[:n_max], "rows": rows, "kne": kne.__version__,
               "torch": torch.__version__, "cpu": _cpu(),
               "command": "python benchmarks/quality/batch.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)

    for n in a.sizes:
        for m in a.method:
            if m == "local" and n > a.max_local:
                rows.append({"method": m, "n": n, "skipped": f"N > --max-local {a.max_local}"})
                continue
            batch = reqs[:n]
            t = time.perf_counter()
            editor, res, error = None, None, None
            try:
                if m == "local":
                    editor = kne.Editor(model, tok, kne.KNEConfig.preset("local"), require_landed=False)
                    res = editor.edit(batch)
                elif m == "tuned":
                    res = kne.fast_edit(model, tok, batch, kne.KNEConfig.preset("tuned"))
                else:
                    res = kne.baselines.ft_m(model, tok, batch)
            except kne.EditError as e:
                error = str(e)[:300]
            secs = time.perf_counter() - t
            row = {"method": m, "n": n, "seconds": secs, "facts_per_second": n / secs, "error": error}
            if res is not None:
                try:
                    post = kne.evaluate(model, tok, batch, pre=EvalResult(pre.records[:n]), generate=True)
                    row.update(summary=post.summary(), steps=res.stats.get("steps"),
                               stopped_early=res.stats.get("stopped_early"))
                finally:
                    if editor is not None:
                        editor.undo_all()
                        editor.close()
                    else:
                        res.restore()
            rows.append(row)
            s = row.get("summary") or {}
            print(m, n, f"{secs:.1f}s", {k: s.get(k) for k in ("edit_succ", "locality", "gen_edit_contains")},
                  file=sys.stderr, flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
