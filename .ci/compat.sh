#!/usr/bin/env bash
# Compatibility job: the GPU machine's stack on this CPU machine, and the lowest versions the
# package declares.
#
#   bash .ci/compat.sh          (make compat)
#
# A venv of its own (build/compat-venv; reused when it already holds the versions below) with
# Python 3.12 (as the GPU machine; python3 when no 3.12 is found), torch 2.11.0 (the registry
# serves the cu130 build: its CUDA libraries come from the wheels on this machine's disk, installed
# without dependency resolution so nothing else is downloaded), triton 3.6.0, transformers 5.17.0,
# accelerate 1.15.0 and numpy 2.0.2 (the lowest bounds of pyproject.toml). Then, in a copy of the
# sources (build/compat-src; the checkout's own build stays untouched):
#   1. pip install --no-deps --no-build-isolation -e . with FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0:
#      the C++ extension, CPU and CUDA kernels, built against torch 2.11 and nvcc as the GPU check
#      builds it (no GPU needed to compile; the CPU kernels are then tested);
#   2. bash -n .ci/gpu_check.sh and python .ci/gpu_check.py --check-imports (the GPU
#      check's Python parts import and build their inputs under this stack);
#   3. the fast tests (-m "not slow": everything but the embedded-model tests), the Triton kernels
#      through Triton's interpreter among them (numpy 2.0.2: Triton 3.6's interpreter fails with
#      numpy 2.4; the numpy-exact percentile tests skip below numpy 2.4.1, saying why).
#
# Environment: KNE_COMPAT_VENV (default build/compat-venv), KNE_COMPAT_PYTHON (the interpreter),
# MAX_JOBS (default 2), KNE_COMPAT_PYTEST (extra pytest arguments, e.g. "-x").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
. .ci/lib.sh
step() { printf '\n== %s (t=%ds)\n' "$*" $((SECONDS - START)); }

VENV=${KNE_COMPAT_VENV:-build/compat-venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
SRC=$ROOT/build/compat-src
# The stack of the GPU machine (numpy: the lowest bound; the GPU machine has 2.5).
TORCH=2.11.0 TRITON=3.6.0 TRANSFORMERS=5.17.0 ACCELERATE=1.15.0 NUMPY=2.0.2
# torch 2.11's CUDA libraries, from this machine's disk (newer minor releases of the same sonames).
NVIDIA_WHEELS=(/opt/pypi-more/files/nvidia_{cublas,cudnn_cu13,cufft,cufile,curand,cusparse,cusparselt_cu13,nccl_cu13,nvshmem_cu13,nvjitlink,cuda_cupti,cuda_nvrtc}-*.whl /opt/pypi/files/nvidia_cuda_runtime-*.whl)

find_python() {
  if [ -n "${KNE_COMPAT_PYTHON:-}" ]; then echo "$KNE_COMPAT_PYTHON"; return; fi
  for c in python3.12 "$(pyenv root 2>/dev/null)/versions/3.12"*/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$c"; return
    fi
  done
  echo "compat: no Python 3.12 found (set KNE_COMPAT_PYTHON); using python3" >&2
  command -v python3
}

PY=$VENV/bin/python
venv_ok() {
  [ -x "$PY" ] && "$PY" - "$TORCH" "$TRITON" "$TRANSFORMERS" "$ACCELERATE" "$NUMPY" <<'EOF' 2>/dev/null
import importlib.metadata as md
import sys
want = dict(zip(("torch", "triton", "transformers", "accelerate", "numpy"), sys.argv[1:]))
for name, v in want.items():
    if md.version(name).split("+")[0] != v:
        sys.exit(1)
for name in ("pytest", "ninja", "setuptools", "nltk", "gguf", "tqdm", "safetensors", "psutil"):
    md.version(name)
import torch  # noqa: F401  (the CUDA libraries load)
EOF
}

step "venv ${VENV#$ROOT/}: Python 3.12, torch $TORCH, triton $TRITON, transformers $TRANSFORMERS, accelerate $ACCELERATE, numpy $NUMPY"
if venv_ok; then
  echo "reusing it"
else
  rm -rf "$VENV"
  "$(find_python)" -m venv "$VENV"
  for w in "${NVIDIA_WHEELS[@]}"; do [ -f "$w" ] || { echo "compat: $w is missing" >&2; exit 1; }; done
  # 1. no dependency resolution: torch 2.11 pins CUDA wheels of other releases than those on disk,
  #    and accelerate (which requires torch) would make pip resolve those pins.
  "$PY" -m pip install -q --no-deps "torch==$TORCH" "accelerate==$ACCELERATE" "${NVIDIA_WHEELS[@]}"
  # 2. the rest, resolved (none of these requires torch): torch's own pure-Python dependencies,
  #    accelerate's, kne's, the build tools and pytest.
  "$PY" -m pip install -q "triton==$TRITON" "transformers==$TRANSFORMERS" "numpy==$NUMPY" \
    "safetensors>=0.8" "tqdm>=4.70" "nltk>=3.10" "gguf>=0.19" typing_extensions sympy networkx jinja2 fsspec \
    filelock psutil pyyaml packaging "setuptools>=77,<82" wheel ninja pytest 2>&1 \
    | grep -v "requires nvidia-\|requires cuda-\|dependency conflicts\|^WARNING: Location" || true
  venv_ok || { echo "compat: $VENV does not hold the stack after installing it" >&2; exit 1; }
fi
versions "$PY"

step "copy the sources to ${SRC#$ROOT/}"
copy_sources "$SRC"

step "build against torch $TORCH: pip install --no-deps --no-build-isolation -e . (CPU + CUDA sm_90, MAX_JOBS=${MAX_JOBS:-2})"
BUILD_START=$SECONDS
(cd "$SRC" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true)
echo "build: $((SECONDS - BUILD_START)) s"
check_extension "$PY" "$SRC" CUDA

step "the GPU check's parts: bash -n, and its Python parts import under this stack"
bash -n "$SRC/.ci/gpu_check.sh"
(cd "$SRC" && "$PY" .ci/gpu_check.py --check-imports)

step "fast tests (-m 'not slow') with torch $TORCH, Triton $TRITON interpreter"
(cd "$SRC" && OMP_NUM_THREADS=1 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider ${KNE_COMPAT_PYTEST:-})

step "compat: OK in $((SECONDS - START)) s"
