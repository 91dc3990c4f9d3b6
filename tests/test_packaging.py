"""What a user outside this checkout gets: every package and data file in the wheel, no reads of a
folder beside the repository, imports without the optional extras, benchmark output in the
current folder, and the GPU check's refusal on a machine without a GPU.

(The wheel itself is built and used outside the repository by ``make wheel-check``.)
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _text_files(*folders):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (
                    ".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".json", ".yaml", ".yml", ".cpp", ".h"):
                yield path


def test_no_code_or_test_reads_the_shared_folder():
    # Built from parts so that this file does not match itself.
    parent = re.escape("..") + "/" + "shared"
    pattern = re.compile("|".join([parent, "/work/" + "shared", "KNE_" + "SHARED",
                                   r"parents\[\d\]\s*/\s*['\"]" + "shared" + "['\"]",
                                   r"['\"]\.\.['\"]\)\s*/\s*['\"]" + "shared" + "['\"]"]))
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in _text_files("python", "kne_kernels", "tests")
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, "code or tests reach for the shared folder beside the repository (users do not have it):\n" + \
        "\n".join(hits)


def _setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (run with KNE_NO_EXT=1, setup() captured)."""
    code = ("import json, setuptools, sys\n"
            "captured = {}\n"
            "setuptools.setup = lambda **kw: captured.update(kw)\n"
            "sys.argv = ['setup.py']\n"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})\n"
            "print(json.dumps({k: captured[k] for k in ('packages', 'package_dir', 'package_data')}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, KNE_NO_EXT="1"), check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_setup_ships_every_package_and_data_file():
    kw = _setup_kwargs()
    want = set()
    for top, src in (("kne", ROOT / "python" / "kne"), ("kne_kernels", ROOT / "kne_kernels")):
        for d in [src] + [p for p in src.rglob("*") if p.is_dir() and "__pycache__" not in p.parts]:
            if top == "kne" and d.is_relative_to(src / "data"):  # data folders: packages without modules
                want.add(".".join((top,) + d.relative_to(src).parts))
            elif any(d.glob("*.py")):
                assert (d / "__init__.py").is_file(), f"{d.relative_to(ROOT)} holds modules but no __init__.py: " \
                                                      "find_packages would leave it out of the wheel"
                want.add(".".join((top,) + d.relative_to(src).parts))
    assert "kne.integrations" in want
    assert set(kw["packages"]) == want
    data = ROOT / "python" / "kne" / "data"
    files = [p.relative_to(ROOT / "python" / "kne").as_posix() for p in data.rglob("*") if p.is_file()]
    assert files, "no data files under python/kne/data"
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in kw["package_data"]["kne"])]
    assert not unshipped, f"package_data leaves {unshipped} out of the wheel"


_BLOCKED = ("matplotlib", "nltk", "gguf", "triton")


