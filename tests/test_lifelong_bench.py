"""benchmarks/quality/lifelong.py --state: a sequence cut at a checkpoint and gone on with in another
call scores what the uninterrupted sequence scores, and a state folder refuses what it cannot go on
with."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _lifelong():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "lifelong.py"
    spec = importlib.util.spec_from_file_location("lifelong_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _points(path):
    doc = json.loads(Path(path).read_text())
    return {r["method"]: r for r in doc["runs"]}


def _same(a, b):
    """Two checkpoints score the same (the measures, not the seconds or the memory)."""
    assert a["edits"] == b["edits"]
    for k, v in a["summary"].items():
        w = b["summary"][k]
        if isinstance(v, float):
            assert w == pytest.approx(v, abs=1e-4), k
        else:
            assert w == v, k
    assert b["drift"] == pytest.approx(a["drift"], abs=1e-4)
    for f in ("rewrite_acc", "locality"):  # every edit's own scores, oldest first
        assert len(b["by_edit"][f]) == b["edits"]
        assert b["by_edit"][f] == pytest.approx(a["by_edit"][f], abs=1e-4), f
    assert b["failures"] == a["failures"]


def test_a_sequence_goes_on_from_its_state_as_if_never_cut(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lifelong = _lifelong()
    common = ["--data", "zsre", "--method", "editor", "ft-m", "--drift-sequences", "2", "--quiet"]
    whole = tmp_path / "whole.json"
    assert lifelong.main(common + ["--checkpoints", "1,3", "--out", str(whole)]) == 0
    state = tmp_path / "state"
    first = tmp_path / "first.json"
    assert lifelong.main(common + ["--checkpoints", "1", "--state", str(state), "--out", str(first)]) == 0
    for m in ("editor", "ft-m"):
        run = json.loads((state / m / "run.json").read_text())
        assert run["done"] == 1 and [p.name for p in (state / m).glob("ckpt-*")] == [run["checkpoint"]]
    assert (state / "ft-m" / "ckpt-1" / "weights.safetensors").is_file()
    assert (state / "editor" / "ckpt-1" / "HEAD").is_file()
    rest = tmp_path / "rest.json"
    assert lifelong.main(common + ["--checkpoints", "1,3", "--state", str(state), "--out", str(rest)]) == 0
    a, b = _points(whole), _points(rest)
    for m in ("editor", "ft-m"):
        assert [p["edits"] for p in b[m]["points"]] == [1, 3]
        for p, q in zip(a[m]["points"], b[m]["points"]):
            _same(p, q)
        assert b[m]["indices"] == a[m]["indices"] and len(b[m]["seconds"]) == 3
        assert len(b[m]["cpu_seconds"]) == 3 and all(c > 0 for c in b[m]["cpu_seconds"])
        assert [s["from_edit"] for s in b[m]["segments"]] == [0, 1]
    # the state went on to the new checkpoint, and only it is kept
    assert sorted(p.name for p in (state / "editor").glob("ckpt-*")) == ["ckpt-3"]

    # refusals: nothing to add, other settings, a state changed by hand
    with pytest.raises(SystemExit, match="already has 3 edits"):
        lifelong.main(common + ["--checkpoints", "3", "--state", str(state), "--out", str(rest)])
    with pytest.raises(SystemExit, match="other settings"):
        lifelong.main(common[:1] + ["counterfact"] + common[2:] + ["--checkpoints", "4", "--state", str(state),
                                                                   "--out", str(rest)])
    (state / "ft-m" / "ckpt-3" / "weights.safetensors").unlink()
    (state / "ft-m" / "ckpt-3").rmdir()
    with pytest.raises(SystemExit, match="missing"):
        lifelong.main(["--data", "zsre", "--method", "ft-m", "--drift-sequences", "2", "--quiet",
                       "--checkpoints", "4", "--state", str(state), "--out", str(rest)])
