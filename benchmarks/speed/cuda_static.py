"""Static resource usage of the kne CUDA kernels: registers, spills and shared memory per kernel and
architecture, from ``nvcc -Xptxas -v`` (no GPU and no torch needed, only nvcc).

Each ``csrc/cuda/*.cu`` file is compiled alone (``-c``, into a temporary folder) for every
architecture with the flags the extension build uses (torch's ``COMMON_NVCC_FLAGS`` plus setup.py's
``-O3 -std=<CXX_STANDARD> -lineinfo``, the standard read from setup.py), and ptxas's report is
parsed into rows.

    python benchmarks/speed/cuda_static.py                 # table for sm_80 and sm_90
    python benchmarks/speed/cuda_static.py --arch 90 --json
    python benchmarks/speed/cuda_static.py --fail-on-spill  # exit 1 if any kernel spills (CI)

``bench_kernels.py --static`` shows the same table through :func:`ptxas_report`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/speed/../..
CUDA_SOURCES = os.path.join(ROOT, "csrc", "cuda")



def cxx_standard() -> str:
    """The C++ standard setup.py builds with (its ``CXX_STANDARD``: named there only)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(r'^CXX_STANDARD = "(c\+\+\d+)"$', f.read(), re.M)
    if not m:
        raise RuntimeError("setup.py names no CXX_STANDARD")
    return m.group(1)


# setup.py's nvcc flags, then a copy of torch.utils.cpp_extension.COMMON_NVCC_FLAGS (this script
# runs without torch; tests/ops/test_registry.py compares the copy with the installed torch's).
NVCC_FLAGS = ["-O3", f"-std={cxx_standard()}", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr", "-DKNE_WITH_CUDA", "-Xcompiler", "-fPIC"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def find_nvcc() -> Optional[str]:
    """nvcc from ``CUDA_HOME``/``CUDA_PATH`` or the PATH (None when there is none)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    """Readable kernel names: ``column_sum_kernel<__half, 8>`` (namespaces and parameters dropped)."""
    tool = shutil.which("c++filt")
    out = list(names)
    if tool and names:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
        if res.returncode == 0 and len(res.stdout.splitlines()) == len(names):
            out = res.stdout.splitlines()
    pretty = {}
    for mangled, name in zip(names, out):
        name = re.sub(r"^(void )?", "", name)
        name = re.sub(r"kne::cuda::(\(anonymous namespace\)::)?", "", name)
        depth, cut = 0, len(name)
        for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside <...>
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        pretty[mangled] = name[:cut].replace("(bool)1", "true").replace("(bool)0", "false")
    return pretty


def parse_ptxas(text: str) -> List[dict]:
    """Rows ``{kernel (mangled), arch, registers, spills_bytes, shared_bytes}`` from ``-Xptxas -v`` output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": int(m.group(2)), "registers": None, "spills_bytes": 0,
                   "shared_bytes": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["spills_bytes"] = int(m.group(2)) + int(m.group(3))
            continue
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            cur["shared_bytes"] = int(m.group(2) or 0)
    return rows


def _compile(nvcc: str, source: str, arch: int, outdir: str) -> str:
    obj = os.path.join(outdir, f"{os.path.basename(source)}.sm{arch}.o")
    cmd = [nvcc, "-c", source, "-o", obj, *NVCC_FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {os.path.relpath(source, ROOT)} for sm_{arch}:\n{res.stderr}")
    return res.stdout + res.stderr


def ptxas_report(archs: Iterable[int] = (80, 90), sources: Optional[Sequence[str]] = None,
                 jobs: Optional[int] = None) -> List[dict]:
    """Compile every ``csrc/cuda/*.cu`` alone for each architecture and return one row per kernel and
    architecture: ``{"kernel", "arch", "registers", "spills_bytes", "shared_bytes"}`` (``shared_bytes``:
    static shared memory; ``spills_bytes``: spill stores + spill loads). Raises ``RuntimeError`` when
    nvcc is missing or a compile fails."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME or put nvcc on the PATH)")
    sources = sorted(sources or glob.glob(os.path.join(CUDA_SOURCES, "*.cu")))
    if not sources:
        raise RuntimeError(f"no .cu files under {CUDA_SOURCES}")
    archs = [int(a) for a in archs]
    workers = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="kne-ptxas-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_compile, nvcc, s, a, tmp) for s in sources for a in archs]
        texts = [f.result() for f in futures]
    rows = [r for t in texts for r in parse_ptxas(t)]
    names = _demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r["kernel"]]
    rows.sort(key=lambda r: (r["kernel"], r["arch"]))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = ("kernel", "arch", "registers", "spills_bytes", "shared_bytes")
    cells = [head] + [(r["kernel"], f"sm_{r['arch']}", str(r["registers"]), str(r["spills_bytes"]),
                       str(r["shared_bytes"])) for r in rows]
    width = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(width[i]) if i == 0 else c[i].rjust(width[i]) for i in range(len(head)))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any kernel spills registers")
    args = p.parse_args(argv)
    rows = ptxas_report(args.arch)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    spilled = [r for r in rows if r["spills_bytes"]]
    if spilled:
        print(f"{len(spilled)} kernel(s) spill registers: " + ", ".join(f"{r['kernel']} sm_{r['arch']}"
                                                                       for r in spilled), file=sys.stderr)
        if args.fail_on_spill:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
