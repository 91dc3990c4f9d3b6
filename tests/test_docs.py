"""The docs match the code and the results: rendered tables equal their results files, every link
and cited file exists, every results file is indexed and cited, the README stays a guide, and
every fenced Python block of README.md and docs/ runs as written (or is marked as needing a GPU
or EasyEdit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), RESULTS / "README.md"]
FENCE = re.compile(r"(?:<!-- needs: ([\w, ]+) -->\n)?```python\n(.*?)```", re.S)
NEEDS = {"gpu", "easyedit"}


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def test_rendered_tables_are_the_results_files():
    run = subprocess.run([sys.executable, "tools/render_docs.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr


def test_the_renderer_notices_a_changed_cell(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import render_docs
    finally:
        sys.path.remove(str(ROOT / "tools"))
    page = (ROOT / "README.md").read_text(encoding="utf-8")
    new, changed = render_docs.render_page(page, "README.md")
    assert new == page and changed == []
    tampered = page.replace("| 0.142 |", "| 0.143 |", 1)
    assert tampered != page
    new, changed = render_docs.render_page(tampered, "README.md")
    assert changed == ["quality-headline"] and new == page


def test_every_relative_link_and_cited_path_exists():
    """Markdown links ([x](path)), images, and backticked repository paths (`benchmarks/...`,
    `tools/...`) in README.md and docs/ name files that exist."""
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#") or target == "...":
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{_rel(page)}: link {target}")
        for cited in re.findall(r"`((?:benchmarks|tools|tests|docs|requirements|python|kne_kernels|csrc|\.ci)/[^`\s]+)`",
                                text):
            if any(c in cited for c in "<>{}*"):  # a pattern (tests/ops/test_<op>.py), not a path
                continue
            cited = cited.rstrip(".,:;")
            if "::" in cited:
                cited = cited.split("::")[0]
            if not (ROOT / cited).exists():
                missing.append(f"{_rel(page)}: path {cited}")
    assert not missing, "\n".join(missing)


def test_every_results_file_is_indexed_and_cited():
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    docs = "\n".join(p.read_text(encoding="utf-8") for p in PAGES if p != RESULTS / "README.md")
    files = sorted(p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md")
    unindexed = [f for f in files if f"`{f}`" not in index]
    assert not unindexed, f"benchmarks/results/README.md does not list {unindexed}"
    listed = set(re.findall(r"`([\w.-]+\.(?:json|csv|txt|png))`", index))
    assert listed <= set(files), f"the index lists files that do not exist: {sorted(listed - set(files))}"
    for row in index.splitlines():
        if not row.startswith("| `"):
            continue
        names = re.findall(r"`([\w.-]+\.(?:json|csv|txt|png))`", row.split("|")[1])
        for link in re.findall(r"\]\(([^)]+)\)", row.split("|")[-2]):
            page = (RESULTS / link).resolve()
            text = page.read_text(encoding="utf-8")
            assert any(n in text for n in names), f"{_rel(page)} is said to cite {names} and does not"
    uncited = [f for f in files if f not in docs]
    assert not uncited, f"no page cites {uncited}: cite them or delete them"


def test_the_readme_is_a_guide():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400
    for page in PAGES:
        hits = re.findall(r"(?i)\b(lease|lent|sessions? (?:that|which)|other jobs|timeout_s|carry:)\b", page.read_text(encoding="utf-8"))
        assert not hits, f"{_rel(page)} speaks of the conditions it was written under: {hits}"


def _blocks():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for i, m in enumerate(FENCE.finditer(text)):
            needs = {n.strip() for n in (m.group(1) or "").split(",") if n.strip()}
            assert needs <= NEEDS, f"{_rel(page)}: unknown marker {needs - NEEDS}"
            yield pytest.param(page, m.group(2), needs, id=f"{_rel(page)}-{i}")


@pytest.mark.slow
@pytest.mark.parametrize("page,code,needs", list(_blocks()))
def test_every_python_block_runs_as_written(page, code, needs, tmp_path, embedded):
    """Each block runs in a fresh interpreter in an empty folder (what a reader who pastes it gets),
    with the embedded model's cache made by the session's fixture."""
    if "gpu" in needs:
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"{_rel(page)}: marked as needing a GPU, and there is none")
    if "easyedit" in needs:
        try:
            import easyeditor  # noqa: F401
        except Exception:
            pytest.skip(f"{_rel(page)}: marked as needing EasyEdit (docs/easyedit.md), which is not installed here")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, f"{_rel(page)}:\n{code}\n--- stderr ---\n{run.stderr[-3000:]}"
