"""Render the result tables of README.md and docs/ from the files in benchmarks/results/.

    python tools/render_docs.py            # rewrite every rendered table in place
    python tools/render_docs.py --check    # exit 1, naming each table that differs from its files

A rendered table sits between two markers in a page::

    <!-- table: quality-headline -->
    | data | method | ... |
    <!-- /table -->

and everything between them is what :data:`TABLES` [name] makes of the results files; nothing in
a rendered table is typed by hand. ``tests/test_docs.py`` runs ``--check``. The prose around a table
may quote its numbers; the tables are the record.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)

FILES = {"ZsRE-test-all.json": "ZsRE", "wiki_counterfact-train.json": "counterfact", "wiki_recent-train.json": "recent",
         "zsre": "ZsRE", "counterfact": "counterfact", "recent": "recent"}
METRIC_COLUMNS = (("edit_succ", "Edit Succ.", "rewrite_acc"), ("rephrase", "Rephrase", "rephrase_acc"),
                  ("portability", "Portability", "portability"), ("locality", "Locality", "locality"))


# ------------------------------------------------------------------------------------------ helpers
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def rows_of(name: str) -> List[dict]:
    with open(RESULTS / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def method_label(method: str) -> str:
    """``kne (local, revision 2, --exclude-edge-layers 1)`` -> ``kne, `local`, revision 2, `--exclude-edge-layers 1```."""
    if method == "ft-m":
        return "FT-M"
    if method == "ft-m+kl":
        return "FT-M + neighbour KL"
    m = re.fullmatch(r"kne \((.*)\)", method)
    if not m:
        return method
    parts = m.group(1).split(", ")
    out = [f"`{parts[0]}`"] + [f"`{p}`" if p.startswith("--") else p for p in parts[1:]]
    return "kne, " + ", ".join(out)


def table(header: Sequence[str], align: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def runs_of(name: str, methods: Optional[Sequence[str]] = None) -> List[dict]:
    """The runs of an eval results file, by data file in the KnowEdit order, then ``methods``'
    order (default: the file's)."""
    runs = load(name)["runs"]
    order = list(dict.fromkeys(FILES))
    if methods is not None:
        runs = [r for r in runs if r["method"] in methods]
        return sorted(runs, key=lambda r: (order.index(r["data"]), list(methods).index(r["method"])))
    return sorted(runs, key=lambda r: order.index(r["data"]))


def mean_steps(run: dict) -> Optional[float]:
    steps = [r.get("steps") for r in run.get("records", []) if r.get("steps") is not None]
    return sum(steps) / len(steps) if steps else None


def eval_table(name: str, methods: Optional[Sequence[str]] = None, data_suffix: str = "", seconds: bool = False,
               steps: bool = False, fluency: bool = False) -> Tuple[List[str], List[str], List[List[str]]]:
    header = ["data", "method"] + [c[1] for c in METRIC_COLUMNS]
    align = ["l", "l"] + ["r"] * len(METRIC_COLUMNS)
    if fluency:
        header.append("Fluency")
        align.append("r")
    if steps:
        header.append("steps")
        align.append("r")
    if seconds:
        header.append("s/edit")
        align.append("r")
    rows = []
    for run in runs_of(name, methods):
        s = run["summary"]
        row = [FILES[run["data"]] + data_suffix, method_label(run["method"])] + [pct(s[c[0]]) for c in METRIC_COLUMNS]
        if fluency:
            row.append(pct(s.get("fluency")))
        if steps:
            n = mean_steps(run)
            row.append("-" if n is None else f"{n:.1f}")
        if seconds:
            row.append(f"{run['seconds_per_edit']:.2f}")
        rows.append(row)
    return header, align, rows


# ------------------------------------------------------------------------------------------ quality
HEADLINE = ("kne (local)", "kne (tuned)", "kne (authors)", "ft-m")


def quality_headline() -> str:
    """README: records 20-69, the three presets and FT-M; teacher-forced and generated (the truth
    stated once), other subjects and drift."""
    header = ["data", "method", "Edit Succ.", "gen.", "Rephrase", "gen.", "Portability", "gen.", "Locality", "gen.",
              "Others moved ↓", "Drift ↓"]
    rows = []
    for run in runs_of(MEASURES, HEADLINE):
        s = run["summary"]
        cells = [_cell(s, k) for tf, exact, contains in TWINS for k in (tf, contains or exact)]
        rows.append([FILES[run["data"]], method_label(run["method"])] + cells +
                    [_cell(s, "others_moved"), _cell(s, "drift")])
    return table(header, ["l", "l"] + ["r"] * (len(header) - 2), rows)


def quality_independent() -> str:
    return table(*eval_table("quality_independent.json", seconds=True))


def quality_sequential() -> str:
    return table(*eval_table("quality_sequential.json"))


def quality_heldout() -> str:
    h, a, rows = eval_table("quality_heldout.json")
    rows += eval_table("quality_heldout_sequential.json", data_suffix=", sequential (70-89)")[2]
    return table(h, a, rows)


def quality_fluency_10() -> str:
    return table(*eval_table("quality_fluency.json", fluency=True))


def quality_ftm_kl() -> str:
    """FT-M + the neighbour KL on records 20-44, beside FT-M and kne on the same records (the first
    25 records of their 50-record runs in quality_independent.json)."""
    from kne.metrics import mean_present, record_value

    header, align, rows = ["data", "method"] + [c[1] for c in METRIC_COLUMNS] + ["steps"], ["l", "l"] + ["r"] * 5, []
    kl = {r["data"]: r for r in load("quality_ftm_kl.json")["runs"]}
    full = runs_of("quality_independent.json",
                   ("ft-m", "kne (local)", "kne (local, revision 2)", "kne (local, first revision)"))
    for data in kl:
        indices = {rec["index"] for rec in kl[data]["records"]}
        for run in [r for r in full if r["data"] == data and r["method"] == "ft-m"] + [kl[data]] + \
                [r for r in full if r["data"] == data and r["method"] != "ft-m"]:
            recs = [rec for rec in run["records"] if rec["index"] in indices]
            cells = [pct(mean_present([record_value(rec, c[2]) for rec in recs])) for c in METRIC_COLUMNS]
            n = mean_steps(dict(records=recs))
            rows.append([FILES[data], method_label(run["method"])] + cells + ["-" if n is None else f"{n:.1f}"])
    return table(header, align, rows)


def quality_fluency_50() -> str:
    """Fluency over records 20-69: mean, standard error, median, generations below 450 (loops)."""
    header = ["data", "method"] + [c[1] for c in METRIC_COLUMNS] + ["Fluency (mean ± s.e.)", "median", "below 450",
                                                                     "against FT-M", "steps"]
    align = ["l", "l"] + ["r"] * 9
    runs = runs_of("quality_fluency_50.json")
    ftm = {r["data"]: r["summary"]["fluency"] for r in runs if r["method"] == "ft-m"}
    rows = []
    for run in runs:
        s = run["summary"]
        flu = [100 * rec["fluency"] for rec in run["records"] if rec.get("fluency") is not None]
        se = statistics.stdev(flu) / math.sqrt(len(flu))
        vs = "" if run["method"] == "ft-m" else f"{100 * (s['fluency'] / ftm[run['data']] - 1):+.1f}%"
        n = mean_steps(run)
        rows.append([FILES[run["data"]], method_label(run["method"])] + [pct(s[c[0]]) for c in METRIC_COLUMNS] +
                    [f"{100 * s['fluency']:.1f} ± {se:.1f}", f"{statistics.median(flu):.1f}",
                     str(sum(f < 450 for f in flu)), vs, "-" if n is None else f"{n:.1f}"])
    return table(header, align, rows)


def _interval(r: dict, few: int) -> str:
    cell = f"{100 * r['diff']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
    if r["low"] > 0 or r["high"] < 0:
        cell = f"**{cell}**"
    return cell + (f" ({r['n']} records)" if r["n"] < few else "")


def quality_intervals() -> str:
    """kne compare of `local` against FT-M on records 20-69 (10,000 resamples, seed 0)."""
    from kne.compare import compare_runs, load_runs, pair_runs

    runs = load_runs(RESULTS / "quality_independent.json")
    rows = []
    for a, b in pair_runs(runs, runs, "kne (local)", "ft-m"):
        by = {r["metric"]: r for r in compare_runs(a, b)}
        n = max(r["n"] for r in by.values())
        rows.append([FILES[a["data"]]] + [_interval(by[c[0]], n) if c[0] in by else "-" for c in METRIC_COLUMNS])
    return table(["data"] + [c[1] for c in METRIC_COLUMNS], ["l"] + ["r"] * len(METRIC_COLUMNS), rows)


# the measures beyond teacher forcing (generated answers, other subjects, drift): records 20-69
MEASURES = "quality_measures.json"
#: each teacher-forced metric and its generated twins (exact match; the truth stated once)
TWINS = (("edit_succ", "gen_edit_succ", "gen_edit_contains"), ("rephrase", "gen_rephrase", "gen_rephrase_contains"),
         ("portability", "gen_portability", "gen_portability_contains"), ("locality", "gen_locality", None))


def _cell(s: dict, key: Optional[str]) -> str:
    v = None if key is None else s.get(key)
    if v is None:
        return "-"
    return f"{v:.3f}" if key == "drift" else f"{100 * v:.1f}"


def quality_measures() -> str:
    """Records 20-69, the three presets and FT-M: each teacher-forced metric beside its generated
    twins, the other subjects moved, drift (nats) and its flips."""
    header = ["data", "method", "Edit Succ.: forced / exact / contains", "Rephrase: f / e / c",
              "Portability: f / e / c", "Locality: forced / gen.", "Others moved ↓", "Drift ↓", "Drift flips ↓"]
    rows = []
    for run in runs_of(MEASURES, HEADLINE):
        s = run["summary"]
        cells = []
        for tf, exact, contains in TWINS:
            keys = [tf, exact] + ([contains] if contains else [])
            cells.append("-" if s.get(tf) is None else " / ".join(_cell(s, k) for k in keys))
        rows.append([FILES[run["data"]], method_label(run["method"])] + cells +
                    [_cell(s, "others_moved"), _cell(s, "drift"), _cell(s, "drift_flips")])
    return table(header, ["l", "l"] + ["r"] * (len(header) - 2), rows)


def _order(runs: List[dict], key: str) -> Optional[str]:
    """The methods from best to worst on ``key``, to one decimal (ties share a place: ``a = b``)."""
    got = [(round(100 * r["summary"][key], 1) if r["summary"].get(key) is not None else None,
            method_label(r["method"]).replace("kne, ", "")) for r in runs]
    if any(v is None for v, _ in got):
        return None
    got.sort(key=lambda x: -x[0])
    out = got[0][1]
    for (v0, _), (v, m) in zip(got, got[1:]):
        out += (" = " if v == v0 else " > ") + m
    return out


def quality_ranks() -> str:
    """The order of the four methods on each teacher-forced metric and on its generated twin (the
    truth stated once; locality: the same answer), records 20-69."""
    from kne.metrics import METRICS

    names = {k: n for k, n, _ in METRICS}
    rows = []
    runs = runs_of(MEASURES, HEADLINE)
    for data in dict.fromkeys(r["data"] for r in runs):
        mine = [r for r in runs if r["data"] == data]
        for tf, exact, contains in TWINS:
            gen = contains or exact
            a, b = _order(mine, tf), _order(mine, gen)
            if a is None or b is None:
                continue
            rows.append([FILES[data], names[tf], a, b, "same" if a == b else "**differs**"])
    return table(["data", "metric", "teacher-forced, best first", "generated, best first", "order"],
                 ["l", "l", "l", "l", "l"], rows)


def quality_measures_intervals() -> str:
    """kne compare of `local` against FT-M on the measures (10,000 resamples, seed 0)."""
    from kne.compare import compare_runs, load_runs, pair_runs
    from kne.metrics import METRICS

    keys = ["gen_edit_contains", "gen_rephrase_contains", "gen_portability_contains", "gen_locality",
            "others_moved", "drift", "drift_flips"]
    names = {k: n for k, n, _ in METRICS}
    runs = load_runs(RESULTS / MEASURES)
    rows = []
    for a, b in pair_runs(runs, runs, "kne (local)", "ft-m"):
        by = {r["metric"]: r for r in compare_runs(a, b)}
        n = max(r["n"] for r in by.values())
        cells = []
        for k in keys:
            if k not in by:
                cells.append("-")
            elif k == "drift":
                r = by[k]
                cell = f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
                cells.append(f"**{cell}**" if r["low"] > 0 or r["high"] < 0 else cell)
            else:
                cells.append(_interval(by[k], n))
        rows.append([FILES[a["data"]]] + cells)
    return table(["data"] + [names[k] for k in keys], ["l"] + ["r"] * len(keys), rows)


def measures_cost() -> str:
    """Seconds per record of a kne eval run without and with --generate --other-subjects 8 --drift."""
    d = load("measures_cost.json")
    rows = [[FILES.get(r["data"], r["data"]), method_label(r["method"]), f"{r['base_s_per_record']:.2f}",
             f"{r['measures_s_per_record']:.2f}", f"{r['ratio']:.2f}x"] for r in d["runs"]]
    for m in dict.fromkeys(r["method"] for r in d["runs"]):  # a run over every file: the ratio of the sums
        mine = [r for r in d["runs"] if r["method"] == m]
        base, measured = (sum(r[k] for r in mine) for k in ("base_s_per_record", "measures_s_per_record"))
        rows.append([f"all {len(mine)} files, a record of each", method_label(m), f"{base:.2f}", f"{measured:.2f}",
                     f"{measured / base:.2f}x"])
    return table([f"records {d['skip']}-{d['skip'] + d['limit'] - 1}", "method", "s/record", "with the measures",
                  "ratio"], ["l", "l", "r", "r", "r"], rows)


def relation_spillover() -> str:
    runs = load("relation_spillover.json")["runs"]
    rows = []
    for r in runs:
        k, f = r["methods"]["kne"], r["methods"]["ft-m"]
        d = r["moved_difference"]
        lo, hi = d["bootstrap95"]
        cell = f"{100 * d['kne_minus_ftm']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        if lo > 0 or hi < 0:
            cell = f"**{cell}**"
        rows.append([FILES[r["data"]], f"{100 * k['own']:.1f} / {100 * k['moved']:.1f}",
                     f"{100 * f['own']:.1f} / {100 * f['moved']:.1f}", cell])
    return table(["records 20-69", "`local`: own / moved", "FT-M: own / moved", "moved, `local` - FT-M"],
                 ["l", "l", "l", "l"], rows)


def relation_spillover_shipped() -> str:
    """Other subjects from the shipped templates (quality_measures.json's runs), and the portability
    split by what FT-M's edit did."""
    rows = []
    for r in load("relation_spillover_shipped.json")["runs"]:
        m, sp = r["methods"], r.get("split") or {}
        k, f = m["kne (local)"], m["ft-m"]
        cells = [FILES[r["data"]], str(len(k["rows"])), f"{100 * k['own']:.1f} / {100 * k['moved']:.1f}",
                 f"{100 * f['own']:.1f} / {100 * f['moved']:.1f}"]
        for half in ("ftm_moved_at_least", "ftm_moved_less"):
            v = sp.get(half)
            cells.append("-" if not v or not v["records"] else
                         f"{len(v['records'])}: {100 * v['kne']:.1f} / {100 * v['ft-m']:.1f}")
        rows.append(cells)
    return table(["records 20-69", "asked", "`local`: own / moved", "FT-M: own / moved",
                  "FT-M moved half or more: records, portability `local` / FT-M", "less than half: the same"],
                 ["l", "r", "l", "l", "l", "l"], rows)


def spillover() -> str:
    got: Dict[str, Dict[str, str]] = {}
    for r in load("spillover.json")["runs"]:
        for m, v in r["methods"].items():
            if m == "ft-m":
                label = "FT-M"
            elif r.get("variant"):
                label = f"`local` `{r['variant']}`"
            elif r.get("revision", 2) == 2:
                label = "`local` revision 2" + (" `--exclude-edge-layers 1`" if r["overrides"] else "")
            else:
                label = "`local`"
            got.setdefault(label, {})[r["data"]] = f"{100 * v['own']:.1f} / {100 * v['others']:.1f}"
    order = ["`local`"] + sorted(k for k in got if k not in ("`local`", "FT-M")) + ["FT-M"]
    return table(["records 20-39: own / others", "ZsRE", "counterfact"], ["l", "l", "l"],
                 [[k, got[k].get("zsre", "-"), got[k].get("counterfact", "-")] for k in order if k in got])


# ------------------------------------------------------------------------------------------ speed
def _edit_rows() -> Dict[Tuple[str, str, str], dict]:
    return {(r["section"], r["provider"], r["metric"]): r for r in rows_of("edit_cpu.csv")}


def _s(r: dict) -> str:
    return f"{float(r['median']):.3g} s" if float(r["median"]) < 10 else f"{float(r['median']):.1f} s"


def performance_edit() -> str:
    """The edit benchmark (benchmarks/speed/bench_edit.py): kne against the reference and FT-M."""
    e = _edit_rows()
    steps = lambda p: int(float(e[("default edit", p, "total seconds")]["steps"]))  # noqa: E731
    ftm = e[("default edit", "ft-m", "total seconds")]
    rows = []
    for ig in (1, 8):
        k, r = e[(f"locate ig_steps={ig}", "kne.locate", "seconds")], e[(f"locate ig_steps={ig}", "kne.reference.locate", "seconds")]
        rows.append([f"localisation, `ig_steps={ig}`" + (", layerwise" if ig > 1 else ""), _s(k), _s(r),
                     f"{float(k['vs_reference']):.2f}x", "identical ensembles" if k["identical_ensembles"] == "True" else "ensembles differ"])
    k, r = e[("edit loop (30 steps)", "kne.fast_edit", "seconds/step")], e[("edit loop (30 steps)", "kne.reference.edit", "seconds/step")]
    fl = e[("edit loop (30 steps)", "floor (fwd+bwd to delta)", "seconds/step")]
    rows.append(["edit loop, 30 forced steps, per step", _s(k), _s(r), f"{float(k['vs_reference']):.2f}x",
                 f"floor (forward + backward to a delta) {_s(fl)}: {float(k['vs_floor']):.2f}x the floor"])
    k, r = e[("default edit", "kne.fast_edit", "total seconds")], e[("default edit", "kne.reference.edit", "total seconds")]
    rows.append([f"`authors` edit ({steps('kne.fast_edit')} steps)", _s(k), _s(r), f"{float(k['vs_reference']):.2f}x",
                 f"FT-M: {_s(ftm)} ({steps('ft-m')} steps)"])
    for preset in ("tuned", "local"):
        k = e[("default edit", f"kne.fast_edit {preset}", "total seconds")]
        ratio = float(ftm["median"]) / float(k["median"])
        rows.append([f"`{preset}` edit ({steps(f'kne.fast_edit {preset}')} steps)", _s(k), "", "",
                     f"{ratio:.2f}x faster than FT-M" if ratio >= 1 else f"{1 / ratio:.2f}x FT-M's time"])
    mem = {p: e[("peak memory", p, "added over forward")] for p in
           ("kne.fast_edit", "kne.fast_edit tuned", "kne.fast_edit local", "kne.reference.edit", "ft-m")}
    mb = lambda p: f"{float(mem[p]['median']):.1f} MB ({100 * float(mem[p]['share_of_model']):.1f}% of the model)"  # noqa: E731
    rows.append(["peak memory added over a forward pass, `authors` edit", mb("kne.fast_edit"), mb("kne.reference.edit"), "",
                 f"FT-M {float(mem['ft-m']['median']):.1f} MB; `tuned` {float(mem['kne.fast_edit tuned']['median']):.1f} MB; "
                 f"`local` {mb('kne.fast_edit local')}"])
    return table(["what (1 thread)", "`kne`", "reference", "ratio", "note"], ["l", "r", "r", "r", "l"], rows)


def performance_headline() -> str:
    """README: one line per preset, FT-M and the two localisation cases, from the edit benchmark."""
    e = _edit_rows()
    ftm = e[("default edit", "ft-m", "total seconds")]
    ref = e[("default edit", "kne.reference.edit", "total seconds")]
    rows = []
    for preset, prov in (("local", "kne.fast_edit local"), ("tuned", "kne.fast_edit tuned"), ("authors", "kne.fast_edit")):
        k = e[("default edit", prov, "total seconds")]
        mem = e[("peak memory", prov, "added over forward")]
        rows.append([f"kne, `{preset}`", f"{_s(k)} ({int(float(k['steps']))} steps)",
                     f"{float(ftm['median']) / float(k['median']):.2f}x",
                     f"{float(ref['median']) / float(k['median']):.2f}x" if preset == "authors" else "",
                     f"{float(mem['median']):.1f} MB"])
    rows.append(["FT-M", f"{_s(ftm)} ({int(float(ftm['steps']))} steps)", "", "",
                 f"{float(e[('peak memory', 'ft-m', 'added over forward')]['median']):.1f} MB"])
    for ig in (1, 8):
        k = e[(f"locate ig_steps={ig}", "kne.locate", "seconds")]
        rows.append([f"kne localisation alone, `ig_steps={ig}`", _s(k), "", f"{float(k['vs_reference']):.2f}x", ""])
    return table(["one edit", "time", "speed-up over FT-M", "over the reference", "memory beyond a forward pass"],
                 ["l", "r", "r", "r", "r"], rows)


def performance_kernels() -> str:
    rows = rows_of("kernels_cpu.csv")
    by: Dict[Tuple[str, str, str, str], Dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["op"], r["shape"], r["dtype"], r["baseline"]), {})[r["threads"]] = r
    out = []
    for (op, shape, dtype, base), t in by.items():
        cells = [f"`{op}` {shape} {dtype}", f"`{base}`"]
        for th in ("1", "2"):
            r = t.get(th)
            if r is None:
                cells += ["-", "-"]
            else:
                ms = 1000 * float(r["median_s"])
                cells += [f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1000:.2f} s", f"{float(r['speedup']):.1f}x"]
        out.append(cells)
    return table(["op (shape, dtype)", "baseline", "kne 1 thread", "ratio", "kne 2 threads", "ratio"],
                 ["l", "l", "r", "r", "r", "r"], out)


