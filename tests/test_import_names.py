"""No module or package that pytest puts on ``sys.path`` may take the name of an installed
distribution's import package.

pytest (``rootdir``-based "prepend" import mode) puts the first folder above each test file that
has no ``__init__.py`` at the front of ``sys.path``: ``tests/`` for ``tests/ops/test_*.py`` and
``tests/test_*.py``, ``benchmarks/`` for the benchmark tests. Every module and package in such a
folder then hides an installed one of the same name: a test package once named ``kernels`` hid
Hugging Face's ``kernels`` distribution, and every model load under pytest failed in
``transformers.integrations.hub_kernels`` (transformers 5.25).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Dict, Iterable, List, Mapping

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}


def _sys_path_folders(root: Path) -> List[Path]:
    """The folders pytest prepends to ``sys.path`` for the test files (and conftests) under ``root``."""
    folders = set()
    for path in root.rglob("*.py"):
        if SKIP & set(path.relative_to(root).parts):
            continue
        if not (path.name.startswith("test_") or path.name == "conftest.py"):
            continue
        base = path.parent
        while (base / "__init__.py").is_file():
            base = base.parent
        folders.add(base)
    return sorted(folders)


def _import_names(folder: Path) -> Iterable[str]:
    """Top-level names importable from ``folder``: modules and regular packages."""
    for child in sorted(folder.iterdir()):
        if child.suffix == ".py":
            yield child.stem
        elif child.is_dir() and (child / "__init__.py").is_file():
            yield child.name


def shadowing(root: Path, distributions: Mapping[str, List[str]]) -> Dict[str, str]:
    """``{"folder/name": "distribution(s)"}`` for every test-path name that an installed
    distribution also provides (``distributions``: ``importlib.metadata.packages_distributions()``)."""
    clashes = {}
    for folder in _sys_path_folders(root):
        for name in _import_names(folder):
            if name in distributions and name != "conftest":
                clashes[f"{folder.relative_to(root)}/{name}"] = ", ".join(sorted(set(distributions[name])))
    return clashes


def test_no_test_module_shadows_an_installed_distribution():
    clashes = shadowing(ROOT, importlib.metadata.packages_distributions())
    assert not clashes, ("these names, on sys.path under pytest, hide installed distributions' import packages "
                         f"(rename them): {clashes}")


def test_the_check_finds_a_clash(tmp_path):
    (tmp_path / "tests" / "kernels").mkdir(parents=True)
    (tmp_path / "tests" / "kernels" / "__init__.py").write_text("")
    (tmp_path / "tests" / "kernels" / "test_a.py").write_text("")
    (tmp_path / "tests" / "test_b.py").write_text("")
    (tmp_path / "tests" / "helpers.py").write_text("")
    (tmp_path / "tests" / "data").mkdir()  # no __init__: a namespace folder hides no regular package
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "test_c.py").write_text("")
    (tmp_path / "bench" / "numpy.py").write_text("")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "test_d.py").write_text("")
    dists = {"kernels": ["kernels"], "numpy": ["numpy"], "data": ["somedata"], "lib": ["lib"],
             "test_b": ["odd-dist", "odd-dist"]}
    assert shadowing(tmp_path, dists) == {"tests/kernels": "kernels", "bench/numpy": "numpy", "tests/test_b": "odd-dist"}
    assert shadowing(tmp_path, {"ops": ["x"]}) == {}
