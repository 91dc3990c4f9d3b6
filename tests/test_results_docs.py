"""The README's held-out, spillover and relation spillover tables are the committed results files' numbers."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"
FILES = {"ZsRE-test-all.json": "ZsRE", "wiki_counterfact-train.json": "counterfact", "wiki_recent-train.json": "recent"}
LABELS = {"kne (local)": "kne, `--preset local`", "ft-m": "FT-M",
          "kne (local, --lr 15 --stop-rule margin)": "kne, `local` `--lr 15 --stop-rule margin`",
          "kne (local, revision 2)": "kne, `local`, revision 2",
          "kne (local, revision 2, --exclude-edge-layers 1)": "kne, `local` revision 2 `--exclude-edge-layers 1`",
          "kne (local, revision 2, --stop-rule min_prob --stop-prob 0.5 --delta-l2 0.003)":
              "kne, `local` revision 2, `min_prob` 0.5, `--delta-l2 0.003`"}


def _cell(v):
    return "-" if v is None else f"{100 * v:.2f}"


def test_held_out_table_is_the_results_files():
    rows = 0
    for name, suffix in (("quality_heldout.json", ""), ("quality_heldout_sequential.json", ", sequential (70-89)")):
        for run in json.loads((RESULTS / name).read_text())["runs"]:
            s = run["summary"]
            cells = " | ".join(_cell(s[k]) for k in ("edit_succ", "rephrase", "portability", "locality"))
            line = f"| {FILES[run['data']]}{suffix} | {LABELS[run['method']]} | {cells} |"
            assert line in README, f"README lacks the held-out row {line}"
            rows += 1
    assert rows == 25


def test_spillover_table_is_the_results_file():
    runs = json.loads((RESULTS / "spillover.json").read_text())["runs"]
    got = {}
    for r in runs:
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
    table = README[README.index("| records 20-39 | ZsRE | counterfact |"):]
    for label, by in got.items():
        row = next(l for l in table.splitlines() if l.startswith(f"| {label} |"))
        cells = [re.sub(r"\*\*", "", c).strip() for c in row.strip("|").split("|")[1:]]
        assert cells == [by["zsre"], by["counterfact"]], (label, cells, by)


def test_interval_table_is_kne_compare_on_the_results():
    from kne.compare import compare_runs, load_runs, pair_runs

    runs = load_runs(RESULTS / "quality_independent.json")
    table = README[README.index("| data | Edit Succ. | Portability | Locality |"):]
    for a, b in pair_runs(runs, runs, "kne (local)", "ft-m"):
        rows = {r["metric"]: r for r in compare_runs(a, b)}  # the command's defaults: 10000 resamples, seed 0
        line = next(l for l in table.splitlines() if l.startswith(f"| {FILES[a['data']]} |"))
        cells = [re.sub(r"\*\*", "", c).strip() for c in line.strip("|").split("|")[1:]]
        for metric, cell in zip(("edit_succ", "portability", "locality"), cells):
            r = rows[metric]
            want = f"{100 * r['diff']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
            assert cell.startswith(want), (a["data"], metric, cell, want)


def test_relation_spillover_table_is_the_results_file():
    runs = json.loads((RESULTS / "relation_spillover.json").read_text())["runs"]
    names = {"zsre": "ZsRE", "counterfact": "counterfact", "recent": "recent"}
    assert [r["data"] for r in runs] == ["zsre", "counterfact", "recent"]
    for r in runs:
        k, f = r["methods"]["kne"], r["methods"]["ft-m"]
        d = r["moved_difference"]
        lo, hi = d["bootstrap95"]
        cell = f"{100 * d['kne_minus_ftm']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        if lo > 0 or hi < 0:  # bold: the interval leaves out 0
            cell = f"**{cell}**"
        line = (f"| {names[r['data']]} | {100 * k['own']:.1f} / {100 * k['moved']:.1f} | {100 * f['own']:.1f} / "
                f"{100 * f['moved']:.1f} | {cell} |")
        assert line in README, f"README lacks the relation spillover row {line}"
        assert [x["index"] for x in k["rows"]] == [x["index"] for x in f["rows"]] == [a["index"] for a in r["asked"]]
        sp = r["split"]
        for half in ("ftm_moved_at_least", "ftm_moved_less"):
            v = sp[half]
            assert all((f_row["moved"] >= 0.5) == (half == "ftm_moved_at_least")
                       for f_row in f["rows"] if f_row["index"] in v["records"])
    cf = runs[1]["split"]
    assert (len(cf["ftm_moved_at_least"]["records"]), len(cf["ftm_moved_less"]["records"])) == (17, 33)
    assert f"{100 * cf['ftm_moved_at_least']['ft-m']:.1f} for FT-M against {100 * cf['ftm_moved_at_least']['kne']:.1f}" \
        in " ".join(README.split())