def performance_overhead() -> str:
    rows = rows_of("overhead_cpu.csv")
    by: Dict[Tuple[str, str], Dict[str, str]] = {}
    for r in rows:
        by.setdefault((r["op"], r["shape"]), {})[r["provider"]] = f"{float(r['median']):.1f} us"
    return table(["op (tiny input)", "`cpu`", "`torch`"], ["l", "r", "r"],
                 [[f"`{op}` {shape}", t.get("kne_kernels[cpu]", "-"), t.get("kne_kernels[torch]", "-")]
                  for (op, shape), t in by.items()])


def soak() -> str:
    s = rows_of("soak_summary.csv")[0]
    f = lambda k, d=2: f"{float(s[k]):.{d}f}"  # noqa: E731
    return table(["edits", "failures", "all finite after each", "s/edit, first / last decile",
                  "s/(step+1), first / last decile", "RSS after edit 1 / last", "RSS per edit", "undo data per edit",
                  "restore bit-exact"], ["r", "r", "l", "r", "r", "r", "r", "r", "l"],
                 [[s["edits"], s["failures"], "yes" if s["all_finite"] == "True" else "no",
                   f"{f('s_per_edit_first_decile')} / {f('s_per_edit_last_decile')} s",
                   f"{f('s_per_step_first_decile')} / {f('s_per_step_last_decile')} s",
                   f"{f('rss_after_first_mib', 0)} / {f('rss_after_last_mib', 0)} MiB",
                   f"+{f('rss_growth_mib_per_edit')} MiB", f"{f('undo_data_mib_per_edit')} MiB",
                   f"yes ({f('restore_seconds')} s)" if s["restore_bit_exact"] == "True" else "no"]])