def test_core_imports_without_the_optional_packages():
    """What the GPU machine lacks (matplotlib, nltk, gguf) or an install without the triton extra:
    every other module imports, and the features that need them name the extra."""
    code = f"""
import importlib, pkgutil, sys
for name in {_BLOCKED!r}:
    sys.modules[name] = None  # import name -> ImportError
import kne, kne_kernels
done = []
for top in (kne, kne_kernels):
    for m in pkgutil.walk_packages(top.__path__, prefix=top.__name__ + "."):
        if m.name.endswith(("__main__", "._C")) or m.name.startswith("kne_kernels.triton."):
            continue
        importlib.import_module(m.name)
        done.append(m.name)
assert "kne.integrations.easyedit" in done and "kne.cli" in done, done
from kne_kernels import _backends
live, why = _backends.status("triton", "cuda")
assert not live and "kne[triton]" in why, why
try:
    kne.plots._plt()
except kne._extras.MissingDependency as e:
    assert "kne[plots]" in str(e), e
else:
    raise AssertionError("plots without matplotlib")
from kne.evaluation import ngram_entropy
assert ngram_entropy("a b a b") > 0  # the fallback word splitter without nltk
print(len(done))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) > 20


def test_kernel_benchmark_writes_to_the_current_folder(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.iterdir()}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed" / "bench_kernels.py"), "--quick", "--no-huge",
                           "--threads", "1", "--repeats", "1"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "kernels_cpu.csv").is_file() and (tmp_path / "kernels_cpu.txt").is_file()
    assert "neuron_attribution" in (tmp_path / "kernels_cpu.txt").read_text()
    assert sorted(os.listdir(tmp_path)) == ["kernels_cpu.csv", "kernels_cpu.txt"]  # no temporary file left
    with open(tmp_path / "kernels_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["op"] for r in rows), rows[:2]
    assert {p: p.stat().st_mtime_ns for p in results.iterdir()} == before, "the benchmark wrote into the repository"


def test_gpu_check_without_a_gpu_fails_at_once_with_the_reason(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is present: this machine may have a GPU, so the no-GPU refusal does not apply")
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "gpu_check.sh")]).returncode == 0
    t = time.perf_counter()
    proc = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OUT=str(tmp_path)))
    elapsed = time.perf_counter() - t
    assert proc.returncode != 0
    first = (proc.stderr + proc.stdout).strip().splitlines()[0]
    assert first.startswith("gpu-check: no GPU here"), first
    assert elapsed < 10, f"took {elapsed:.1f} s: it must fail before doing anything"
    assert not any(tmp_path.iterdir()), "it wrote results without a GPU"


def test_a_build_without_torch_is_one_message_saying_what_to_run():
    """setup.py compiles against the torch already installed: without one (pip's isolated build
    environment has none) it says what to run, in one line, not a ModuleNotFoundError traceback."""
    code = ("import runpy, sys\n"
            "sys.modules['torch'] = None  # import torch raises ImportError, as where none is installed\n"
            "sys.argv = ['setup.py', '--name']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "KNE_NO_EXT"})
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("kne: the C++ extension builds against the torch already installed, and there is "
                               "none: install torch first"), lines[0]
    assert "pip install --no-build-isolation ." in lines[0] and "KNE_NO_EXT=1" in lines[0]


def test_a_wheel_build_writes_nothing_into_the_source_tree(tmp_path):
    """pip wheel of a checkout leaves it as it was: setuptools' build/ and kne.egg-info/ go to a
    temporary folder (the C++ build itself is checked by make wheel-check; here KNE_NO_EXT=1)."""
    src = tmp_path / "src"  # the sources, without what a build or a checkout's tools leave beside them
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "__pycache__", "*.so",
                                                             "*.egg-info", ".pytest_cache", ".hypothesis", ".benchmarks"))
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                         env=dict(os.environ, KNE_NO_EXT="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list((tmp_path / "dist").glob("kne-*.whl"))) == 1
    after = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    assert after == before, sorted(set(after) ^ set(before))


def test_the_lock_satisfies_pyproject_ranges():
    """requirements/lock-cpu.txt pins every requirement of pyproject.toml (and make's torch and model
    package) inside its range: a range changed without `make lock` fails here."""
    run = subprocess.run([sys.executable, "tools/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import lock
    finally:
        sys.path.remove(str(ROOT / "tools"))
    bad = ROOT / "requirements" / "lock-cpu.txt"
    text = bad.read_text(encoding="utf-8").replace("\ntransformers==", "\n# transformers==")
    other = Path(os.environ.get("TMPDIR", "/tmp")) / f"kne-lock-{os.getpid()}.txt"
    other.write_text(text.replace("numpy==", "numpy==1.26.0  # was "), encoding="utf-8")
    try:
        problems = lock.check(other, "torch==2.13.0")
    finally:
        other.unlink()
    assert "transformers is not in the lock" in problems
    assert any(p.startswith("numpy==1.26.0 is outside") for p in problems), problems
