#!/usr/bin/env bash
# The GPU check: the GPU tests and benchmarks in one run on a machine with an NVIDIA GPU, within 8
# minutes of wall time.
#
#   bash .ci/gpu_check.sh                 (make gpu-check)
#   bash .ci/gpu_check.sh --fetch-wheels  (make gpu-wheels: on a machine with network, beforehand)
#
# The machine's own Python and packages are used (tested with Python 3.12, torch 2.11.0+cu130,
# triton 3.6.0, transformers 5.17.0, accelerate 1.15.0, numpy 2.5, nvcc 13.0; no network needed). Steps, each with a
# time limit, progress lines with timestamps:
#   0. no GPU -> exit 2 at once, the first line saying why;
#   1. the environment (versions, GPU, nvcc, tools); pytest, pytest-xdist, ninja and setuptools
#      installed from build/gpu-wheels (make gpu-wheels; copy it to the GPU machine) where missing;
#   2. pip install --no-deps --no-build-isolation -e . with KNE_NO_EXT=1: kne and kne_kernels
#      against the machine's torch, at once (a plain PYTHONPATH if pip cannot);
#   3. in the background, the C++ extension with the CUDA kernels built in place
#      (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16; about 1-1.5 min on 16 cores, measured
#      3 min with MAX_JOBS=2 for two architectures on a 2-core CPU); it must finish by t=300 s or is stopped,
#      and the check goes on with the Triton kernels alone;
#   4. meanwhile the Triton kernel tests (tests/ops -m triton_backend: every op, fp32/fp16/bf16,
#      against the torch kernel and float64; not the AOT compile, which is CI's, nor the hypothesis
#      fuzzing, whose many shapes would each compile; without pytest: gpu_check.py --selfcheck);
#   5. the CUDA C++ kernel tests (tests/ops -m cuda_backend, no fuzzing) once the extension is built;
#   6. the kernel benchmark (benchmarks/speed/bench_kernels.py --device cuda: every live GPU backend, each
#      memory-bound op's GB/s and its share of a device-to-device copy measured in the same process);
#   7. the edit benchmark on a Llama-7B-shaped bf16 model with random weights (benchmarks/speed/
#      bench_edit.py --device cuda --model llama-7b-shaped --prompt long --repeats 3: seconds per
#      edit and per step, peak GPU memory; the authors' settings and the tuned preset; against the
#      reference and FT-M where memory allows), with what time is left.
# Everything goes to $OUT if set, else benchmarks/results/gpu/: gpu_check.log, build.log,
# tests.log, kernels_cuda.csv/.txt, edit_cuda.csv/.txt, summary.md (8 files). Exit status: 0 when no
# step failed (a step skipped for time is listed as such), 1 when one did, 2 without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
BUDGET=${KNE_GPU_BUDGET:-470}        # seconds for the whole check (the limit is 480)
BUILD_DEADLINE=${KNE_GPU_BUILD_DEADLINE:-300}
WHEELS=$ROOT/build/gpu-wheels

if [ "${1:-}" = "--fetch-wheels" ]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$WHEELS" pytest pytest-xdist ninja "setuptools>=77,<82" || exit 1
  ls "$WHEELS"; du -sh "$WHEELS"
  exit 0
fi

# ---------------------------------------------------------------------------------- 0. a GPU?
PY=${PYTHON:-$(command -v python3 || command -v python)}
for d in ${CUDA_HOME:+$CUDA_HOME/bin} /usr/local/cuda/bin; do  # nvcc off the PATH: its usual homes
  command -v nvcc >/dev/null 2>&1 || { [ -x "$d/nvcc" ] && PATH=$PATH:$d; }
done
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: no GPU here (nvidia-smi not found): run it on a machine with an NVIDIA GPU (docs/performance.md, 'On a GPU')" >&2
  exit 2
fi
if ! GPUS=$(nvidia-smi -L 2>&1) || ! grep -q "^GPU " <<<"$GPUS"; then
  echo "gpu-check: no GPU here (nvidia-smi -L: ${GPUS:-nothing}): run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
