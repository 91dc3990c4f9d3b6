"""Command-line mistakes end in one line on stderr and an exit code, never a traceback; the ones
that can be seen before the model loads are caught before it loads (so no edit runs only to fail
at saving its result)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kne
from kne import cli

EDIT = ["edit", "--prompt", "The capital of France is", "--target", "Rome"]


@pytest.fixture
def no_model(monkeypatch):
    """The model must not load: a call means the mistake was found too late."""

    def boom(*a, **k):
        raise AssertionError("kne.load_model was called: the mistake should have been caught before")

    monkeypatch.setattr(kne, "load_model", boom)


def _one_line(capsys, rc, want_rc, *patterns):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == want_rc, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def test_missing_model_path(tmp_path, capsys):
    rc = cli.main(EDIT + ["--model", str(tmp_path / "no-such-model")])
    _one_line(capsys, rc, 2, "kne edit: error: model folder", "no-such-model' does not exist")


def test_model_folder_without_a_model(tmp_path, capsys):
    rc = cli.main(EDIT + ["--model", str(tmp_path)])
    _one_line(capsys, rc, 2, "is a folder but holds no model (no config.json)")


def test_model_folder_without_a_tokenizer(tmp_path, capsys, tiny_model):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    capsys.readouterr()  # save_pretrained's own progress bar (transformers 5.25) is not the CLI's output
    rc = cli.main(EDIT + ["--model", str(tmp_path / "m")])
    _one_line(capsys, rc, 2, "holds a model but no tokenizer kne can load", "tokenizer.save_pretrained")


def test_model_file_instead_of_folder(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    rc = cli.main(EDIT + ["--model", str(f)])
    _one_line(capsys, rc, 2, "is a file: give the folder that holds the model")


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_must_be_positive(threads, capsys, no_model):
    rc = cli.main(EDIT + ["--threads", threads])
    _one_line(capsys, rc, 2, f"--threads must be a positive number of threads, got {threads}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu(capsys, no_model):
    rc = cli.main(EDIT + ["--device", "cuda"])
    _one_line(capsys, rc, 2, "--device cuda: torch", "sees no CUDA device", "use --device cpu")


def test_device_that_is_no_device(capsys, no_model):
    rc = cli.main(EDIT + ["--device", "banana"])
    _one_line(capsys, rc, 2, "--device 'banana' is not a device")


def test_ensemble_directory(tmp_path, capsys, no_model):
    rc = cli.main(EDIT + ["--ensemble", str(tmp_path)])
    _one_line(capsys, rc, 2, "--ensemble", "is a directory; give the ensemble JSON file")
    rc = cli.main(EDIT + ["--ensemble", str(tmp_path / "none.json")])
    _one_line(capsys, rc, 2, "none.json: the file does not exist")


def test_ensemble_file_that_is_not_json(tmp_path, capsys, no_model):
    bad = tmp_path / "e.json"
    bad.write_text("{oops")
    rc = cli.main(EDIT + ["--ensemble", str(bad)])
    _one_line(capsys, rc, 2, "e.json: not an ensemble JSON file")


def test_plot_directory_missing_file_and_bad_json(tmp_path, capsys):
    _one_line(capsys, cli.main(["plot", str(tmp_path)]), 2, "kne plot: error:", "is a directory")
    _one_line(capsys, cli.main(["plot", str(tmp_path / "x.json")]), 2, "x.json' does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text("[1,")
    _one_line(capsys, cli.main(["plot", str(bad)]), 2, "bad.json: not a JSON file")
    good = tmp_path / "ens.json"
    good.write_text(json.dumps({"mlp.down_proj": {"0": [1]}}))
    _one_line(capsys, cli.main(["plot", str(good), "-o", str(tmp_path / "no" / "p.png")]), 2, "does not exist")


def test_save_to_a_directory_is_refused_before_the_edit(tmp_path, capsys, no_model):
    rc = cli.main(EDIT + ["--save", str(tmp_path)])
    _one_line(capsys, rc, 2, "--save", "is a directory; give a file name")
    f = tmp_path / "file"
    f.write_text("")
    rc = cli.main(EDIT + ["--save", str(f / "edit.safetensors")])
    _one_line(capsys, rc, 2, "is not a folder")
    rc = cli.main(EDIT + ["--save-model", str(f)])
    _one_line(capsys, rc, 2, "--save-model", "is a file")


@pytest.mark.parametrize("flag", ["--out", "--table"])
def test_eval_output_into_a_missing_folder_is_refused_before_any_edit(flag, tmp_path, capsys, no_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"prompt": "a b", "target_new": "c"}]))
    rc = cli.main(["eval", "--data", str(data), flag, str(tmp_path / "missing" / "r.json")])
    _one_line(capsys, rc, 2, f"kne eval: error: {flag}", "missing' does not exist; create it first")
    rc = cli.main(["eval", "--data", str(data), flag, str(tmp_path)])
    _one_line(capsys, rc, 2, "is a directory")


def test_eval_on_no_records_is_an_error(tmp_path, capsys, no_model):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    rc = cli.main(["eval", "--data", str(empty)])
    _one_line(capsys, rc, 2, "empty.json: no records to evaluate (the file holds none)")
    two = tmp_path / "two.json"
    two.write_text(json.dumps([{"prompt": "a b", "target_new": "c"}] * 2))
    rc = cli.main(["eval", "--data", str(two), "--skip", "5"])
    _one_line(capsys, rc, 2, "two.json: no records to evaluate (it holds 2; skipping 5 leaves none)")
    rc = cli.main(["eval", "--data", str(two), "--limit", "0"])
    _one_line(capsys, rc, 2, "--limit must be >= 1, got 0")


def test_ctrl_c_while_the_model_loads(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kne, "load_model", interrupted)
    rc = cli.main(EDIT)
    _one_line(capsys, rc, 130, "kne edit: interrupted during start-up; nothing was written")


def test_ctrl_c_while_torch_is_imported_in_a_fresh_process(tmp_path):
    """A real SIGINT while `import torch` runs, in a process where nothing is imported yet: kne
    0.2.0 imported torch when the package itself was imported, before main() had a handler."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import builtins, os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
        real = builtins.__import__
        def hooked(name, *args, **kwargs):
            if name == "torch" and "torch" not in sys.modules:
                builtins.__import__ = real
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while torch loads
            return real(name, *args, **kwargs)
        builtins.__import__ = hooked
        from kne.cli import main
        sys.exit(main(["edit", "--prompt", "a", "--target", "b"]))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 130, out.stderr[-2000:]
    assert lines == ["kne edit: interrupted during start-up; nothing was written"], out.stderr[-2000:]


