"""The results files are what their docs say they are (the tables that restate them are rendered by
tools/render_docs.py and checked by tests/test_docs.py)."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_held_out_files_hold_every_run():
    runs = [r for name in ("quality_heldout.json", "quality_heldout_sequential.json")
            for r in json.loads((RESULTS / name).read_text())["runs"]]
    assert len(runs) == 25
    assert all(r["summary"]["n"] == (30 if r["protocol"] == "independent" else 20) for r in runs)


def test_relation_spillover_rows_and_split_agree():
    runs = json.loads((RESULTS / "relation_spillover.json").read_text())["runs"]
    assert [r["data"] for r in runs] == ["zsre", "counterfact", "recent"]
    for r in runs:
        k, f = r["methods"]["kne"], r["methods"]["ft-m"]
        assert [x["index"] for x in k["rows"]] == [x["index"] for x in f["rows"]] == [a["index"] for a in r["asked"]]
        sp = r["split"]
        for half in ("ftm_moved_at_least", "ftm_moved_less"):
            v = sp[half]
            assert all((f_row["moved"] >= 0.5) == (half == "ftm_moved_at_least")
                       for f_row in f["rows"] if f_row["index"] in v["records"])
    cf = runs[1]["split"]
    assert (len(cf["ftm_moved_at_least"]["records"]), len(cf["ftm_moved_less"]["records"])) == (17, 33)


def test_quality_files_name_their_records():
    for name, skip, limit in (("quality_independent.json", 20, 50), ("quality_sequential.json", 20, 20),
                              ("quality_heldout.json", 70, 30)):
        d = json.loads((RESULTS / name).read_text())
        assert (d["skip"], d["limit"]) == (skip, limit)
        for r in d["runs"]:
            idx = [rec["index"] for rec in r["records"]]
            assert idx == list(range(skip, skip + limit)), (name, r["method"], r["data"])


def test_quality_measures_hold_the_headline_runs_and_their_teacher_forced_numbers():
    """quality_measures.json: the four headline methods on records 20-69 of each file with every
    measure, and the teacher-forced values of each record those of quality_independent.json (the
    measures change nothing they do not add; the one exception is the machine's, below)."""
    d = json.loads((RESULTS / "quality_measures.json").read_text())
    assert (d["skip"], d["limit"]) == (20, 50)
    runs = d["runs"]
    assert sorted((r["method"], r["data"]) for r in runs) == sorted(
        (m, f) for m in ("kne (local)", "kne (tuned)", "kne (authors)", "ft-m")
        for f in ("ZsRE-test-all.json", "wiki_counterfact-train.json", "wiki_recent-train.json"))
    old = {(r["method"], r["data"]): r for r in json.loads((RESULTS / "quality_independent.json").read_text())["runs"]}
    differ = set()
    for r in runs:
        recs = r["records"]
        assert [x["index"] for x in recs] == list(range(20, 70)), (r["method"], r["data"])
        for a, b in zip(recs, old[(r["method"], r["data"])]["records"]):
            if any(a.get(k) != b.get(k) for k in ("rewrite_acc", "rephrase_acc", "portability", "locality")):
                differ.add((r["method"], r["data"], a["index"]))
        assert all(x["generated"]["template"] == "chat" for x in recs)
        assert all(x.get("drift") is not None for x in recs)
        s = r["summary"]
        for k in ("gen_edit_succ", "gen_edit_contains", "gen_locality", "others_moved", "drift", "drift_flips"):
            assert s.get(k) is not None, (r["method"], r["data"], k)
    # two local edits of counterfact stop a step or two later in quality_measures.json (20 and 31 steps,
    # against 18 and 30), portability only: the code that made quality_independent.json's local rows
    # gives 20 steps on the newer file's machine too (rounding of the machine or the packages)
    assert differ == {("kne (local)", "wiki_counterfact-train.json", 34), ("kne (local)", "wiki_counterfact-train.json", 49)}