if ! WHY=$("$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it")' 2>&1); then
  echo "gpu-check: a GPU is present ($(head -1 <<<"$GPUS")) but $PY cannot use it: ${WHY##*$'\n'}" >&2
  exit 2
fi

OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log TESTS=$OUT/tests.log BUILD=$OUT/build.log SUMMARY=$OUT/summary.md
: >"$LOG"; : >"$TESTS"
STEPS=()
FAILED=0
say() { printf '[%s +%3ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - START)) "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }
record() { STEPS+=("| $1 | $2 | $3 | $4 |"); [ "$2" = FAILED ] && FAILED=1; say "$1: $2 ($3 s) $4"; }
# run NAME LIMIT LOGFILE CMD...: the command under a time limit, output appended to LOGFILE
run_step() {
  local name=$1 limit=$2 logf=$3; shift 3
  if [ "$limit" -lt 15 ]; then record "$name" SKIPPED 0 "no time left"; return 1; fi
  say "$name (limit ${limit} s): $*"
  local t0=$SECONDS out
  out=$(mktemp)
  printf '\n===== %s: %s\n' "$name" "$*" >>"$logf"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out" >>"$logf"  # into the log as it comes
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then record "$name" OK $dt ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" FAILED $dt "timed out after ${limit} s (see ${logf##*/})"
  else record "$name" FAILED $dt "exit $rc (see ${logf##*/})"; fi
  tail -3 "$out" | sed 's/^/    /' | tee -a "$LOG"
  rm -f "$out"
  return $rc
}

say "gpu-check in $ROOT, results in $OUT, budget ${BUDGET} s"
# ---------------------------------------------------------------------------------- 1. environment
"$PY" .ci/gpu_check.py --env 2>&1 | tee -a "$LOG"
MISSING=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("pytest", "xdist", "ninja", "setuptools") if importlib.util.find_spec(m) is None)
      .replace("xdist", "pytest-xdist"))
EOF
)
if [ -n "$MISSING" ]; then
  if [ -d "$WHEELS" ]; then
    # into a folder of the checkout (--target), not into the machine's environment
    say "installing $MISSING from build/gpu-wheels into build/gpu-site"
    if "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$ROOT/build/gpu-site" $MISSING >>"$LOG" 2>&1; then
      export PYTHONPATH=$ROOT/build/gpu-site${PYTHONPATH:+:$PYTHONPATH} PATH=$ROOT/build/gpu-site/bin:$PATH
    else
      say "could not install $MISSING from build/gpu-wheels (see gpu_check.log)"
    fi
  else
    say "missing: $MISSING (no build/gpu-wheels: run make gpu-wheels on a machine with network and copy build/gpu-wheels here)"
  fi
fi
has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

# ---------------------------------------------------------------------------------- 2. install
T0=$SECONDS
if KNE_NO_EXT=1 timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
  record "install (pip -e, --no-deps --no-build-isolation)" OK $((SECONDS - T0)) ""
else
  # e.g. an externally managed Python (PEP 668): the source tree serves as well for this check
  export PYTHONPATH=$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  record "install (pip -e, --no-deps --no-build-isolation)" FALLBACK $((SECONDS - T0)) \
    "pip refused (see gpu_check.log): kne and kne_kernels from the source tree (PYTHONPATH)"
fi

# ---------------------------------------------------------------------------------- 3. CUDA build
BUILD_PID=
rm -f kne_kernels/_C*.so
if has setuptools && has ninja && command -v nvcc >/dev/null; then
  say "building the CUDA extension in the background (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=${MAX_JOBS:-16}) -> build.log"
  BUILD_T0=$SECONDS
  # its own process group (setsid), so that stopping it stops every compiler it started
  SETSID=$(command -v setsid || true)
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} $SETSID "$PY" setup.py build_ext --inplace \
    --build-temp build/gpu-tmp >"$BUILD" 2>&1 &
  BUILD_PID=$!
else
  echo "no build: needs setuptools, ninja (a serial build would not fit) and nvcc" >"$BUILD"
  record "CUDA extension build" SKIPPED 0 "setuptools, ninja or nvcc missing: Triton kernels only"
fi

