"""Evaluation runs (kne.runs): independent and sequential protocols, failures, restoring."""

import pytest

import kne
from kne import runs
from helpers import FACTS, assert_state_equal, snapshot


def reqs(n):
    return [kne.EditRequest(prompt=p, target_new=a, locality={"L": [{"prompt": FACTS[-1][0], "ground_truth": "x"}]})
            for p, a in FACTS[:n]]


@pytest.mark.parametrize("protocol", ["independent", "sequential"])
@pytest.mark.parametrize("method", ["kne", "ft-m"])
def test_runs_restore_the_model_and_report_every_record(protocol, method, tiny_model, tok):
    model = tiny_model("llama")
    snap = snapshot(model)
    cfg = kne.KNEConfig(percentile=90.0, steps=5, lr=5e-2)
    res = runs.run_edits(model, tok, reqs(3), method, cfg, protocol=protocol, progress=False)
    assert_state_equal(model, snap, f"after a {protocol} {method} run")
    assert res["protocol"] == protocol and res["method"] == method
    assert res["summary"]["n"] == 3 and [r["index"] for r in res["records"]] == [0, 1, 2]
    assert all(0.0 <= r["locality"]["L"] <= 1.0 for r in res["records"])
    assert res["seconds_per_edit"] > 0 and not res["failures"]


def test_sequential_keeps_earlier_edits_until_the_end(tiny_model, tok, monkeypatch):
    """In the sequential protocol the second edit runs on the model the first one changed, and the
    evaluation happens after both."""
    model = tiny_model("gpt2")
    snap = snapshot(model)
    seen = []
    real = runs.edit_with

    def spy(method, m, t, rq, cfg, ensemble=None, keep=None, editor=None):
        seen.append(all(v.equal(snap[k]) for k, v in m.state_dict().items()))
        assert keep is None and editor is None  # project is off: nothing to keep
        return real(method, m, t, rq, cfg, ensemble, keep)

    monkeypatch.setattr(runs, "edit_with", spy)
    runs.run_edits(model, tok, reqs(2), "kne", kne.KNEConfig(percentile=90.0, steps=3), protocol="sequential",
                   progress=False)
    assert seen == [True, False]
    assert_state_equal(model, snap)


@pytest.mark.filterwarnings("ignore:request .* has no subject")
@pytest.mark.parametrize("method", ["kne", "reference"])
def test_sequential_projected_edits_keep_the_earlier_ones(method, tiny_model, tok, monkeypatch):
    """With the projection on, the sequential edits are made by one kne.Editor of the method, which
    holds every earlier edit still applied (and the keys they kept); independent edits get none."""
    model = tiny_model("llama")
    snap = snapshot(model)
    kept = []
    real = runs.edit_with

    def spy(method_, m, t, rq, cfg, ensemble=None, keep=None, editor=None):
        assert keep is None
        if editor is not None:
            assert editor.method == method
            kept.append([r.requests[0].prompt for r in editor.edits])
            before = editor.stats["kept_rows"]
        else:
            kept.append(None)
        res = real(method_, m, t, rq, cfg, ensemble, keep, editor)
        if editor is not None:  # this edit's prompt + answer and its neighbours' last tokens joined the state
            assert editor.stats["kept_rows"] > before
        return res

    monkeypatch.setattr(runs, "edit_with", spy)
    # the neighbours of these subject-less requests (shipped training prompts, every token) fill the tiny
    # models' 48-wide key space on their own; this test is about who holds the earlier edits, not capacity
    for module in (kne.editing, kne.reference):
        monkeypatch.setattr(module, "check_capacity", lambda *a: None)
    cfg = kne.KNEConfig(percentile=90.0, steps=3, project=True, project_corpus=False, preserve_count=1)
    for protocol in ("sequential", "independent"):
        runs.run_edits(model, tok, reqs(3), method, cfg, protocol=protocol, progress=False)
        assert_state_equal(model, snap)
    runs.run_edits(model, tok, reqs(2), method, cfg, protocol="sequential", progress=False, keep_earlier=False)
    assert_state_equal(model, snap)
    p = [f[0] for f in FACTS[:3]]
    assert kept == [[], p[:1], p[:2], None, None, None, None, None]


