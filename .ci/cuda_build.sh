#!/usr/bin/env bash
# CUDA build check (no GPU needed): builds kne_kernels._C with its CUDA kernels against a CUDA build
# of torch in a venv of its own, loads it, checks that every kne op has a CUDA (and a CPU) kernel
# registered, and prints the per-kernel register / spill / shared-memory table of ptxas for sm_80
# and sm_90 (failing if any kernel spills).
#
#   bash .ci/cuda_build.sh
#
# Nothing is installed into the main .venv and the source tree's kne_kernels/ is left alone: the
# sources (git's tracked and untracked-but-not-ignored files) are copied to build/cuda-src, built
# there in place (python setup.py build_ext --inplace; objects in build/cuda-tmp, reused by ninja
# on the next run), and the check imports kne_kernels from that copy.
#
# Environment:
#   KNE_CUDA_VENV    the venv (default build/cuda-venv; reused when it already holds the torch below)
#   KNE_CUDA_TORCH   the CUDA torch to build against (default torch==2.14.1, a cu13 build)
#   PYTHON           the interpreter that creates the venv (default python3)
#   TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2)
# nvcc must be on the PATH (setup.py takes CUDA_HOME from `nvcc --dryrun`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS

VENV=${KNE_CUDA_VENV:-build/cuda-venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
TORCH_SPEC=${KNE_CUDA_TORCH:-torch==2.14.1}
TORCH_VERSION=${TORCH_SPEC#torch==}
SRC=$ROOT/build/cuda-src
TMP=$ROOT/build/cuda-tmp
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}

step() { printf '\n== %s (t=%ds)\n' "$*" $((SECONDS - START)); }

command -v nvcc >/dev/null || { echo "cuda_build: nvcc is not on the PATH" >&2; exit 1; }

step "venv $VENV ($TORCH_SPEC)"
PY=$VENV/bin/python
venv_ok() {
  [ -x "$PY" ] && "$PY" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
import ninja, numpy, setuptools, wheel  # noqa: F401  (build and import requirements)
import torch
want = sys.argv[1]
sys.exit(0 if torch.version.cuda and torch.__version__.split("+")[0] == want else 1)
EOF
}
if venv_ok; then
  echo "reusing $VENV"
else
  rm -rf "$VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$PY" -m pip install -q "$TORCH_SPEC" numpy "setuptools>=77" wheel ninja
  venv_ok || { echo "cuda_build: $VENV does not hold a CUDA $TORCH_SPEC after installing it" >&2; exit 1; }
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

step "copy the sources to ${SRC#$ROOT/}"
rm -rf "$SRC"
mkdir -p "$SRC" "$TMP"
# cp -p keeps modification times, so ninja recompiles only what changed since the last run.
git ls-files -z --cached --others --exclude-standard -- setup.py pyproject.toml README.md csrc kne_kernels python \
  | xargs -0 -I{} sh -c 'test ! -e "$1" || cp -p --parents "$1" "$2"' _ {} "$SRC"

step "build kne_kernels._C (CPU + CUDA, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
BUILD_START=$SECONDS
(cd "$SRC" && FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace --build-temp "$TMP")
echo "build: $((SECONDS - BUILD_START)) s"

step "load the library and check the registrations"
(cd "$SRC" && "$PY" - <<'EOF'
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch

import kne_kernels  # defines the schemas and loads _C (never raises)
from kne_kernels import _extension
from kne_kernels.ops import registry

here = os.getcwd()
assert kne_kernels.__file__.startswith(here), f"imported {kne_kernels.__file__}, not the built copy under {here}"
path = _extension.library_path()
assert path and path.startswith(here), f"no built library under {here}/kne_kernels: {path}"
if not _extension.load():
    sys.exit(f"cuda_build: loading {path} failed: {_extension._STATE['error']}")
print(f"loaded {os.path.relpath(path, here)} (built info: {_extension.build_info()})")
missing = []
for name in registry():
    keys = _extension.registered_keys(name)
    print(f"  kne::{name:22s} {', '.join(keys)}")
    missing += [f"{name}:{k}" for k in ("CPU", "CUDA") if k not in keys]
if missing:
    sys.exit("cuda_build: kernels not registered: " + ", ".join(missing))
live, why = _extension.status("cuda")
print(f"status('cuda'): live={live} ({why})")
print(f"all {len(registry())} ops have CPU and CUDA kernels registered")
EOF
)

step "ptxas: registers, spills, shared memory per kernel"
"$PY" benchmarks/speed/cuda_static.py --arch 80 90 --fail-on-spill

step "cuda_build: OK"
