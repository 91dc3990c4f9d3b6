"""kne plot: ensemble heatmaps and result bars are produced and non-empty.

Plotting is the ``plots`` extra (matplotlib): skipped, with the reason, where it is not installed
(the compatibility job installs the core and the triton extra only; without matplotlib the CLI's
error is checked in test_cli.py).
"""

import json

import pytest

import kne
from kne import cli

pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install 'kne[plots]')")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return len(data), w, h


def test_plot_ensemble_from_a_real_locate_and_a_knb_dict(tiny_model, tok, tmp_path, capsys):
    model = tiny_model("llama")
    ens = kne.locate(model, tok, [{"prompt": "The capital of France is", "target_new": "Rome"}],
                     target_modules=("ffn_out", "ffn_in"), percentile=80.0)
    p = ens.save(tmp_path / "ens.json")
    assert cli.main(["plot", str(p), "-o", str(tmp_path / "ens.png")]) == 0
    size, w, h = _png_size(tmp_path / "ens.png")
    assert size > 5000 and w > 400 and h > 100
    (tmp_path / "knb.json").write_text(json.dumps({"mlp.down_proj": {"0": [1, 2], "7": [3]}}))
    assert cli.main(["plot", str(tmp_path / "knb.json")]) == 0  # default output: knb.png
    assert _png_size(tmp_path / "knb.png")[0] > 3000
    assert "wrote" in capsys.readouterr().out


def test_plot_results_of_kne_eval(tmp_path):
    runs = [{"method": m, "protocol": "independent", "data": "ZsRE-test-all.json", "seconds_per_edit": 1.0,
             "summary": {"n": 3, "edit_succ": 1.0, "rephrase": 0.8, "portability": 0.3, "locality": lo,
                         "fluency": None}} for m, lo in (("kne", 0.7), ("ft-m", 0.9))]
    (tmp_path / "r.json").write_text(json.dumps({"runs": runs}))
    out = kne.plots.plot_file(tmp_path / "r.json", tmp_path / "r.png")
    assert _png_size(out)[0] > 5000
    (tmp_path / "empty.json").write_text(json.dumps({"runs": [{"method": "kne", "data": "d", "protocol": "independent",
                                                                "summary": {"n": 0}}]}))
    with pytest.raises(ValueError, match="no metric"):
        kne.plots.plot_file(tmp_path / "empty.json")


def test_a_metric_a_run_lacks_gets_no_bar(tmp_path, monkeypatch):
    """counterfact has no rephrase prompts: its runs must not show a 0% rephrase bar."""
    import matplotlib.axes

    heights = []
    orig = matplotlib.axes.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        heights.append([round(h, 6) for h in height])
        return orig(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    runs = [{"method": "kne", "data": "wiki_counterfact-train.json",
             "summary": {"edit_succ": 1.0, "rephrase": None, "portability": 0.3, "locality": 0.7, "fluency": None}},
            {"method": "kne", "data": "ZsRE-test-all.json",
             "summary": {"edit_succ": 0.9, "rephrase": 0.5, "portability": 0.25, "locality": 0.8, "fluency": None}}]
    out = kne.plots.plot_results(runs, tmp_path / "x.png")
    assert _png_size(out)[0] > 5000
    assert heights == [[100.0, 30.0, 70.0], [90.0, 50.0, 25.0, 80.0]]


def test_one_panel_per_data_file_with_only_its_metrics(tmp_path, monkeypatch):
    """A results file of several data files: a panel each, each with the metrics its runs have (no
    empty Rephrase group for counterfact), a method in the same colour in every panel."""
    import matplotlib.axes

    ticks, colours = [], []
    orig_ticks, orig_bar = matplotlib.axes.Axes.set_xticks, matplotlib.axes.Axes.bar

    def spy_ticks(self, positions, labels=None, **kw):
        ticks.append(list(labels))
        return orig_ticks(self, positions, labels, **kw)

    def spy_bar(self, x, height, *args, **kwargs):
        colours.append((kwargs.get("label"), kwargs.get("color")))
        return orig_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", spy_ticks)
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy_bar)
    runs = [{"method": m, "protocol": "independent", "data": d,
             "summary": {"edit_succ": 1.0, "rephrase": 0.5 if d.startswith("ZsRE") else None, "locality": 0.7,
                         "drift": 0.1}}
            for d in ("ZsRE-test-all.json", "wiki_counterfact-train.json") for m in ("kne (local)", "ft-m")]
    kne.plots.plot_results(runs, tmp_path / "x.png")
    assert ticks == [["Edit Succ.", "Rephrase", "Locality", "Drift (nats)"], ["Edit Succ.", "Locality", "Drift (nats)"]]
    assert colours[:2] == colours[2:] and colours[0][1] != colours[1][1]


def _lifelong(data, method, points):
    return {"data": data, "checkpoints": [p[0] for p in points],
            "runs": [{"method": method, "points": [{"edits": n, "drift": d, "seconds_per_edit_window": 2.0,
                                                      "sketch_rank": 145 if method == "editor" else None,
                                                      "summary": {"edit_succ": e, "locality": lo}}
                                                     for n, e, lo, d in points]}]}


def test_lifelong_curves_several_files_in_one_picture(tmp_path, monkeypatch, capsys):
    """benchmarks/quality/lifelong.py's results: one row of panels per data file, one line per run
    (retention and locality in %, drift in nats) against the edits so far; files drawn together."""
    import matplotlib.axes

    lines = []
    orig = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        lines.append((kwargs.get("label"), list(xs), [round(y, 6) for y in ys]))
        return orig(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_lifelong("zsre", "editor", [(10, 1.0, 0.8, 0.2), (25, 0.9, 0.7, 0.3)])))
    b.write_text(json.dumps(_lifelong("zsre", "ft-m", [(10, 0.8, 0.7, 0.1)])))
    assert cli.main(["plot", str(a), str(b), "--out", str(tmp_path / "l.png")]) == 0
    assert _png_size(tmp_path / "l.png")[0] > 5000
    assert lines[:4] == [("editor (rank 145)", [10, 25], [100.0, 90.0]), ("ft-m", [10], [80.0]),
                         ("editor (rank 145)", [10, 25], [80.0, 70.0]), ("ft-m", [10], [70.0])]
    assert lines[4] == ("editor (rank 145)", [10, 25], [0.2, 0.3])
    runs = tmp_path / "r.json"
    runs.write_text(json.dumps({"runs": [{"method": "kne", "data": "d", "summary": {"n": 1, "edit_succ": 1.0}}]}))
    with pytest.raises(ValueError, match="only lifelong results are drawn together"):
        kne.plots.plot_file(a, tmp_path / "x.png", [runs])
    with pytest.raises(ValueError, match="several files are drawn together only for lifelong"):
        kne.plots.plot_file(runs, tmp_path / "x.png", [a])