# ------------------------------------------------------------------------------------------ settings
def settings() -> str:
    """Every KNEConfig field: its value in the local preset (an edit's default) and in KNEConfig()
    (the authors'), and its help (what ``kne edit --help`` prints). Rendered from the code."""
    import dataclasses

    from kne.config import DEFAULT_PRESET, KNEConfig

    local, authors = KNEConfig.preset(DEFAULT_PRESET), KNEConfig()
    fmt = lambda v: f"`{v!r}`".replace("|", "\\|")  # noqa: E731
    rows = [[f"`{f.name}`", fmt(getattr(local, f.name)), fmt(getattr(authors, f.name)),
             f.metadata["help"].replace("|", "\\|")] for f in dataclasses.fields(KNEConfig)]
    return table(["field", f"`{DEFAULT_PRESET}` (no config)", "`KNEConfig()` (`authors`)", "meaning"],
                 ["l", "l", "l", "l"], rows)


# ------------------------------------------------------------------------------------------ tuning logs
def tuning(name: str, fluency: bool = False) -> Callable[[], str]:
    """A tuning log as it is: one row per run (what was changed, on which file), its metrics
    (with ``fluency``, x100 as in the quality tables) and mean steps."""

    def render() -> str:
        rows = []
        for run in load(name)["runs"]:
            s = run["summary"]
            data = run.get("data") or ("ZsRE-test-all.json" if "zsre" in run.get("run", "") else "wiki_counterfact-train.json")
            what = run.get("what") or re.sub(r"^kne \((.*)\)$", r"\1", run.get("method", ""))
            if (run.get("protocol") == "sequential" or "seq" in run.get("run", "")) and "sequential" not in what:
                what += " (sequential)"
            n = run.get("mean_steps") or mean_steps(run)
            row = [what.replace("|", "/"), FILES.get(data, data)] + [pct(s[c[0]]) for c in METRIC_COLUMNS]
            if fluency:
                row.append("-" if s.get("fluency") is None else f"{100 * s['fluency']:.1f}")
            rows.append(row + ["-" if n is None else f"{n:.1f}"])
        extra = ["Fluency"] if fluency else []
        return table(["run", "data"] + [c[1] for c in METRIC_COLUMNS] + extra + ["steps"],
                     ["l", "l"] + ["r"] * (5 + len(extra)), rows)

    return render


