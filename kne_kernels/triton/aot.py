"""Ahead-of-time compile check of every Triton kernel the launchers can run.

``python -m kne_kernels.triton.aot [--arch 80 --arch 90] [--jobs N] [--json]`` compiles, for each
target ``GPUTarget("cuda", arch, 32)``, every ``@triton.jit`` kernel of this package for every
dtype and every launch configuration (the ``aot_specs()`` of each Triton module, found from the op
modules of ``kne_kernels.ops`` and built from the same tables the launchers pick from), each in
the two extreme specializations of the JIT (every pointer and integer argument divisible by 16:
"aligned"; none: "generic"), plus, once per kernel, every integer argument equal to 1 (which the
JIT turns into a constant: "ones"), down to a cubin with the ``ptxas`` shipped in the Triton
wheel. No GPU is needed. It prints one line per (kernel, arch, variant): registers, spill stores/loads
and shared memory, and exits non-zero if any compile fails.

``compile_all(archs=(80, 90))`` returns the same rows as dicts (for tests). The interpreter
(``TRITON_INTERPRET=1``) replaces ``@triton.jit`` functions, so when it is set the compile runs in
a child process without it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Sequence

def modules() -> List[str]:
    """The Triton modules: ``triton/<module>.py`` for each op module that has one."""
    import importlib.util

    from kne_kernels.ops import modules as op_modules

    return [m for m in op_modules() if importlib.util.find_spec(f"kne_kernels.triton.{m}") is not None]


def _specs() -> List[dict]:
    import importlib

    out = []
    for name in modules():
        mod = importlib.import_module(f"kne_kernels.triton.{name}")
        for spec in mod.aot_specs():
            spec = dict(spec)
            spec["module"] = name
            out.append(spec)
    return out


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _compile_one(args) -> Dict:
    index, arch, mode = args
    import triton
    from triton.backends.compiler import GPUTarget

    spec = _specs()[index]
    kernel = spec["kernel"]
    variant = f"{spec['tag']} {mode}"
    row = {"kernel": kernel.__name__, "module": spec["module"], "arch": arch, "variant": variant,
           "ok": False, "n_regs": None, "n_spills": None, "spill_loads": None, "stack": None,
           "shared": None, "seconds": None, "error": None}
    signature = dict(spec["signature"])
    constexprs = dict(spec["constexprs"])
    if mode == "ones":  # the JIT turns an integer argument equal to 1 into a constant: all at once here
        constexprs.update({k: 1 for k, ty in spec["signature"].items() if ty in ("i32", "i64")})
    for k in constexprs:
        signature[k] = "constexpr"
    missing = [a for a in kernel.arg_names if a not in signature]
    if missing:
        row["error"] = f"signature misses {missing}"
        return row
    # The JIT specializes on 16-divisibility of pointers and integers: compile the two extremes,
    # everything divisible (the common case: fresh allocations, sizes like 4096; vectorized) and
    # nothing divisible (misaligned views, odd sizes; scalar accesses, the most registers).
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in spec["signature"].items()
             if mode == "aligned" and (ty.startswith("*") or ty in ("i32", "i64"))}
    t0 = time.perf_counter()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                             attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))
        log = buf.getvalue()
        row["shared"] = int(compiled.metadata.shared)
        m = _USED.search(log)
        row["n_regs"] = int(m.group(1)) if m else None
        m = _SPILL.search(log)
        if m:
            row["n_spills"], row["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = _STACK.search(log)
        row["stack"] = int(m.group(1)) if m else None
        if row["n_regs"] is None:  # no ptxas log (e.g. a cache hit): read the cubin's resource usage
            row.update(_cubin_usage(compiled.asm["cubin"]))
        row["ok"] = True
    except Exception as e:  # noqa: BLE001 (a compile failure is a result, reported per kernel)
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _cubin_usage(cubin: bytes) -> Dict:
    """Registers and local memory from ``cuobjdump -res-usage`` (spills show as local memory)."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.remove(f.name)
    reg = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return {"n_regs": int(reg.group(1)) if reg else None, "n_spills": int(local.group(1)) if local else None,
            "stack": int(local.group(1)) if local else None}


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # a fresh cache: every kernel really goes through ptxas


def compile_all(archs: Sequence[int] = (80, 90), jobs: int = 0) -> List[Dict]:
    """Compile every shipped (kernel, variant) for each arch; one dict per compile."""
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "kne_kernels.triton.aot", "--json", "--jobs", str(jobs)]
        for a in archs:
            cmd += ["--arch", str(a)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
        if not lines:
            raise RuntimeError(f"the AOT child process printed no result (rc {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(lines[-1])
    specs = _specs()
    lasts = {}  # per kernel with integer arguments, its last variant (the one with the most features)
    for i, spec in enumerate(specs):
        if any(ty in ("i32", "i64") for ty in spec["signature"].values()):
            lasts[spec["kernel"].__name__] = i
    work = [(i, arch, mode) for arch in archs for i in range(len(specs)) for mode in ("aligned", "generic")]
    work += [(i, arch, "ones") for arch in archs for i in lasts.values()]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="kne-triton-aot-") as cache:
        _init_worker(cache)
        if jobs <= 1:
            return [_compile_one(w) for w in work]
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked Triton/LLVM state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(cache,)) as pool:
            return list(pool.map(_compile_one, work))


def _fmt(r: Dict) -> str:
    if not r["ok"]:
        return f"FAIL {r['kernel']:34s} sm_{r['arch']} {r['variant']:42s} {r['error']}"
    return (f"ok   {r['kernel']:34s} sm_{r['arch']} {r['variant']:42s} regs={r['n_regs']:<4} "
            f"spills={r['n_spills']}/{r['spill_loads']} stack={r['stack']} shared={r['shared']} "
            f"({r['seconds']}s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="SM version (repeatable; default 80 and 90)")
    p.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: CPU count)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    a = p.parse_args(argv)
    archs = tuple(a.arch or (80, 90))
    t0 = time.perf_counter()
    rows = compile_all(archs, a.jobs)
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(_fmt(r))
        bad = [r for r in rows if not r["ok"]]
        spilled = [r for r in rows if r["ok"] and r["n_spills"]]
        print(f"{len(rows)} compiles for sm_{', sm_'.join(map(str, archs))} in {time.perf_counter() - t0:.1f}s: "
              f"{len(bad)} failed, {len(spilled)} with spills")
    return 1 if any(not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        # The interpreter wraps @triton.jit functions: re-run without it before importing any kernel.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "kne_kernels.triton.aot", *sys.argv[1:]], env)
    sys.exit(main())
