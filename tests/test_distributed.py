"""Data-parallel evaluation: `kne eval` under torchrun (2 processes, gloo) equals one process."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import kne.runs
from kne import cli

SAME = ("index", "prompt", "rewrite_acc", "rephrase_acc", "portability", "locality", "fluency", "steps", "final_loss")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(embedded, tmp_path, capsys):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun (installed with torch) not found"
    common = ["eval", "--data", "zsre", "--limit", "5", "--method", "kne", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(_free_port()), "-m", "kne", *common, "--out", str(tmp_path / "dp.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| data | method |") == 1  # only rank 0 prints the table
    assert cli.main([*common, "--out", str(tmp_path / "one.json")]) == 0
    dp, one = json.loads((tmp_path / "dp.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert dp["processes"] == 2 and one["processes"] == 1
    assert [r["index"] for r in dp["records"]] == list(range(5))
    for a, b in zip(dp["records"], one["records"]):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert dp["summary"] == one["summary"]
    assert dp["failures"] == one["failures"] == []


def test_sequential_protocol_refuses_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(kne.runs, "distributed", lambda: (0, 2))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"prompt": "a", "target_new": "b"}]))
    assert cli.main(["eval", "--data", str(data), "--protocol", "sequential"]) == 2
    assert "cannot be split across processes" in capsys.readouterr().err