LIFELONG = ("lifelong_counterfact.json", "lifelong_counterfact_ftm.json", "lifelong_tuned.json", "lifelong_rank1536.json",
            "lifelong_corpus.json", "lifelong_zsre_editor_500.json", "lifelong_zsre_ftm_500.json",
            "lifelong_zsre_rank512.json")
LIFELONG_NAMES = {"editor": "kne `local`, `kne.Editor`", "tuned": "kne `tuned`", "ft-m": "FT-M", "keep": "kne `local`, `keep=`",
                  "batch": "kne `local`, `kne.Editor`, batches"}


def lifelong() -> str:
    """Every checkpoint of the lifelong runs: retention over every edit so far (teacher-forced edit
    success and the generated answer's contains grade), locality, other subjects moved, drift, the
    seconds per edit of the last ten edits, the RSS growth since the first edit, the state's bytes
    and the largest capacity share."""
    rows = []
    for name in LIFELONG:
        doc = load(name)
        for run in doc["runs"]:
            for pt in run["points"]:
                s = pt["summary"]
                mb = pt.get("state_bytes")
                label = LIFELONG_NAMES.get(run["method"], run["method"])
                if pt.get("sketch_rank") is not None:
                    label += f" (rank {pt['sketch_rank']})"
                for k, v in (doc.get("overrides") or {}).items():
                    label += f", `{k}={json.dumps(v)}`"
                rows.append([FILES.get(doc["data"], doc["data"]), label,
                             str(pt["edits"]), pct(s.get("edit_succ")), pct(s.get("gen_edit_contains")),
                             pct(s.get("locality")), pct(s.get("others_moved")), f"{pt['drift']:.3f}",
                             f"{pt['seconds_per_edit_window']:.1f}", f"{pt['rss_growth_mb']:.0f}",
                             "-" if mb is None else f"{mb / 2**20:.1f}",
                             "-" if pt.get("capacity_max") is None else pct(pt["capacity_max"]),
                             str(pt["failures"])])
    return table(["data", "method", "edits", "Edit Succ.", "generated (contains)", "Locality", "others moved",
                  "drift (nats)", "s/edit (last 10)", "RSS growth (MB)", "state (MiB)", "capacity (max)",
                  "refused"], ["l", "l"] + ["r"] * 11, rows)


