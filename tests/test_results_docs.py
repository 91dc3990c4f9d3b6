"""The README's held-out and spillover tables are the committed results files' numbers."""

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