def test_which_methods_keep_the_earlier_edits():
    """One rule, read by run_edits and benchmarks/quality/sequential_curve.py: kne and the reference with
    the projection on; FT-M never; nothing without the projection."""
    local = kne.KNEConfig.preset("local")
    assert runs.keeps_earlier("kne", local) and runs.keeps_earlier("reference", local)
    assert not any(runs.keeps_earlier(m, local) for m in ("ft-m", "ft-m+kl"))
    assert not any(runs.keeps_earlier(m, kne.KNEConfig.preset("tuned")) for m in runs.METHODS)


def test_failed_edits_are_listed_not_dropped(tiny_model, tok, monkeypatch):
    model = tiny_model("opt")
    real = runs.edit_with

    def flaky(method, m, t, rq, cfg, ensemble=None, keep=None, editor=None):
        if rq[0].prompt == FACTS[1][0]:
            raise kne.EditError("boom")
        return real(method, m, t, rq, cfg, ensemble, keep, editor)

    monkeypatch.setattr(runs, "edit_with", flaky)
    for protocol in ("independent", "sequential"):
        res = runs.run_edits(model, tok, reqs(3), "kne", kne.KNEConfig(percentile=90.0, steps=2), protocol=protocol,
                             progress=False)
        assert res["failures"] == [{"index": 1, "error": "boom"}]
        assert [r["index"] for r in res["records"]] == [0, 2]


def test_bad_protocol_and_method(tiny_model, tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="protocol"):
        runs.run_edits(model, tok, reqs(1), "kne", kne.KNEConfig(), protocol="parallel")
    with pytest.raises(ValueError, match="unknown method"):
        runs.run_edits(model, tok, reqs(1), "rome", kne.KNEConfig())