LIFELONG_LONG = ("lifelong_zsre_editor_500.json", "lifelong_zsre_ftm_500.json")


def lifelong_pace() -> str:
    """The long runs' cost over the sequence: wall-clock (and, where recorded, CPU) seconds per edit by
    hundred edits, the last hundred over the first, and the RSS at each checkpoint from 100 on with
    its slope per edit."""
    def by_hundred(xs):
        return [statistics.mean(xs[i:i + 100]) for i in range(0, len(xs), 100)]

    rows = []
    for name in LIFELONG_LONG:
        doc = load(name)
        for run in doc["runs"]:
            sec, pts = run["seconds"], run["points"]
            blocks = by_hundred(sec)
            cpu = run.get("cpu_seconds") or [None]
            cpu_blocks = "-" if None in cpu else " / ".join(f"{b:.1f}" for b in by_hundred(cpu))
            late = [p for p in pts if p["edits"] >= 100]
            slope = ((late[-1]["rss_mb"] - late[0]["rss_mb"]) / (late[-1]["edits"] - late[0]["edits"])
                     if len(late) > 1 else float("nan"))
            rows.append([FILES.get(doc["data"], doc["data"]), LIFELONG_NAMES.get(run["method"], run["method"]),
                         str(len(sec)), " / ".join(f"{b:.1f}" for b in blocks), cpu_blocks,
                         f"{blocks[-1] / blocks[0]:.2f}",
                         f"{statistics.median(sec[:100]):.1f} / {statistics.median(sec[-100:]):.1f}",
                         " / ".join(f"{p['rss_mb']:.0f}" for p in late), "-" if slope != slope else f"{slope:+.3f}",
                         str(len(run.get("segments", [])))])
    return table(["data", "method", "edits", "s/edit by hundred edits", "CPU s/edit by hundred edits",
                  "last 100 / first 100 (wall)", "median s/edit: first / last 100", "RSS at checkpoints from 100 on (MB)",
                  "RSS per edit (MB)", "processes that made it"], ["l", "l", "r", "l", "l", "r", "r", "l", "r", "r"], rows)


