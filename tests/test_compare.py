"""kne.compare and `kne compare`: paired differences of kne eval results with bootstrap intervals."""

import json
import random
from pathlib import Path

import pytest

from kne.cli import main
from kne.compare import compare_runs, format_comparison, load_runs, pair_runs, paired_difference
from kne.evaluation import EvalResult, record_value

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality_independent.json"


def _record(i, rng, shift=0.0, rephrase=True, port=True):
    def v():
        return min(1.0, max(0.0, rng.random() + shift))
    return {"index": i, "rewrite_acc": v(), "rephrase_acc": v() if rephrase else None,
            "portability": {"Reasoning": v(), "Subject_Aliasing": v()} if port else {},
            "locality": {"Relation_Specificity": v()}, "fluency": None}


def _run(method, records, data="ZsRE-test-all.json", protocol="independent"):
    return {"method": method, "data": data, "protocol": protocol, "records": records, "failures": []}


def test_paired_difference_constant_shift_and_identity():
    rng = random.Random(1)
    a = [rng.random() for _ in range(37)]
    same = paired_difference(a, a, boots=500)
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0
    shifted = paired_difference(a, [x - 0.25 for x in a], boots=500)
    assert shifted["diff"] == pytest.approx(0.25)
    assert shifted["low"] == pytest.approx(0.25) and shifted["high"] == pytest.approx(0.25)
    assert shifted["n"] == 37 and shifted["a"] == pytest.approx(sum(a) / 37)


def test_paired_difference_interval_holds_the_mean_is_seeded_and_narrows_with_n():
    rng = random.Random(2)
    small = [rng.gauss(0.1, 1) for _ in range(20)]
    large = [rng.gauss(0.1, 1) for _ in range(2000)]
    zeros_s, zeros_l = [0.0] * 20, [0.0] * 2000
    s = paired_difference(small, zeros_s, boots=2000, seed=3)
    l = paired_difference(large, zeros_l, boots=2000, seed=3)
    for r in (s, l):
        assert r["low"] <= r["diff"] <= r["high"]
    assert (l["high"] - l["low"]) < (s["high"] - s["low"]) / 4  # ~ 1/sqrt(100) as wide
    assert paired_difference(small, zeros_s, boots=2000, seed=3) == s
    assert paired_difference(small, zeros_s, boots=2000, seed=4) != s
    narrower = paired_difference(small, zeros_s, boots=2000, seed=3, level=0.5)
    assert s["low"] < narrower["low"] <= narrower["high"] < s["high"]


@pytest.mark.parametrize("args, match", [
    (([1.0], [1.0, 2.0]), "differ in length"),
    (([], []), "no paired values"),
])
def test_paired_difference_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        paired_difference(*args)


@pytest.mark.parametrize("kw, match", [({"boots": 0}, "boots"), ({"level": 1.0}, "level"), ({"level": 0}, "level")])
def test_paired_difference_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        paired_difference([1.0], [0.0], **kw)


def test_compare_runs_means_are_the_summaries():
    rng = random.Random(5)
    recs_a = [_record(i, rng, port=i % 3 != 0) for i in range(20, 45)]
    recs_b = [_record(i, rng, shift=-0.2, port=i % 3 != 0) for i in range(20, 45)]
    rows = {r["metric"]: r for r in compare_runs(_run("kne", recs_a), _run("ft-m", recs_b), boots=300)}
    sa, sb = EvalResult(recs_a).summary(), EvalResult(recs_b).summary()
    assert set(rows) == {"edit_succ", "rephrase", "portability", "locality"}  # no fluency in either
    for key, row in rows.items():
        assert row["a"] == pytest.approx(sa[key]) and row["b"] == pytest.approx(sb[key])
        assert row["diff"] == pytest.approx(sa[key] - sb[key])
        assert row["unpaired"] == 0
    assert rows["portability"]["n"] == sum(1 for i in range(20, 45) if i % 3 != 0)
    assert rows["edit_succ"]["n"] == 25


def test_compare_runs_counts_unpaired_records_and_refuses_disjoint_ones():
    rng = random.Random(6)
    a = _run("kne", [_record(i, rng) for i in range(0, 10)])
    b = _run("ft-m", [_record(i, rng) for i in range(3, 13)])  # 0-2 only in a, 10-12 only in b
    rows = compare_runs(a, b, boots=100)
    assert all(r["n"] == 7 and r["unpaired"] == 6 for r in rows)
    assert "(6 unpaired)" in format_comparison([(a, b, rows)])
    few = compare_runs(_run("kne", a["records"][:9]), _run("ft-m", [dict(r, rewrite_acc=0.0) for r in a["records"][:9]]),
                       boots=100)
    assert few[0]["n"] == 9 and few[0]["low"] > 0  # an interval away from 0, over 9 records: not a finding
    line = next(l for l in format_comparison([(a, b, few)]).splitlines() if "Edit Succ." in l)
    assert "(few)" in line and " *" not in line
    c = _run("ft-m", [_record(i, rng) for i in range(20, 30)])
    with pytest.raises(ValueError, match=r"share no record \(indices 0-9 against 20-29\)"):
        compare_runs(a, c)


