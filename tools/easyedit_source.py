"""What the EasyEdit table makers share: EasyEdit's functions executed from a checkout's source
text (its ``easyeditor/__init__`` pulls in dozens of packages, so the package is never imported),
and their command line (the checkout, its commit, the table to write).

Used by ``tools/make_easyedit_table.py`` and ``tools/make_easyedit_generation_table.py``.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence, Tuple


def exec_functions(root: Path, functions: Dict[str, Sequence[str]], ns: dict) -> dict:
    """Execute into ``ns`` the top-level functions ``functions[rel]`` of each source file ``rel``
    of the checkout ``root``, as they are; exits naming a file that lacks one. Returns ``ns``."""
    for rel, names in functions.items():
        tree = ast.parse((root / rel).read_text())
        found = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names}
        missing = set(names) - set(found)
        if missing:
            sys.exit(f"{root / rel} has no {sorted(missing)}: is {root} an EasyEdit checkout?")
        for name in names:
            exec(compile(ast.Module(body=[found[name]], type_ignores=[]), str(root / rel), "exec"), ns)
    return ns


def checkout_args(doc: str, default_out: Path) -> Tuple[argparse.Namespace, str]:
    """``(arguments, commit)``: the EasyEdit checkout, ``--commit`` (default: the checkout's HEAD,
    ``"unknown"`` outside git) and ``--out``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("easyedit", type=Path, help="an EasyEdit checkout (https://github.com/zjunlp/EasyEdit)")
    ap.add_argument("--commit", default=None, help="its commit (default: git rev-parse HEAD in the checkout)")
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    commit = args.commit or subprocess.run(["git", "-C", str(args.easyedit), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or "unknown"
    return args, commit