def editor_state() -> str:
    """The kept-key state at the Llama-2-7B shape and the embedded model's (benchmarks/speed/editor_state.py),
    for each shrink schedule the file measured."""
    rows = []
    for name in ("editor_state_llama7b.json", "editor_state_smollm2.json"):
        d = load(name)
        for schedule, r in d["schedules"].items():
            rows.append([d["shape"], f"{d['modules']} x {d['width']}", str(d["sketch_rank"]), schedule,
                         f"{d['formula_bytes'] / 2**20:.1f}", f"{r['state_bytes'] / 2**20:.1f}",
                         f"{100 * r['state_share_of_model']:.1f}%", f"{r['rss_growth_allocation_mb']:.0f}",
                         f"{r['rss_growth_edits_mb']:.0f}", str(d["edits"]), f"{1000 * r['seconds_per_edit_mean']:.0f}",
                         f"{1000 * max(r['seconds_per_edit']):.0f}", str(r["shrinks"]), str(max(r["shrinks_per_edit"]))])
    return table(["shape", "down_proj", "rank", "shrinks", "formula (MiB)", "measured (MiB)", "of the model",
                  "RSS at allocation (MB)", "RSS over the edits (MB)", "edits", "ms/edit (mean)", "ms/edit (max)",
                  "shrinks (all)", "shrinks in one edit (max)"],
                 ["l", "l", "r", "l"] + ["r"] * 10, rows)


