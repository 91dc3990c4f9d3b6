"""Seconds per edit: ``kne.fast_edit`` against ``kne.reference.edit`` (and FT-M) in one process.

Same model, same request, same settings; the implementations alternate, median of ``--repeats``
runs after one warm-up each. Threads are fixed (default 1) and printed. Writes a CSV of rows
(op, provider, metric, unit, median, p20, p80, ...) under benchmarks/results/ with --csv.

    python benchmarks/bench_edit.py --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--target", default="Rome")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stop-loss", type=float, default=1e-2, help="0 forces every step")
    ap.add_argument("--ig-steps", type=int, default=1)
    ap.add_argument("--no-ftm", action="store_true", help="skip the FT-M baseline")
    ap.add_argument("--csv", default=None, help="write result rows to this CSV")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import kne

    model, tok = kne.load_model(args.model)
    req = {"prompt": args.prompt, "target_new": args.target}
    cfg = kne.KNEConfig(steps=args.steps, stop_loss=args.stop_loss, ig_steps=args.ig_steps)
    providers = {
        "kne.fast_edit": lambda: kne.fast_edit(model, tok, req, cfg),
        "kne.reference.edit": lambda: kne.reference.edit(model, tok, req, cfg),
    }
    if not args.no_ftm:
        providers["ft-m"] = lambda: kne.baselines.ft_m(model, tok, req)
    times = {k: {"total": [], "locate": [], "edit": [], "steps": []} for k in providers}
    for name, fn in providers.items():  # warm-up
        fn().restore()
    for _ in range(args.repeats):
        for name, fn in providers.items():
            t = time.perf_counter()
            res = fn()
            wall = time.perf_counter() - t
            res.restore()
            times[name]["total"].append(wall)
            times[name]["locate"].append(res.stats["locate_seconds"])
            times[name]["edit"].append(res.stats["edit_seconds"])
            times[name]["steps"].append(res.stats["steps"])
    ref = statistics.median(times["kne.reference.edit"]["total"])
    print(f"# {args.model}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {platform.machine()}, "
          f"median of {args.repeats}; prompt {args.prompt!r} -> {args.target!r}; steps<={args.steps}, "
          f"stop_loss={args.stop_loss}, ig_steps={args.ig_steps}")
    print(f"{'provider':<20} {'locate s':>9} {'edit s':>9} {'total s':>9} {'p20':>7} {'p80':>7} {'steps':>6} {'vs ref':>7}")
    rows = []
    for name, t in times.items():
        med = statistics.median(t["total"])
        print(f"{name:<20} {statistics.median(t['locate']):9.3f} {statistics.median(t['edit']):9.3f} {med:9.3f} "
              f"{quantile(t['total'], .2):7.3f} {quantile(t['total'], .8):7.3f} {statistics.median(t['steps']):6.0f} "
              f"{ref / med:6.2f}x")
        rows.append({"op": "edit", "provider": name, "shape": args.model, "dtype": "float32", "metric": "seconds_per_edit",
                     "unit": "s", "median": f"{med:.4f}", "p20": f"{quantile(t['total'], .2):.4f}",
                     "p80": f"{quantile(t['total'], .8):.4f}", "threads": torch.get_num_threads(),
                     "device": platform.processor() or platform.machine(), "version": torch.__version__,
                     "date": datetime.date.today().isoformat()})
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
