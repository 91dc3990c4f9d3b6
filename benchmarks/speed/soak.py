"""Sequential soak: N ``kne.fast_edit`` edits of one model, kept one after another, then every edit
restored in reverse order and the model checked bit for bit against its original state.

A benchmark, not a test: it takes minutes (about 2-5 s per edit of the embedded SmolLM2-135M on one
CPU thread). After each edit it checks that every parameter is finite and records the seconds the
edit took and the process's resident memory (RSS); at the end it restores the edits newest first
and compares every tensor of the state dict with the original bit for bit. A failed edit (an
``EditError``, or any other exception) is recorded and the soak goes on: ``fast_edit`` leaves the
model as it was on a failure, which the final bit-exact check also covers.

    python benchmarks/speed/soak.py                                   # 100 edits, tuned preset, 1 thread
    python benchmarks/speed/soak.py --n 20 --preset authors --data zsre --out /tmp

Prints a summary table and writes ``soak.csv`` (one row per edit) and ``soak_summary.csv`` to
``--out`` (default: the current folder). Exit status 1 when a parameter became non-finite or the
restore was not bit-exact.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

def rss_mib() -> float:
    """Resident set size of this process now (Linux ``/proc``; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def non_finite(model) -> List[str]:
    import torch

    with torch.no_grad():
        return [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]


def bit_diff(model, original: Dict[str, "object"]) -> List[str]:
    """Names of state-dict tensors whose bits differ from ``original``."""
    import torch

    views = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
    now = model.state_dict()
    bad = [k for k in original if k not in now] + [k for k in now if k not in original]
    for k, v in original.items():
        if k in now:
            a = now[k]
            if a.shape != v.shape or a.dtype != v.dtype:
                bad.append(k)
            elif a.dtype in views:
                if not torch.equal(a.view(views[a.dtype]), v.view(views[v.dtype])):
                    bad.append(k)
            elif not torch.equal(a, v):
                bad.append(k)
    return bad


def decile(values: List[float], which: str) -> float:
    n = max(1, len(values) // 10)
    part = values[:n] if which == "first" else values[-n:]
    return statistics.median(part) if part else float("nan")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="edits (default 100)")
    ap.add_argument("--skip", type=int, default=0, help="records of the file to skip first (default 0)")
    ap.add_argument("--data", default="counterfact",
                    help="the requests: a shipped KnowEdit set (zsre, counterfact, recent; kne.datasets) or a KnowEdit "
                         "JSON file (default counterfact)")
    ap.add_argument("--model", default="smollm2-135m", help="kne.load_model name or path (default: the embedded model)")
    ap.add_argument("--preset", default="tuned", help="KNEConfig.preset name (default tuned; e.g. authors)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for soak.csv and soak_summary.csv (default .)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.skip < 0 or args.threads < 1:
        ap.error("--n and --threads must be at least 1 and --skip at least 0")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file: give a folder")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    import kne

    try:
        data = kne.datasets.resolve_data(args.data)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    cfg = kne.KNEConfig.preset(args.preset)
    records = kne.load_knowedit(data)[args.skip:args.skip + args.n]
    if len(records) < args.n:
        print(f"soak: {data} holds only {len(records)} records after --skip {args.skip}; running {len(records)}")
    model, tok = kne.load_model(args.model)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rss_start = rss_mib()
    print(f"soak: {len(records)} sequential edits of {args.model} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters), preset {args.preset!r}, {args.threads} thread(s), data {data}; RSS {rss_start:.0f} MiB")

    rows, results, failures = [], [], 0
    bad_params: List[str] = []
    t_all = time.perf_counter()
    for i, rec in enumerate(records):
        t0 = time.perf_counter()
        status, steps, loss, neurons = "ok", "", "", ""
        try:
            res = kne.fast_edit(model, tok, [rec], cfg)
            results.append(res)
            steps, neurons = res.stats["steps"], res.stats["neurons"]
            loss = res.stats["losses"][-1] if res.stats["losses"] else ""
        except Exception as e:  # a failed edit leaves the model as it was: record it, go on
            failures += 1
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        seconds = time.perf_counter() - t0
        bad = non_finite(model)
        if bad:
            bad_params = bad
        rss = rss_mib()
        undo = sum(base.numel() * base.element_size() for r in results for _, _, _, base in r._saved) / 2**20
        # an edit's time is mostly its optimizer steps (and one localisation): per step, drift shows
        per_step = seconds / (steps + 1) if steps != "" else ""
        rows.append({"edit": i + 1, "record": args.skip + i, "seconds": round(seconds, 4), "steps": steps,
                     "seconds_per_step_plus_one": per_step if per_step == "" else round(per_step, 4),
                     "final_loss": loss if loss == "" else round(float(loss), 5), "neurons": neurons,
                     "all_finite": not bad, "rss_mib": round(rss, 1), "undo_data_mib": round(undo, 2),
                     "status": status})
        print(f"  edit {i + 1:4d}  {seconds:6.2f} s  steps {steps!s:>3}  loss {rows[-1]['final_loss']!s:>8}  "
              f"RSS {rss:7.1f} MiB  {'finite' if not bad else 'NON-FINITE: ' + bad[0]}  {status}", flush=True)
        if bad:
            print("soak: stopping, a parameter is not finite")
            break
    edit_total = time.perf_counter() - t_all

    t0 = time.perf_counter()
    for res in reversed(results):
        res.restore()
    restore_seconds = time.perf_counter() - t0
    differ = bit_diff(model, original)

    secs = [r["seconds"] for r in rows if r["status"] == "ok"]
    per_step = [r["seconds_per_step_plus_one"] for r in rows if r["status"] == "ok"]
    rss_vals = [r["rss_mib"] for r in rows]
    n = len(rows)
    growth = (rss_vals[-1] - rss_vals[0]) / (n - 1) if n > 1 else 0.0
    undo_growth = (rows[-1]["undo_data_mib"] - rows[0]["undo_data_mib"]) / (n - 1) if n > 1 else 0.0
    summary = {
        "date": datetime.date.today().isoformat(), "model": args.model, "preset": args.preset,
        "threads": args.threads, "data": Path(data).name, "edits": n, "failures": failures,
        "all_finite": not bad_params,
        "s_per_edit_median": round(statistics.median(secs), 3) if secs else "",
        "s_per_edit_first_decile": round(decile(secs, "first"), 3) if secs else "",
        "s_per_edit_last_decile": round(decile(secs, "last"), 3) if secs else "",
        "s_per_step_first_decile": round(decile(per_step, "first"), 3) if per_step else "",
        "s_per_step_last_decile": round(decile(per_step, "last"), 3) if per_step else "",
        "steps_median": statistics.median([r["steps"] for r in rows if r["status"] == "ok"]) if secs else "",
        "rss_start_mib": round(rss_start, 1), "rss_after_first_mib": rss_vals[0], "rss_after_last_mib": rss_vals[-1],
        "rss_growth_mib_per_edit": round(growth, 3), "undo_data_mib_per_edit": round(undo_growth, 3),
        "edit_seconds_total": round(edit_total, 1),
        "restore_seconds": round(restore_seconds, 3), "restore_bit_exact": not differ,
        "torch": torch.__version__, "kne": getattr(kne, "__version__", ""), "cpu": platform.processor() or platform.machine(),
    }
    from kne.io import csv_text, write_text

    # each file whole or not at all: an interrupted write leaves the last run's table as it was
    write_text(args.out / "soak.csv", csv_text(rows, list(rows[0])))
    write_text(args.out / "soak_summary.csv", csv_text([summary], list(summary)))

    print()
    print("| edits | failures | all finite | s/edit first / last decile | s/(step+1) first / last decile | "
          "RSS after edit 1 / last | RSS per edit | undo data per edit | restore bit-exact |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|")
    print(f"| {n} | {failures} | {'yes' if not bad_params else 'NO'} | {summary['s_per_edit_first_decile']} / "
          f"{summary['s_per_edit_last_decile']} s | {summary['s_per_step_first_decile']} / "
          f"{summary['s_per_step_last_decile']} s | {rss_vals[0]:.0f} / {rss_vals[-1]:.0f} MiB | {growth:+.2f} MiB | "
          f"{undo_growth:.2f} MiB | {'yes' if not differ else 'NO'} |")
    print(f"\n(medians over the first / last {max(1, len(secs) // 10)} successful edits; a step is one forward and "
          f"backward, +1 for the localisation and the final loss; every EditResult keeps its original rows for "
          f"restore(), the undo data; restore of all edits {restore_seconds:.2f} s; CSV: {args.out / 'soak.csv'}, "
          f"{args.out / 'soak_summary.csv'})")
    if differ:
        print(f"soak: restore is NOT bit-exact: {differ[:6]}")
    if bad_params:
        print(f"soak: non-finite parameters: {bad_params[:6]}")
    return 1 if (differ or bad_params) else 0


if __name__ == "__main__":
    sys.exit(main())