def batch_table() -> str:
    """N facts in one call on the unedited model (benchmarks/quality/batch.py)."""
    d = load("batch_counterfact.json")
    names = {"local": "kne `local`, `kne.Editor`", "tuned": "kne `tuned`", "ft-m": "FT-M"}
    rows = []
    for r in d["rows"]:
        if r.get("skipped"):
            rows.append([names[r["method"]], str(r["n"])] + ["-"] * 6 + [r["skipped"]])
            continue
        s = r.get("summary") or {}
        rows.append([names[r["method"]], str(r["n"]), f"{r['seconds']:.1f}", f"{r['facts_per_second']:.3f}",
                     pct(s.get("edit_succ")), pct(s.get("gen_edit_contains")), pct(s.get("locality")),
                     "-" if r.get("steps") is None else str(r["steps"]), r.get("error") or ""])
    return table(["method", "N", "seconds", "facts/s", "Edit Succ.", "generated (contains)", "Locality", "steps",
                  "note"], ["l", "r", "r", "r", "r", "r", "r", "r", "l"], rows)


def editor_7b() -> str:
    """Ten Editor edits on the Llama-2-7B-shaped bf16 model (benchmarks/speed/editor_7b.py)."""
    d = load("editor_7b.json")
    gib = 2 ** 30
    rows = [["model (bf16)", f"{d['model_bytes'] / gib:.2f} GiB"],
            ["kept-key state: formula `8 l sum(d)`, l = " + str(d["sketch_rank"]), f"{d['formula_bytes'] / gib:.3f} GiB"],
            ["kept-key state: measured (buffers)", f"{d['state_bytes'] / gib:.3f} GiB "
             f"({100 * d['state_share_of_model']:.2f}% of the model)"],
            ["RSS: the model loaded", f"{d['rss_model_mb'] / 1024:.2f} GiB"],
            ["RSS: the editor made (its state allocated)", f"+{d['editor_rss_mb'] / 1024:.2f} GiB"],
            ["RSS after each of the edits", f"{min(e['rss_mb'] for e in d['edits']) / 1024:.2f}-"
             f"{max(e['rss_mb'] for e in d['edits']) / 1024:.2f} GiB"],
            ["peak RSS over the run", f"{d['peak_mb'] / 1024:.2f} GiB"],
            ["undo file after the edits (on disk)", f"{d['undo_bytes'] / 2**20:.0f} MiB"],
            ["seconds per edit (mean of " + str(len(d["edits"])) + ")", f"{d['seconds_per_edit_mean']:.1f}"]]
    return table(["", "measured"], ["l", "r"], rows)