def test_record_value_reduces_as_the_summary():
    assert record_value({"locality": {"x": 0.5, "y": 1.0}}, "locality") == 0.75
    assert record_value({"portability": {}}, "portability") is None
    assert record_value({"rephrase_acc": None}, "rephrase_acc") is None
    assert record_value({"rewrite_acc": 1}, "rewrite_acc") == 1.0


def test_pair_runs_by_file_and_protocol_with_clear_errors():
    rng = random.Random(7)
    recs = [_record(i, rng) for i in range(5)]
    a_runs = [_run("kne", recs), _run("kne", recs, data="wiki_recent-train.json")]
    b_runs = [_run("ft-m", recs), _run("ft-m", recs, data="wiki_recent-train.json"),
              _run("ft-m", recs, protocol="sequential")]
    pairs = pair_runs(a_runs, b_runs)
    assert [(a["data"], b["data"], b["protocol"]) for a, b in pairs] == [
        ("ZsRE-test-all.json", "ZsRE-test-all.json", "independent"),
        ("wiki_recent-train.json", "wiki_recent-train.json", "independent")]
    both = a_runs + b_runs
    with pytest.raises(ValueError, match="no run of method 'tuned'.*'ft-m', 'kne'"):
        pair_runs(both, both, "tuned", "ft-m")
    with pytest.raises(ValueError, match="no run to compare kne on wiki_counterfact"):
        pair_runs([_run("kne", recs, data="wiki_counterfact-train.json")], b_runs)
    two = b_runs + [_run("ft-m+kl", recs)]
    with pytest.raises(ValueError, match=r"2 runs \(ft-m, ft-m\+kl\).*--a-method / --b-method"):
        pair_runs(a_runs[:1], two)
    assert pair_runs(a_runs[:1], two, b_method="ft-m+kl")[0][1]["method"] == "ft-m+kl"


def test_load_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results JSON .*none.json' does not exist"):
        load_runs(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_runs(bad)
    bad.write_text(json.dumps({"summary": {}}))
    with pytest.raises(ValueError, match="the file lacks field method"):
        load_runs(bad)
    bad.write_text(json.dumps({"runs": [{"method": "kne"}]}))
    with pytest.raises(ValueError, match=r"runs\[0\] lacks field data"):
        load_runs(bad)
    bad.write_text(json.dumps({"runs": [_run("kne", [{"rewrite_acc": 1.0}])]}))
    with pytest.raises(ValueError, match=r"field runs\[0\]\.records\[0\]\.index must be an integer"):
        load_runs(bad)


def test_bootstrap_draws_in_chunks_give_the_same_interval_shape():
    """Many records: the resamples are drawn in chunks (bounded memory); the interval still holds
    the mean and is seeded."""
    rng = random.Random(9)
    a = [rng.random() for _ in range(5000)]
    r = paired_difference(a, [0.5] * 5000, boots=1000, seed=1)
    assert r["low"] <= r["diff"] <= r["high"] and r["high"] - r["low"] < 0.05
    assert paired_difference(a, [0.5] * 5000, boots=1000, seed=1) == r


def test_cli_compare_on_the_shipped_results(tmp_path, capsys):
    """The shipped quality results (docs/quality.md): the means `kne compare` pairs are the table's, and the output files
    are written whole."""
    out, table = tmp_path / "c.json", tmp_path / "c.md"
    assert main(["compare", str(RESULTS), "--a-method", "kne (local)", "--b-method", "ft-m", "--boots", "400",
                 "--out", str(out), "--table", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "paired bootstrap over records, 400 resamples, seed 0" in printed
    runs = {(r["method"], r["data"]): r["summary"] for r in load_runs(RESULTS)}
    rows = json.loads(out.read_text())["rows"]
    assert {r["data"] for r in rows} == {"ZsRE-test-all.json", "wiki_counterfact-train.json", "wiki_recent-train.json"}
    for r in rows:
        assert r["a_method"] == "kne (local)" and r["b_method"] == "ft-m"
        assert r["a"] == pytest.approx(runs[("kne (local)", r["data"])][r["metric"]])
        assert r["b"] == pytest.approx(runs[("ft-m", r["data"])][r["metric"]])
        assert r["low"] <= r["diff"] <= r["high"]
    assert table.read_text().splitlines()[0].startswith("| data | protocol | metric |")
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_compare_two_files(tmp_path, capsys):
    rng = random.Random(8)
    recs = [_record(i, rng) for i in range(12)]
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps({"runs": [_run("kne", recs)]}))
    fb.write_text(json.dumps({"runs": [_run("ft-m", [dict(r, rewrite_acc=r["rewrite_acc"] - 0.5) for r in recs])]}))
    assert main(["compare", str(fa), str(fb), "--boots", "200"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "Edit Succ." in l)
    assert "| +50.00 * | [+50.00, +50.00] |" in line


@pytest.mark.parametrize("extra, match", [
    ([], "with one results file, name both methods"),
    (["--a-method", "kne (local)", "--b-method", "ft-m", "--boots", "0"], "--boots must be >= 1"),
    (["--a-method", "kne (local)", "--b-method", "ft-m", "--level", "95"], "--level must be between 0 and 1"),
])
def test_cli_compare_bad_arguments(extra, match, capsys):
    assert main(["compare", str(RESULTS), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kne compare: error:") and match in err