def test_errors_are_one_line_even_when_the_message_is_not(capsys, monkeypatch):
    def multi(*a, **k):
        raise RuntimeError("first line\n  second line\n")

    monkeypatch.setattr(kne, "load_model", multi)
    rc = cli.main(EDIT)
    _one_line(capsys, rc, 2, "kne edit: error: first line second line")


def test_an_unknown_model_name_fails_offline_at_once(capsys, no_model, monkeypatch):
    import socket
    import time

    def no_network(*a, **k):
        raise AssertionError("the network was asked")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    t = time.perf_counter()
    rc = cli.main(EDIT + ["--model", "smollm2-13m"])
    took = time.perf_counter() - t
    _one_line(capsys, rc, 2, "kne edit: error: unknown model 'smollm2-13m': did you mean 'smollm2-135m'?",
              "the embedded models are 'smollm2-135m'", "a hub id 'org/name'")
    assert took < 1.0, took
    rc = cli.main(["eval", "--data", "zsre", "--model", "llama-7b"])
    _one_line(capsys, rc, 2, "unknown model 'llama-7b': the embedded models are 'smollm2-135m'")
    with pytest.raises(ValueError, match="did you mean 'smollm2-135m'"):
        kne.models.check_source("SmolLM2-135")


def test_cli_warnings_are_one_line_in_the_command_lines_terms(tmp_path, capsys, tiny_model, tok):
    """kne's warnings print as 'kne <command>: warning: ...' with the CLI's flags (--subject), not as
    Python UserWarnings with a source line and Python's keyword arguments (subject=)."""
    m = tmp_path / "m"
    tiny_model("llama").save_pretrained(m)
    tok.save_pretrained(m)
    capsys.readouterr()
    rc = cli.main(EDIT + ["--model", str(m), "--steps", "1", "--percentile", "90"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "preset  local with percentile=90.0, steps=1" in captured.out
    warns = [ln for ln in captured.err.splitlines() if "warning" in ln.lower()]
    assert len(warns) == 1, captured.err
    assert warns[0].startswith("kne edit: warning: request 'The capital of France is' has no subject:"), warns[0]
    assert warns[0].endswith("give --subject") and "subject=" not in warns[0] and "cli.py" not in captured.err


def test_eval_warns_only_of_the_records_it_reads(tmp_path):
    """The published files' answerless probes are named only for the records --skip/--limit select."""
    recs = [{"prompt": f"p{i} is", "target_new": "x",
             "locality": {"L": [{"prompt": "q is", "ground_truth": "" if i in (1, 4) else "y"}]}} for i in range(6)]
    f = tmp_path / "recs.json"
    f.write_text(json.dumps(recs))
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert len(kne.load_knowedit(f, limit=1)) == 1
        assert [r.prompt for r in kne.load_knowedit(f, skip=2, limit=2)] == ["p2 is", "p3 is"]
    assert not w, [str(x.message) for x in w]
    with pytest.warns(kne._warn.KNEWarning, match=r"recs.json: 1 probe\(s\) without any answer were left out: "
                                                   r"record 4 locality"):
        assert len(kne.load_knowedit(f, skip=3)) == 3


BAD_RESULTS = {
    "runs holding a string": ({"runs": "x"}, "field runs must be a non-empty list of runs, got str"),
    "runs holding an int": ({"runs": 3}, "field runs must be a non-empty list of runs, got int"),
    "a metric that is a list": (("records", "rewrite_acc", [1, 2]), r"field runs[0].records[0].rewrite_acc must be a number"),
    "locality holding a string": (("records", "locality", "high"), r"field runs[0].records[0].locality must be a number"),
    "summary an int": ({"method": "a", "data": "d", "protocol": "p", "summary": 3}, "field summary must be an object"),
    "a summary value that is a list": (("summary", "locality", [0.5]), "field runs[0].summary.locality must be a number"),
    "a NaN record value": (("records", "portability", {"x": float("nan")}), "runs[0].records[0].portability.x is nan"),
}


@pytest.mark.parametrize("case", list(BAD_RESULTS))
@pytest.mark.parametrize("command", ["compare", "plot"])
def test_wrongly_shaped_results_json_is_one_line_naming_the_field(case, command, tmp_path, capsys):
    """kne compare / kne plot on a results JSON of the wrong shape: one line naming the bad field
    (before, a traceback, or for NaN a '+nan *' difference marked significant with exit status 0)."""
    import copy

    results = ROOT_RESULTS
    spec, want = BAD_RESULTS[case]
    if isinstance(spec, tuple):
        payload = copy.deepcopy(json.loads(results.read_text()))
        where, key, value = spec
        run = payload["runs"][0]
        (run["records"][0] if where == "records" else run["summary"])[key] = value
    else:
        payload = spec
    f = tmp_path / "r.json"
    f.write_text(json.dumps(payload))
    args = (["compare", str(f), "--a-method", "kne (authors)", "--b-method", "ft-m", "--boots", "50"]
            if command == "compare" else ["plot", str(f), "-o", str(tmp_path / "r.png")])
    rc = cli.main(args)
    line = _one_line(capsys, rc, 2, f"kne {command}: error: {f}: ")
    assert want in line, (want, line)


ROOT_RESULTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "results" / \
    "quality_independent.json"
