"""The command line on small inputs (in-process, and once through `python -m kne`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kne import cli



def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "kne", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("demo", "edit", "eval"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "kne", "eval", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for opt in ("--limit", "--method", "--out", "--data", "--percentile"):
        assert opt in out


def test_bad_arguments_exit_with_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--method", "rome", "--data", "x.json"])
    assert e.value.code == 2
    assert "invalid choice: 'rome'" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_data_file_is_a_clear_error(embedded, capsys, tmp_path):
    rc = cli.main(["eval", "--data", str(tmp_path / "nope.json"), "--limit", "1"])
    assert rc == 2
    assert "nope.json" in capsys.readouterr().err


@pytest.mark.slow
def test_invalid_config_is_a_clear_error(embedded, capsys):
    rc = cli.main(["edit", "--prompt", "The capital of France is", "--target", "Rome", "--percentile", "150"])
    assert rc == 2
    assert "KNEConfig.percentile" in capsys.readouterr().err


@pytest.mark.slow
def test_demo(embedded, capsys):
    assert cli.main(["demo", "--restore"]) == 0
    out = capsys.readouterr().out
    assert "greedy completions (before -> after)" in out
    assert "edit success 100.00%" in out
    # the local preset keeps the subject's other facts; another subject asked the edited relation
    # (an other capital) may move, and the demo says so and names the options that hold it
    same = [ln for ln in out.splitlines() if ln.strip().startswith("same subject")]
    assert len(same) == 2 and all(ln.split("'")[-4] == ln.split("'")[-2] for ln in same), same
    loc = float(out.split("locality ")[1].split("%")[0])
    assert loc >= 80.0
    assert ("note " in out) == (loc < 100.0 and any(
        ln.strip().startswith("other capital") and ln.split("'")[-4] != ln.split("'")[-2] for ln in out.splitlines()))
    assert "preset local" in out and "neighbour prompts" in out
    assert "restored" in out
    assert out.count("same subject") == 2 and out.count("other capital") == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kne", "ft-m", "reference"])
def test_eval_writes_results(embedded, tmp_path, capsys, method):
    out = tmp_path / "res.json"
    limit = 2 if method != "reference" else 1
    rc = cli.main(["eval", "--data", "zsre", "--limit", str(limit), "--method", method,
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "| data | method | protocol | n | Edit Succ." in text
    assert (f"method {method} (preset local);" in captured.err) == (method != "ft-m"), captured.err
    res = json.loads(out.read_text())
    assert res["method"] == method and res["summary"]["n"] == limit and res["protocol"] == "independent"
    assert len(res["records"]) == limit
    rec = res["records"][0]
    assert rec["rewrite_acc"] == 1.0
    assert set(rec["locality"]) == {"Relation_Specificity"} or not rec["locality"]
    assert 0.0 <= res["summary"]["portability"] <= 1.0
    assert res["seconds_per_edit"] > 0


@pytest.mark.slow
def test_edit_saves_a_loadable_model_and_an_edit_file(embedded, tmp_path, capsys):
    import kne

    save, edit = tmp_path / "edited", tmp_path / "france.safetensors"
    rc = cli.main(["edit", "--prompt", "The capital of France is", "--target", "Rome", "--subject", "France",
                   "--save-model", str(save), "--save", str(edit)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "\npreset  local\n" in out  # the default, said
    assert "success 100.00%" in out and "KB" in out
    meta = json.loads((save / "kne_edit.json").read_text())
    assert meta["request"]["subject"] == "France"
    ens = kne.Ensemble.load(save / "kne_ensemble.json")
    assert len(ens) == meta["stats"]["neurons"] > 0
    model, tok = kne.load_model(save)
    assert cli.greedy(model, tok, "The capital of France is").strip().startswith("Rome")
    # the edit file turns the saved edited model back into the original, bit for bit
    kne.revert_edit(model, edit)
    assert cli.greedy(model, tok, "The capital of France is").strip().startswith("Paris")
    base, _ = embedded
    base_sd = base.state_dict()
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())


def _knowedit_names():
    from kne.datasets import KNOWEDIT
    return [Path(v).name.removesuffix('.gz') for v in KNOWEDIT.values()]


@pytest.mark.slow
def test_eval_all_both_protocols(embedded, tmp_path, capsys):
    out, table = tmp_path / "all.json", tmp_path / "table.md"
    rc = cli.main(["eval", "--all", "--limit", "2", "--method", "ft-m",
                   "--protocol", "both", "--out", str(out), "--table", str(table), "--no-progress"])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["data"], r["protocol"]) for r in runs] == [
        (f, p) for f in _knowedit_names() for p in ("independent", "sequential")]
    assert all(r["summary"]["n"] == 2 for r in runs)
    md = table.read_text()
    assert md.count("| ft-m | sequential | 2 |") == 3 and md.count("| ft-m | independent | 2 |") == 3
    zsre = [r for r in runs if r["data"] == "ZsRE-test-all.json"]
    assert all(r["summary"]["rephrase"] is not None for r in zsre)


def test_eval_needs_data_or_all(capsys):
    assert cli.main(["eval", "--limit", "1"]) == 2
    assert "either --data (zsre, counterfact, recent or a file path) or --all" in capsys.readouterr().err


def test_eval_checks_names_and_outputs_before_loading_a_model(capsys, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "_load", no_model)
    assert cli.main(["eval", "--data", "wikibio"]) == 2
    assert "'wikibio' does not exist; give a path or one of the shipped data sets: zsre, counterfact, recent" in \
        capsys.readouterr().err
    assert cli.main(["eval", "--data", "zsre", "--out", str(tmp_path / "no" / "such" / "r.json")]) == 2
    assert "the folder" in capsys.readouterr().err
    assert cli.main(["eval", "--data", "zsre", "--table", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    f = tmp_path / "ens.json"
    f.write_text(json.dumps({"mlp.down_proj": {"0": [1, 2]}}))
    assert cli.main(["plot", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kne plot: error: plotting (kne plot, kne.plots) needs matplotlib") and "kne[plots]" in err
    assert not (tmp_path / "ens.png").exists()