def _benchmark(name):
    """A script of benchmarks/quality/ (not a package) loaded as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["sequential_curve", "spillover", "relation_spillover", "measures_cost"])
def test_benchmark_scripts_check_out_before_the_run(name, tmp_path, monkeypatch):
    """A --out the run could not write is refused before the model loads, not after the run."""
    mod = _benchmark(name)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(kne, "load_model", no_model)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        mod.main(["--data", "zsre", "--limit", "1", "--method", "kne", "--out", str(tmp_path / "no" / "x.json")])
    with pytest.raises(IsADirectoryError, match="give a file name"):
        mod.main(["--data", "zsre", "--limit", "1", "--method", "kne", "--out", str(tmp_path)])


def test_write_text_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    """kne.io.write_text (kne eval --out/--table, the benchmark scripts): the file is
    replaced whole; a write or rename that fails leaves the old contents and no temporary file."""
    import os

    from kne import io as kio

    out = tmp_path / "r.json"
    assert kio.write_text(out, "old\n") == out and out.read_text() == "old\n"
    for target in ("os.replace", "pathlib.Path.write_text"):
        def boom(*a, **k):
            raise OSError("disk full")

        with monkeypatch.context() as m:
            m.setattr(target, boom)
            with pytest.raises(OSError, match="disk full"):
                kio.write_text(out, "new\n")
        assert out.read_text() == "old\n", target
        assert sorted(os.listdir(tmp_path)) == ["r.json"], target
    kio.write_text(out, "new\n")
    assert out.read_text() == "new\n" and sorted(os.listdir(tmp_path)) == ["r.json"]


def test_write_atomic_keeps_the_old_file_when_the_writer_fails_midway(tmp_path):
    """kne.io.write_atomic (the benchmarks' charts): a writer that fails after writing part of
    the file leaves the old one and no temporary file; the temporary name keeps the suffix (savefig
    reads the format from it)."""
    import os

    from kne import io as kio

    out = tmp_path / "chart.png"
    out.write_bytes(b"old")
    seen = []

    def half_then_fail(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"ne")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        kio.write_atomic(out, half_then_fail)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["chart.png"]
    assert seen[0].parent == tmp_path and seen[0].suffix == ".png" and seen[0] != out
    kio.write_atomic(out, lambda tmp: tmp.write_bytes(b"new"))
    assert out.read_bytes() == b"new" and os.listdir(tmp_path) == ["chart.png"]


def test_csv_text_is_what_a_csv_file_writer_writes(tmp_path):
    """kne.io.csv_text (the benchmarks' tables): the same bytes as csv.DictWriter on a file opened
    with newline="", quoting and missing cells included; a key outside the header is an error."""
    import csv

    from kne import io as kio

    rows = [{"op": "a", "shape": "[2, 3]", "note": 'say "hi"'}, {"op": "b", "shape": "x,y"}]
    fields = ["op", "shape", "note"]
    with open(tmp_path / "ref.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    kio.write_text(tmp_path / "ours.csv", kio.csv_text(rows, fields))
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    with pytest.raises(ValueError, match="not in fieldnames"):
        kio.csv_text([{"op": "a", "other": 1}], ["op"])


def test_relation_spillover_reads_eval_runs(tmp_path, capsys):
    """benchmarks/quality/relation_spillover.py --from: the rows are the records that were asked of other
    subjects (others_moved not None), the mean is over them, and the split comes from the same runs."""
    import json

    mod = _benchmark("relation_spillover")

    def rec(i, moved, port):
        return {"index": i, "rewrite_acc": 1.0, "portability": {"A": port},
                "others": {"template": "The capital of {} is", "subjects": ["Spain", "Peru"]},
                "others_moved": moved}

    runs = [{"method": "kne (local)", "data": "d.json", "protocol": "independent",
             "records": [rec(0, 0.0, 0.2), rec(1, 0.5, 0.4), {"index": 2, "others_moved": None, "rewrite_acc": 1.0,
                                                              "portability": {"A": 1.0}}]},
            {"method": "ft-m", "data": "d.json", "protocol": "independent",
             "records": [rec(0, 1.0, 0.6), rec(1, 0.0, 0.0), rec(2, 1.0, 1.0)]},
            {"method": "ft-m", "data": "d.json", "protocol": "sequential", "records": [rec(0, 1.0, 0.0)]}]
    for r in runs:
        r["summary"] = {"n": len(r["records"])}
    src = tmp_path / "eval.json"
    src.write_text(json.dumps({"runs": runs}))
    out = tmp_path / "rel.json"
    assert mod.main(["--from", str(src), "--out", str(out)]) == 0
    (d,) = json.loads(out.read_text())["runs"]
    assert [x["index"] for x in d["methods"]["kne (local)"]["rows"]] == [0, 1]
    assert d["methods"]["kne (local)"]["moved"] == pytest.approx(0.25)
    assert d["methods"]["ft-m"]["moved"] == pytest.approx(2 / 3)
    assert d["split"]["ftm_moved_at_least"] == {"records": [0], "kne": 0.2, "ft-m": 0.6}
    assert d["split"]["ftm_moved_less"] == {"records": [1], "kne": 0.4, "ft-m": 0.0}
    assert "other subjects moved to the new target 25.0%" in capsys.readouterr().out
    for r in runs:
        for x in r["records"]:
            x["others_moved"] = None
    src.write_text(json.dumps({"runs": runs}))
    with pytest.raises(ValueError, match="no run was asked of other subjects"):
        mod.main(["--from", str(src)])


def test_relation_spillover_portability_split():
    """relation_spillover.py --split: each method's mean KnowEdit portability over the records where
    FT-M moved at least half of the other subjects, and over the rest."""
    mod = _benchmark("relation_spillover")
    runs = [{"method": m, "data": "d.json", "protocol": "independent",
             "records": [{"index": i, "portability": {"A": p, "B": p}} for i, p in enumerate(ps)]}
            for m, ps in (("kne (local)", [0.2, 0.4, 1.0]), ("ft-m", [0.6, 0.4, 0.0]), ("kne (tuned)", [9, 9, 9]))]
    kne_rows = [{"index": i, "moved": 0.0} for i in range(3)]
    ftm_rows = [{"index": 0, "moved": 0.9}, {"index": 1, "moved": 0.5}, {"index": 2, "moved": 0.1}]
    sp = mod.portability_split(kne_rows, ftm_rows, runs, "d.json", "kne (local)")
    assert sp["ftm_moved_at_least"] == {"records": [0, 1], "kne": pytest.approx(0.3), "ft-m": pytest.approx(0.5)}
    assert sp["ftm_moved_less"] == {"records": [2], "kne": 1.0, "ft-m": 0.0}
    assert sp["kne_label"] == "kne (local)"
    with pytest.raises(ValueError, match="no independent run of 'kne' on d.json"):
        mod.portability_split(kne_rows, ftm_rows, runs, "d.json", "kne")


@pytest.mark.slow
def test_relation_spillover_benchmark(embedded, tmp_path, monkeypatch, capsys):
    """benchmarks/quality/relation_spillover.py on two recent records: ``moved`` is what editing and asking
    the shipped other subjects by hand gives, and the model is restored after every edit."""
    import json

    from kne.others import other_subject_prompts

    mod = _benchmark("relation_spillover")
    model, tok = embedded
    orig = snapshot(model)
    monkeypatch.setattr(kne, "load_model", lambda *a, **k: (model, tok))
    out = tmp_path / "rel.json"
    assert mod.main(["--data", "recent", "--skip", "63", "--limit", "2", "--others", "4", "--method", "kne",
                     "--out", str(out), "--quiet"]) == 0
    assert_state_equal(model, orig)
    (res,) = json.loads(out.read_text())["runs"]
    reqs = kne.datasets.knowedit("recent")
    rows = res["methods"]["kne (local)"]["rows"]
    assert rows and {r["index"] for r in rows} <= {63, 64}
    for row in rows:
        r = reqs[row["index"]]
        t, subs, prompts = other_subject_prompts(r, 4)
        assert t == row["template"] and r.subject not in subs
        pre = kne.evaluate(model, tok, [kne.EditRequest(p, r.target_new) for p in prompts]).records
        asked = [p for p, x in zip(prompts, pre) if x["rewrite_acc"] < 1.0]
        assert len(asked) == row["others"]
        edit = kne.fast_edit(model, tok, [r], kne.KNEConfig.preset("local"))
        ev = kne.evaluate(model, tok, [kne.EditRequest(p, r.target_new) for p in asked]).records
        edit.restore()
        assert row["moved"] == pytest.approx(sum(x["rewrite_acc"] >= 1.0 for x in ev) / len(ev))
    assert_state_equal(model, orig)
    assert "other subjects moved to the new target" in capsys.readouterr().out


@pytest.mark.slow
def test_sequential_curve_benchmark(embedded, tmp_path, monkeypatch, capsys):
    """benchmarks/quality/sequential_curve.py: one row per edit and method, the metrics after that many
    edits (kne's first edit equals an independent one's success on its own record), and the model
    restored at the end."""
    import json

    mod = _benchmark("sequential_curve")
    model, tok = embedded
    orig = snapshot(model)
    monkeypatch.setattr(kne, "load_model", lambda *a, **k: (model, tok))
    out = tmp_path / "curve.json"
    assert mod.main(["--data", "zsre", "--limit", "2", "--method", "kne", "ft-m", "--out", str(out), "--quiet"]) == 0
    assert_state_equal(model, orig)
    res = json.loads(out.read_text())
    assert set(res["curves"]) == {"kne", "ft-m"}
    for rows in res["curves"].values():
        assert [r["edits"] for r in rows] == [1, 2]
        for r in rows:
            assert 0.0 <= r["locality"] <= 1.0 and 0.0 <= r["edit_succ"] <= 1.0
        assert rows[1]["edit_succ"] > rows[0]["edit_succ"]  # the second edit lands on its own record too
    assert "locality %" in capsys.readouterr().out


@pytest.mark.slow
def test_spillover_benchmark(embedded, tmp_path, monkeypatch, capsys):
    """benchmarks/quality/spillover.py: for each record edited alone, ``own`` is its own locality and
    ``others`` the other records' (same numbers as editing and evaluating by hand), the model
    restored after every edit."""
    import json

    mod = _benchmark("spillover")
    model, tok = embedded
    orig = snapshot(model)
    monkeypatch.setattr(kne, "load_model", lambda *a, **k: (model, tok))
    out = tmp_path / "spill.json"
    assert mod.main(["--data", "zsre", "--skip", "3", "--limit", "2", "--method", "kne", "--out", str(out),
                     "--quiet"]) == 0
    assert_state_equal(model, orig)
    res = json.loads(out.read_text())
    rows = res["methods"]["kne"]["rows"]
    assert [r["index"] for r in rows] == [3, 4]
    reqs = kne.datasets.knowedit("zsre")[3:5]
    pre = kne.evaluate(model, tok, reqs)
    for i, row in enumerate(rows):  # by hand: edit record i, score both records, restore
        edit = kne.fast_edit(model, tok, [reqs[i]], kne.KNEConfig.preset("local"))
        ev = kne.evaluate(model, tok, reqs, pre=pre).records
        edit.restore()
        loc = [sum(r["locality"].values()) / len(r["locality"]) for r in ev]
        assert row["own"] == pytest.approx(loc[i]) and row["others"] == pytest.approx(loc[1 - i])
        assert row["edit_succ"] == pytest.approx(ev[i]["rewrite_acc"])
    assert_state_equal(model, orig)
    assert "other subjects' locality" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs two or more"):
        mod.main(["--data", "zsre", "--limit", "1", "--method", "kne", "--quiet"])