#: name -> (renderer, the files it reads: named under the table it renders)
TABLES: Dict[str, Tuple[Callable[[], str], Tuple[str, ...]]] = {
    "quality-headline": (quality_headline, (MEASURES,)),
    "quality-independent": (quality_independent, ("quality_independent.json",)),
    "quality-intervals": (quality_intervals, ("quality_independent.json",)),
    "quality-relation-spillover": (relation_spillover, ("relation_spillover.json",)),
    "quality-relation-spillover-shipped": (relation_spillover_shipped, ("relation_spillover_shipped.json",)),
    "quality-measures": (quality_measures, (MEASURES,)),
    "quality-measures-cost": (measures_cost, ("measures_cost.json",)),
    "quality-ranks": (quality_ranks, (MEASURES,)),
    "quality-measures-intervals": (quality_measures_intervals, (MEASURES,)),
    "quality-heldout": (quality_heldout, ("quality_heldout.json", "quality_heldout_sequential.json")),
    "quality-ftm-kl": (quality_ftm_kl, ("quality_ftm_kl.json", "quality_independent.json")),
    "quality-sequential": (quality_sequential, ("quality_sequential.json",)),
    "quality-fluency-10": (quality_fluency_10, ("quality_fluency.json",)),
    "quality-fluency-50": (quality_fluency_50, ("quality_fluency_50.json",)),
    "spillover": (spillover, ("spillover.json",)),
    "performance-headline": (performance_headline, ("edit_cpu.csv",)),
    "performance-edit": (performance_edit, ("edit_cpu.csv",)),
    "performance-kernels": (performance_kernels, ("kernels_cpu.csv",)),
    "performance-overhead": (performance_overhead, ("overhead_cpu.csv",)),
    "soak": (soak, ("soak_summary.csv",)),
    "lifelong": (lifelong, LIFELONG),
    "lifelong-pace": (lifelong_pace, LIFELONG_LONG),
    "editor-7b": (editor_7b, ("editor_7b.json",)),
    "batch": (batch_table, ("batch_counterfact.json",)),
    "editor-state": (editor_state, ("editor_state_llama7b.json", "editor_state_smollm2.json")),
    "settings": (settings, ()),
    "tuning-rev3": (tuning("local_rev3_tuning.json"), ("local_rev3_tuning.json",)),
    "tuning-rev2": (tuning("local_rev2_tuning.json"), ("local_rev2_tuning.json",)),
    "tuning-margin": (tuning("local_margin_tuning.json"), ("local_margin_tuning.json",)),
    "tuning-portability": (tuning("local_portability_tries.json"), ("local_portability_tries.json",)),
    "tuning-answer-end": (tuning("answer_end_tuning.json", fluency=True), ("answer_end_tuning.json",)),
    "tuning-sequential-keep": (tuning("sequential_keep_tuning.json"), ("sequential_keep_tuning.json",)),
}


def rendered(name: str) -> str:
    """The text between a table's markers: the table, and the files it was rendered from."""
    fn, files = TABLES[name]
    text = fn()
    if files:
        text += "\n(" + ", ".join(f"`benchmarks/results/{f}`" for f in files) + "; `tools/render_docs.py`)\n"
    return text


def render_page(text: str, page: str) -> Tuple[str, List[str]]:
    """``text`` with every marked table rendered, and the names of those that changed."""
    changed = []

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"render_docs: {page} marks an unknown table {name!r} (known: {', '.join(TABLES)})")
        new = rendered(name)
        if new != m.group(3):
            changed.append(name)
        return m.group(1) + new + m.group(4)

    return MARK.sub(sub, text), changed


def main(argv=None) -> int:
    from kne.io import write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a rendered table is stale")
    args = ap.parse_args(argv)
    stale, used = [], set()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        used |= {m.group(2) for m in MARK.finditer(text)}
        new, changed = render_page(text, page.relative_to(ROOT).as_posix())
        if changed:
            stale += [f"{page.relative_to(ROOT)}: {name}" for name in changed]
            if not args.check:
                write_text(page, new)  # whole or not at all (kne.io)
    unused = sorted(set(TABLES) - used)
    if unused:
        print(f"render_docs: no page marks {', '.join(unused)}", file=sys.stderr)
        return 1
    if stale:
        verb = "differ from the results files (python tools/render_docs.py)" if args.check else "rendered"
        print("render_docs: " + verb + ":\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "python"))
    sys.exit(main())