# ---------------------------------------------------------------------------------- 4. Triton tests
# (the library being built is kept out of these processes: KNE_KERNELS_LIBRARY names no file)
NOLIB=$ROOT/build/no-library-while-building.so
# (with pytest-xdist, 6 workers share the Triton compiles; the CUDA build takes at most 9 cores)
XDIST=()
has xdist && XDIST=(-n 6)
if has pytest; then
  run_step "Triton kernel tests" $(( $(left) - 260 < 180 ? $(left) - 260 : 180 )) "$TESTS" \
    env KNE_KERNELS_LIBRARY="$NOLIB" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/ops \
    -m triton_backend -k "not test_aot_compile and not test_fuzz"  # the AOT compile is CI's (80 s)
else
  run_step "Triton kernel self-checks (no pytest)" 120 "$TESTS" \
    env KNE_KERNELS_LIBRARY="$NOLIB" "$PY" .ci/gpu_check.py --selfcheck
fi

# ---------------------------------------------------------------------------------- 5. CUDA tests
if [ -n "$BUILD_PID" ]; then
  say "waiting for the CUDA build (until t=${BUILD_DEADLINE} s)"
  while kill -0 "$BUILD_PID" 2>/dev/null && [ $((SECONDS - START)) -lt "$BUILD_DEADLINE" ]; do sleep 2; done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    kill -TERM -- "-$BUILD_PID" 2>/dev/null || kill -TERM "$BUILD_PID"
    wait "$BUILD_PID" 2>/dev/null
    rm -f kne_kernels/_C*.so
    record "CUDA extension build" SKIPPED $((SECONDS - BUILD_T0)) "not done by t=${BUILD_DEADLINE} s: stopped; Triton kernels only"
  elif wait "$BUILD_PID"; then
    record "CUDA extension build" OK $((SECONDS - BUILD_T0)) "$(grep -c '^\[' "$BUILD") compile steps"
    if has pytest; then
      run_step "CUDA C++ kernel tests" $(( $(left) - 200 < 60 ? $(left) - 200 : 60 )) "$TESTS" \
        "$PY" -m pytest -q -p no:cacheprovider tests/ops -m cuda_backend -k "not test_fuzz"
    else
      run_step "CUDA C++ kernel self-checks (no pytest)" 60 "$TESTS" "$PY" .ci/gpu_check.py --selfcheck
    fi
  else
    record "CUDA extension build" FAILED $((SECONDS - BUILD_T0)) "see build.log; Triton kernels only"
    tail -5 "$BUILD" | sed 's/^/    /' | tee -a "$LOG"
    rm -f kne_kernels/_C*.so
  fi
fi
"$PY" -m kne_kernels.info >>"$LOG" 2>&1

# ---------------------------------------------------------------------------------- 6-7. benchmarks
run_step "kernel benchmark" $(( $(left) - 140 < 60 ? $(left) - 140 : 60 )) "$LOG" \
  "$PY" benchmarks/speed/bench_kernels.py --device cuda --out "$OUT"
run_step "edit benchmark (llama-7b-shaped, bf16)" $(( $(left) - 10 )) "$LOG" \
  "$PY" benchmarks/speed/bench_edit.py --device cuda --model llama-7b-shaped --prompt long --repeats 3 --no-chart --out "$OUT"

# ---------------------------------------------------------------------------------- summary
{
  echo "# kne GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START)) s)"
  echo
  "$PY" .ci/gpu_check.py --env 2>&1 | sed 's/^/    /'
  echo
  echo "| step | result | seconds | note |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "Tests: $(grep -E '(passed|failed|error|skipped)' "$TESTS" | grep -E '^[0-9=]|in [0-9.]+s' | tr '\n' ';')"
  echo
  for f in kernels_cuda.txt edit_cuda.txt; do
    [ -f "$OUT/$f" ] && { echo "## $f"; echo; sed 's/^/    /' "$OUT/$f"; echo; }
  done
} >"$SUMMARY"
say "done in $((SECONDS - START)) s: $([ $FAILED = 0 ] && echo 'no step failed' || echo 'a step FAILED') (summary.md)"
ls "$OUT" | tee -a "$LOG"
exit $FAILED
